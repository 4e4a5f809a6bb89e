"""unet3d.py: shapes, the spatial/temporal split the two TF-T2V branches rely on, zero
initialisation, frame equivariance, attention against a slow reference, conditioning."""

import dataclasses
import math

import pytest
import torch

import unet3d
from unet3d import PRESETS, Attention, UNet3D, UNetConfig

SMALL = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_levels=(0, 1), head_dim=8, context_dim=12, num_groups=4,
                   temporal_conv_layers=2)


def make_model(config=SMALL, seed=0):
    torch.manual_seed(seed)
    return UNet3D(config)


def inputs(B=2, F=4, H=8, W=8, config=SMALL, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.in_channels, F, H, W, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    context = torch.randn(B, 5, config.context_dim, generator=g)
    return x, t, context


@torch.no_grad()
def perturb(params, scale=0.1, seed=2):
    """Move weights off their initialisation (zero-initialised layers included), so that the
    zero-initialised output head does not make every output trivially zero."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("F, H, W, use_temporal", [
    (1, 8, 8, False), (1, 8, 8, True), (8, 8, 8, True), (8, 8, 12, True), (3, 12, 8, False)])
def test_output_shape_matches_input_for_images_videos_and_non_square_frames(F, H, W, use_temporal):
    model = make_model()
    x, t, context = inputs(B=2, F=F, H=H, W=W)
    out = model(x, t, context, use_temporal=use_temporal)
    assert out.shape == (2, SMALL.out_channels, F, H, W)


def test_frame_size_not_a_multiple_of_the_downsampling_is_a_clear_error():
    model = make_model(dataclasses.replace(SMALL, patch_size=2))
    m = model.config.size_multiple()
    assert m == 2 * 2 ** (len(SMALL.channel_mult) - 1)
    x, t, context = inputs(B=1, F=2, H=m, W=m + 2)
    with pytest.raises(ValueError, match=f"not a multiple of {m}"):
        model(x, t, context)


@pytest.mark.parametrize("F, H, W", [(1, 16, 16), (8, 16, 16), (4, 16, 24)])
def test_patched_model_keeps_the_pixel_shape_and_runs_its_levels_at_half_resolution(F, H, W):
    config = dataclasses.replace(SMALL, patch_size=2)
    model = make_model(config)
    perturb(model.parameters())
    x, t, context = inputs(B=2, F=F, H=H, W=W)
    seen = []
    model.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    out = model(x, t, context, use_temporal=F > 1)
    assert out.shape == x.shape
    assert seen == [(2 * F, 3 * 4, H // 2, W // 2)]  # each 2x2 patch is one 12-channel pixel
    assert out.abs().max() > 1e-3


def test_temporal_and_spatial_parameters_partition_all_parameters():
    model = make_model()
    temporal, spatial = model.temporal_parameters(), model.spatial_parameters()
    ids = [id(p) for p in temporal + spatial]
    assert len(ids) == len(set(ids))  # disjoint, no duplicates
    assert set(ids) == {id(p) for p in model.parameters()}  # covering
    assert len(temporal) > 0 and len(spatial) > 0


def test_content_branch_leaves_temporal_grads_none_and_sets_every_spatial_grad():
    model = make_model()
    x, t, context = inputs(F=1)
    model(x, t, context, use_temporal=False).square().mean().backward()
    assert all(p.grad is None for p in model.temporal_parameters())
    assert all(p.grad is not None for p in model.spatial_parameters())


def test_motion_branch_sets_every_grad():
    model = make_model()
    x, t, context = inputs(F=4)
    model(x, t, context, use_temporal=True).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_output_head_is_zero_initialised():
    # A fresh model predicts exactly zero (official UNet: zero_module on the last conv).
    model = make_model()
    out = model(*inputs())
    assert torch.equal(out, torch.zeros_like(out))


@torch.no_grad()
def test_untrained_temporal_layers_are_identity_so_video_equals_per_frame_images():
    model = make_model().eval()
    perturb(model.spatial_parameters())  # temporal layers keep their zero-initialised outputs
    x, t, context = inputs(F=4)
    video = model(x, t, context, use_temporal=True)
    frames = model(x, t, context, use_temporal=False)
    one_by_one = torch.cat([model(x[:, :, f:f + 1], t, context, use_temporal=False)
                            for f in range(x.shape[2])], dim=2)  # each frame as an F = 1 image
    assert video.abs().max() > 1e-3
    torch.testing.assert_close(video, frames, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(video, one_by_one, atol=1e-5, rtol=1e-5)
    perturb(model.temporal_parameters())  # once trained, the temporal layers do mix frames
    assert not torch.allclose(model(x, t, context, use_temporal=True), frames, atol=1e-3)


@torch.no_grad()
def test_permuting_frames_permutes_output_when_temporal_layers_are_off():
    model = make_model().eval()
    perturb(model.parameters())
    x, t, context = inputs(F=5)
    perm = torch.tensor([3, 0, 4, 2, 1])
    out = model(x, t, context, use_temporal=False)
    torch.testing.assert_close(model(x[:, :, perm], t, context, use_temporal=False),
                               out[:, :, perm], atol=1e-5, rtol=1e-5)
    # With temporal layers on, the temporal convolutions see frame order (no positions needed).
    video = model(x, t, context, use_temporal=True)
    assert not torch.allclose(model(x[:, :, perm], t, context)[:, :, perm.argsort()], video,
                              atol=1e-3)


def slow_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V, one sample and one head at a time. q (N, h, S, d)."""
    out = torch.empty_like(q)
    for n in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = q[n, h] @ k[n, h].T / math.sqrt(q.shape[-1])  # (S, L)
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            out[n, h] = (weights / weights.sum(dim=1, keepdim=True)) @ v[n, h]
    return out


@pytest.mark.parametrize("context_dim", [None, 6])
def test_attention_matches_slow_softmax_reference(context_dim):
    torch.manual_seed(0)
    attn = Attention(dim=16, head_dim=4, context_dim=context_dim)  # 4 heads
    x = torch.randn(3, 7, 16)
    context = None if context_dim is None else torch.randn(3, 5, context_dim)
    source = x if context is None else context

    def heads(a):
        return a.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (N, h, S, d)
    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(source)), heads(attn.to_v(source))
    expected = attn.to_out(slow_attention(q, k, v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(x, context), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [10**9, 2 * 3 * 9 * 6])  # one chunk; chunks of 2, 2, 1 rows
def test_bfloat16_cpu_attention_matches_reference_and_its_gradients(monkeypatch, chunk):
    """bfloat16 on the CPU takes the plain, batch-chunked path: same values and gradients as the
    float32 reference, to bfloat16 precision, however the batch is chunked."""
    monkeypatch.setattr(unet3d, "SCORE_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 3, n, 8, generator=g) for n in (9, 6, 6))  # (N, heads, S or L, d)
    grad = torch.randn(5, 3, 9, 8, generator=g)
    ours = [a.bfloat16().requires_grad_() for a in (q, k, v)]
    ref = [a.clone().requires_grad_() for a in (q, k, v)]
    out = unet3d.attention(*ours)
    expected = slow_attention(*ref)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    out.backward(grad.bfloat16())
    expected.backward(grad)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("keys", [6, 16, 17])
def test_float32_cpu_attention_takes_the_plain_form_up_to_plain_keys(monkeypatch, keys):
    """float32 on the CPU: the plain form for at most PLAIN_KEYS keys (here 16; 64 on an AVX2
    CPU, 0 elsewhere), torch's SDPA beyond; the float32 reference's values and gradients either
    way."""
    monkeypatch.setattr(unet3d, "PLAIN_KEYS", 16)
    plain, calls = unet3d.plain_attention, []
    monkeypatch.setattr(unet3d, "plain_attention", lambda *a: (calls.append(1), plain(*a))[1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 8, generator=g) for n in (9, keys, keys))
    grad = torch.randn(3, 2, 9, 8, generator=g)
    ours = [a.clone().requires_grad_() for a in (q, k, v)]
    ref = [a.clone().requires_grad_() for a in (q, k, v)]
    out = unet3d.attention(*ours)
    assert len(calls) == (keys <= unet3d.PLAIN_KEYS)
    expected = slow_attention(*ref)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_timestep_and_context_each_change_the_output():
    model = make_model().eval()
    perturb(model.parameters())  # the output head starts at zero: move it first
    x, t, context = inputs()
    out = model(x, t, context)
    assert not torch.allclose(model(x, t + 100, context), out, atol=1e-4)
    assert not torch.allclose(model(x, t, context + 1.0), out, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("zero", [True, False])
def test_spatial_proj_zero_decides_whether_the_context_reaches_an_untrained_model(zero):
    # Official: each spatial transformer's proj_out starts at zero, so at initialisation the
    # cross-attention (the only way in for the context here) adds nothing. The option
    # spatial_proj_zero=False starts it at torch's default initialisation instead.
    model = make_model(dataclasses.replace(SMALL, spatial_proj_zero=zero)).eval()
    projections = [m.proj_out for m in model.modules()
                   if isinstance(m, unet3d.SpatialTransformer)]
    assert projections
    assert all(bool((p.weight == 0).all()) == zero for p in projections)
    perturb(model.out.parameters())  # move only the zero output head, so outputs are not 0
    x, t, context = inputs()
    moved = not torch.allclose(model(x, t, context + 1.0), model(x, t, context), atol=1e-5)
    assert moved != zero


@torch.no_grad()
def test_context_maps_feed_the_first_context_token_as_constant_input_channels():
    config = dataclasses.replace(SMALL, context_maps=3)
    model = make_model(config).eval()
    x, t, context = inputs(F=4, config=config)
    seen = []
    model.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(x, t, context)
    extra = seen[0][:, -3:]  # (B*F, 3, H, W): the channels after x's
    expected = model.context_maps(context[:, 0])  # (B, 3)
    for b in range(2):
        for f in range(4):
            want = expected[b][:, None, None].expand(3, 8, 8)
            torch.testing.assert_close(extra[b * 4 + f], want)
    assert torch.equal(seen[0][:, :3], unet3d.video_to_frames(x))  # x itself comes first
    # the maps alone carry the context: with every cross-attention's value zeroed, the
    # context still changes the output, and it stops doing so without the maps
    perturb(model.parameters())
    for module in model.modules():
        if isinstance(module, Attention) and module.to_k.in_features == config.context_dim:
            module.to_v.weight.zero_()
    assert not torch.allclose(model(x, t, context + 1.0), model(x, t, context), atol=1e-4)
    model.context_maps.weight.zero_()
    torch.testing.assert_close(model(x, t, context + 1.0), model(x, t, context))
    model.context_maps.weight.normal_()  # and only the first token reaches them
    later = context.clone()
    later[:, 1:] += 1.0
    torch.testing.assert_close(model(x, t, later), model(x, t, context))
    assert not torch.allclose(model(x, t, later + 1.0), model(x, t, later), atol=1e-4)


def test_context_maps_are_spatial_parameters_and_images_train_them():
    model = make_model(dataclasses.replace(SMALL, context_maps=2))
    assert {id(p) for p in model.context_maps.parameters()} <= {
        id(p) for p in model.spatial_parameters()}
    perturb(model.parameters())  # off the zero-initialised head, so gradients reach the input
    x, t, context = inputs(F=1, config=model.config)
    model(x, t, context, use_temporal=False).square().mean().backward()
    assert model.context_maps.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_long_and_float_timesteps_agree():
    model = make_model().eval()
    perturb(model.parameters())
    x, t, context = inputs()
    torch.testing.assert_close(model(x, t, context), model(x, t.float(), context))


@torch.no_grad()
def test_same_seed_same_output():
    x, t, context = inputs()
    a, b = make_model(seed=3), make_model(seed=3)
    perturb(a.parameters()), perturb(b.parameters())
    assert torch.equal(a(x, t, context), b(x, t, context))


@torch.no_grad()
def test_channels_last_convs_keeps_the_output_and_restores_the_layout():
    model = make_model(dataclasses.replace(SMALL, patch_size=2)).eval()
    perturb(model.parameters())
    x, t, context = inputs(H=16, W=16)
    before = {n: p.clone() for n, p in model.named_parameters()}
    reference = model(x, t, context)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with unet3d.channels_last_convs(model):
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        assert not all(c.weight.is_contiguous() for c in convs)  # 1x1 kernels are both
        torch.testing.assert_close(model(x, t, context), reference, atol=1e-5, rtol=1e-5)
    with unet3d.channels_last_convs(model, enabled=False):
        assert all(c.weight.is_contiguous() for c in convs)
    with pytest.raises(RuntimeError, match="inside"), unet3d.channels_last_convs(model):
        raise RuntimeError("inside")  # the layout comes back on an error too
    for n, p in model.named_parameters():
        assert p.is_contiguous() and torch.equal(p, before[n]), n


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    x, t, context = inputs()
    grads = []
    for use_checkpoint in (False, True):
        model = make_model(dataclasses.replace(SMALL, use_checkpoint=use_checkpoint))
        perturb(model.parameters())
        out = model(x, t, context)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1)


def test_presets_build_and_paper_preset_has_paper_scale():
    tiny = UNet3D(PRESETS["tiny"])
    assert [m.res.in_layers[2].out_channels for m in (s[0] for s in tiny.down)] == [32, 64, 64]
    with torch.device("meta"):  # shapes only: the paper model has over a billion parameters
        paper = UNet3D(PRESETS["paper"])
    assert paper.conv_in.in_channels == 4 and paper.out[2].out_channels == 4
    assert sum(p.numel() for p in paper.parameters()) > 1e9
