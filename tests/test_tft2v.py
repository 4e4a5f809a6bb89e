"""TF-T2V branches of tft2v.py: what each branch feeds the UNet, which layers it trains, condition
dropout, the frozen CLIP, and generation."""

import pytest
import torch

import clip_tiny
import tft2v
import unet3d
from tft2v import TFT2V, TFT2VConfig

CAPTIONS = ["a big red circle", "a small blue square", "a big green triangle moving left", ""]


def make_model(condition_channels=0, context_maps=0, embed_dim=16, **tft2v_overrides):
    torch.manual_seed(0)
    tokenizer = clip_tiny.Tokenizer.train([c for c in CAPTIONS if c] * 4, vocab_size=600)
    clip = clip_tiny.CLIP(clip_tiny.CLIPConfig(
        embed_dim=embed_dim, image_resolution=16, vision_layers=1, vision_width=64,
        vision_patch_size=8, context_length=12, vocab_size=tokenizer.vocab_size,
        transformer_width=32, transformer_heads=2, transformer_layers=2))
    unet = unet3d.UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                             attention_levels=(1,), head_dim=16, context_dim=32,
                             num_groups=8, condition_channels=condition_channels,
                             context_maps=context_maps)
    return TFT2V(clip, tokenizer, unet, TFT2VConfig(**tft2v_overrides))


def record_contexts(model, maps=None):
    """Wrap the UNet so each call's (context, use_temporal) is kept for inspection, and each
    call's condition maps (or None) in `maps` when a list is given."""
    calls, forward = [], model.unet.forward

    def spy(x, t, context, use_temporal=True, condition=None):
        calls.append((context.detach().clone(), use_temporal))
        if maps is not None:
            maps.append(None if condition is None else condition.detach().clone())
        return forward(x, t, context, use_temporal=use_temporal, condition=condition)

    model.unet.forward = spy
    return calls


def slots(model, context):
    """(text slot, image slot) of a context (B, L + 4, D), each reduced to 'is non-zero' (B,)."""
    L = model.clip.config.context_length
    return context[:, :L].abs().sum((1, 2)) > 0, context[:, L:].abs().sum((1, 2)) > 0


def test_content_branch_gives_text_or_image_never_both():
    model = make_model(p_drop_each=0.0, p_drop_all=0.0)
    calls = record_contexts(model)
    images = torch.rand(16, 3, 1, 16, 16) * 2 - 1
    for _ in range(4):
        model.content_loss(images, ["a big red circle"] * 16)
    text_on, image_on = zip(*(slots(model, ctx) for ctx, _ in calls))
    text_on, image_on = torch.cat(text_on), torch.cat(image_on)
    assert torch.all(text_on ^ image_on)  # exactly one condition per sample
    assert 0 < text_on.sum() < len(text_on)  # and both kinds occur
    assert all(use_temporal is False for _, use_temporal in calls)


def test_content_branch_with_dropout_never_gives_both():
    model = make_model(p_drop_each=0.3, p_drop_all=0.2)
    calls = record_contexts(model)
    for _ in range(4):
        model.content_loss(torch.rand(16, 3, 16, 16) * 2 - 1, ["a small blue square"] * 16)
    for ctx, _ in calls:
        text_on, image_on = slots(model, ctx)
        assert not torch.any(text_on & image_on)


def test_content_branch_runs_clip_only_on_the_rows_it_uses():
    model = make_model(p_drop_each=0.2, p_drop_all=0.1)
    calls = record_contexts(model)
    rows = {"text": [], "image": []}
    encode, embed = model.encode_text, model.embed_image
    model.encode_text = lambda captions: rows["text"].append(len(captions)) or encode(captions)
    model.embed_image = lambda images: rows["image"].append(len(images)) or embed(images)
    images = torch.rand(16, 3, 1, 16, 16) * 2 - 1
    captions = [CAPTIONS[i % 3] for i in range(16)]
    torch.manual_seed(1)
    model.content_loss(images, captions)
    (ctx, _), = calls
    text_on, image_on = slots(model, ctx)
    assert 0 < text_on.sum() < 16 and 0 < image_on.sum() < 16
    assert rows == {"text": [int(text_on.sum())], "image": [int(image_on.sum())]}
    # the same context as running CLIP on every row and masking
    torch.testing.assert_close(
        ctx, model.context(encode(captions), embed(images[:, :, 0]), text_on, image_on))


def test_content_branch_backward_leaves_every_temporal_grad_none():
    model = make_model()
    loss, _ = model.content_loss(torch.rand(4, 3, 1, 16, 16) * 2 - 1, CAPTIONS)
    loss.backward()
    temporal = list(model.unet.temporal_parameters())
    assert temporal and all(p.grad is None for p in temporal)
    assert all(p.grad is not None for p in model.unet.spatial_parameters())
    assert all(p.grad is None for p in model.clip.parameters())


def test_text_free_motion_branch_has_zero_text_slot_and_image_condition():
    model = make_model(p_drop_each=0.0, p_drop_all=0.0)
    calls = record_contexts(model)
    loss, parts = model.motion_loss(torch.rand(3, 3, 4, 16, 16) * 2 - 1)
    (ctx, use_temporal), = calls
    text_on, image_on = slots(model, ctx)
    assert not text_on.any() and image_on.all() and use_temporal is True
    assert "motion" in parts and "motion_coh" in parts


def test_paired_motion_branch_gives_text_and_image():
    model = make_model(p_drop_each=0.0, p_drop_all=0.0)
    calls = record_contexts(model)
    model.motion_loss(torch.rand(3, 3, 4, 16, 16) * 2 - 1, CAPTIONS[:3])
    text_on, image_on = slots(model, calls[0][0])
    assert text_on.all() and image_on.all()


@pytest.mark.parametrize("choice,frame", [("middle", 2), ("first", 0)])
def test_image_condition_comes_from_the_chosen_frame(choice, frame):
    model = make_model(cond_frame=choice, p_drop_each=0.0, p_drop_all=0.0)
    videos = torch.stack([torch.full((3, 16, 16), v) for v in (-0.9, -0.4, 0.1, 0.6, 0.9)], 1)
    videos = videos.unsqueeze(0).repeat(2, 1, 1, 1, 1)  # (2, 3, 5, 16, 16), frames distinct
    seen = []
    embed = model.embed_image
    model.embed_image = lambda images: seen.append(images.clone()) or embed(images)
    model.motion_loss(videos)
    assert torch.equal(seen[0], videos[:, :, frame])


def test_condition_dropout_rates():
    torch.manual_seed(0)
    model = make_model(p_drop_each=0.2, p_drop_all=0.1)
    on = torch.ones(200_000, dtype=torch.bool)
    text_on, image_on = model.condition_dropout(on, on)
    assert text_on.float().mean().item() == pytest.approx(0.9 * 0.8, abs=0.005)
    assert image_on.float().mean().item() == pytest.approx(0.9 * 0.8, abs=0.005)
    none = (~text_on & ~image_on).float().mean().item()
    assert none == pytest.approx(0.1 + 0.9 * 0.2 * 0.2, abs=0.005)
    off_text, _ = model.condition_dropout(~on, on)  # an absent condition stays absent
    assert not off_text.any()


def test_clip_gets_no_gradient_and_stays_in_eval_mode():
    model = make_model()
    model.train()
    assert not model.clip.training
    loss, _ = model.motion_loss(torch.rand(2, 3, 4, 16, 16) * 2 - 1, CAPTIONS[:2])
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.clip.parameters())
    assert all(p.requires_grad for p in model.trainable_parameters())
    assert any(p.grad is not None for p in model.image_mlp.parameters())


def test_motion_loss_is_base_plus_lambda_times_coherence():
    videos = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    losses = {}
    for lam in (0.0, 1.0):
        model = make_model(coherence_weight=lam, p_drop_each=0.0, p_drop_all=0.0)
        torch.manual_seed(1)
        losses[lam] = model.motion_loss(videos)
    (l0, p0), (l1, p1) = losses[0.0], losses[1.0]
    assert l0.item() == pytest.approx(p0["motion"], rel=1e-5)
    assert l1.item() == pytest.approx(p1["motion"] + p1["motion_coh"], rel=1e-5)


def test_empty_prompt_is_the_zero_text_condition():
    model = make_model()
    text = model.encode_text(["", "a big red circle"])
    assert text[0].abs().sum() == 0 and text[1].abs().sum() > 0


def test_context_maps_get_the_pooled_text_embedding_as_the_first_context_token():
    model = make_model(context_maps=2, embed_dim=32, p_drop_each=0.0, p_drop_all=0.0)
    L = model.clip.config.context_length
    assert model.text_length == L + 1
    text = model.encode_text(["a big red circle", ""])
    tokens = model.tokenizer(["a big red circle"], L)
    assert text.shape == (2, L + 1, 32)
    torch.testing.assert_close(text[0, 0], model.clip.encode_text(tokens)[0].float())
    torch.testing.assert_close(text[0, 1:], model.clip.text_tokens(tokens)[0].float())
    assert text[1].abs().sum() == 0  # the empty prompt: no text, pooled embedding included
    calls = record_contexts(model)
    model.content_loss(torch.rand(8, 3, 1, 16, 16) * 2 - 1, ["a big red circle"] * 8)
    model.motion_loss(torch.rand(2, 3, 4, 16, 16) * 2 - 1)
    model.motion_loss(torch.rand(2, 3, 4, 16, 16) * 2 - 1, ["a small blue square"] * 2)
    assert [ctx.shape[1] for ctx, _ in calls] == [L + 1 + 4] * 3
    content, free, paired = (ctx[:, 0] for ctx, _ in calls)
    assert 0 < (content.abs().sum(1) > 0).sum() < 8  # captioned rows only (the others: image)
    assert free.abs().sum() == 0 and (paired.abs().sum(1) > 0).all()
    video = model.eval().generate(prompts=["a big red circle"], frames=3, size=16, steps=2)
    assert video.shape == (1, 3, 3, 16, 16)
    with pytest.raises(ValueError, match="embed_dim 16 must equal its text width 32"):
        make_model(context_maps=2)


@pytest.mark.parametrize("mode", ["text", "image", "image+text"])
def test_generate_shapes_range_and_determinism(mode):
    model = make_model().eval()
    prompts = ["a big red circle", "a small blue square"] if "text" in mode else None
    images = torch.rand(2, 3, 16, 16) * 2 - 1 if "image" in mode else None
    kw = dict(prompts=prompts, images=images, frames=3, size=(16, 8), steps=3, seed=5)
    a, b = model.generate(**kw), model.generate(**kw)
    assert a.shape == (2, 3, 3, 16, 8)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    for bad in (dict(guidance=float("nan")), dict(guidance=float("inf")), dict(eta=float("nan")),
                dict(eta=float("inf"))):
        with pytest.raises(ValueError, match="guidance must be finite and eta at least 0"):
            model.generate(**(kw | bad))


def test_generate_on_a_cpu_in_fp32_samples_with_channels_last_convs_and_restores_them(
        monkeypatch):
    model = make_model().eval()
    with torch.no_grad():  # off the zero initialisation, so the convolutions matter
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen = []
    forward = model.unet.forward

    def spy(*args, **kwargs):
        seen.append(model.unet.conv_in.weight.is_contiguous())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", spy)
    kw = dict(prompts=["a big red circle"], frames=3, size=16, steps=3, seed=5)
    with_layout = model.generate(**kw)
    assert seen and not any(seen)  # channels-last inside the sampler
    assert model.unet.conv_in.weight.is_contiguous()  # and contiguous again after
    assert not tft2v.sampling_channels_last(torch.device("cpu"), "bf16")
    monkeypatch.setattr(tft2v, "sampling_channels_last", lambda device, precision: False)
    seen.clear()
    without = model.generate(**kw)
    assert seen and all(seen)
    torch.testing.assert_close(with_layout, without, atol=1e-4, rtol=0)


def test_null_text_setting_picks_zeros_or_the_empty_prompt_embedding():
    zeros = make_model(p_drop_each=0.0, p_drop_all=0.0)
    calls = record_contexts(zeros)
    zeros.motion_loss(torch.rand(2, 3, 4, 16, 16) * 2 - 1)
    L = zeros.clip.config.context_length
    assert calls[0][0][:, :L].abs().sum() == 0
    empty = make_model(null_text="empty", p_drop_each=0.0, p_drop_all=0.0)
    calls = record_contexts(empty)
    empty.motion_loss(torch.rand(2, 3, 4, 16, 16) * 2 - 1)
    expected = empty.clip.text_tokens(empty.tokenizer(["", ""], L))
    assert torch.allclose(calls[0][0][:, :L], expected, atol=1e-6)
    assert expected.abs().sum() > 0


def test_device_and_precision_names_are_checked():
    assert tft2v.pick_device("cpu") == torch.device("cpu")
    assert tft2v.pick_precision("fp32", torch.device("cpu")) == "fp32"
    assert tft2v.pick_precision("auto", torch.device("cpu")) in ("fp32", "bf16")
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        tft2v.pick_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown device"):
        tft2v.pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            tft2v.pick_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="only"):
            tft2v.pick_device(f"cuda:{torch.cuda.device_count()}")
