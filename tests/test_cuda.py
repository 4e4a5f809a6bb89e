"""The CUDA path: the UNet on a GPU against the CPU, bf16 autocast against float32, every
attention on torch's fused kernels, gradient checkpointing, and train.py + sample.py end to end
on the GPU. Skipped where torch sees no GPU (CI has none); on a GPU machine run
`pytest tests/test_cuda.py`."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import sample
import train
from test_train import TINY
from test_unet3d import inputs, make_model, perturb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# the gpu preset's UNet (2x2 patches, attention at the two highest levels, 32-wide heads),
# narrower so that the tests stay quick
GPU_LIKE = dataclasses.replace(train.presets()["gpu"]["unet"], model_channels=32, context_dim=64)


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matmuls and convolutions in float32, not TF32, while a test compares numbers."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cuda_inputs():
    """Two 4-frame 32x32 clips, their timesteps and context, on the GPU."""
    return (a.cuda() for a in inputs(B=2, F=4, H=32, W=32, config=GPU_LIKE))


def gpu_like_model(config=GPU_LIKE):
    model = make_model(config)
    perturb(model.parameters(), scale=0.02)  # off the zero-initialised output head
    return model


@pytest.mark.parametrize("F, use_temporal", [(4, True), (1, False)])
def test_unet_on_cuda_matches_the_cpu_in_float32(F, use_temporal):
    model = gpu_like_model()
    x, t, context = inputs(B=2, F=F, H=32, W=32, config=GPU_LIKE)
    with torch.no_grad():
        cpu = model(x, t, context, use_temporal=use_temporal)
        gpu = model.cuda()(x.cuda(), t.cuda(), context.cuda(), use_temporal=use_temporal)
    assert relative_error(gpu.cpu(), cpu) < 1e-4


def test_bf16_autocast_on_cuda_stays_close_to_float32():
    model = gpu_like_model().cuda()
    x, t, context = cuda_inputs()
    with torch.no_grad():
        fp32 = model(x, t, context)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x, t, context)
    assert bf16.dtype == torch.bfloat16
    assert relative_error(bf16, fp32) < 3e-2


@pytest.mark.parametrize("precision, backend", [("bf16", SDPBackend.FLASH_ATTENTION),
                                                ("fp32", SDPBackend.EFFICIENT_ATTENTION)])
def test_every_attention_runs_on_a_fused_kernel(precision, backend):
    """With only one fused SDPA kernel allowed, torch raises if any attention call (spatial
    self- and cross-attention, temporal attention) cannot use it: this proves they all can."""
    model = gpu_like_model().cuda()
    x, t, context = cuda_inputs()
    with sdpa_kernel([backend]), torch.autocast("cuda", torch.bfloat16,
                                                enabled=precision == "bf16"):
        model(x, t, context).float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_checkpointing_on_cuda_gives_the_same_gradients():
    grads = []
    for use_checkpoint in (False, True):
        model = gpu_like_model(dataclasses.replace(GPU_LIKE, use_checkpoint=use_checkpoint))
        model = model.cuda()
        x, t, context = cuda_inputs()
        model(x, t, context).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert relative_error(grads[1], grads[0]) < 1e-5


def test_train_py_resumes_and_drives_sample_py_on_cuda(tmp_path):
    def run(name, steps, *extra):
        return train.train(train.parse_args(TINY + [
            "--device", "cuda", "--out", str(tmp_path / name), "--steps", str(steps),
            "--ckpt_every", "2", "--branches", "content,motion,paired", *extra]))

    full, _ = run("full", 4)
    run("split", 2)
    resumed, ckpt = run("split", 4, "--resume")
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert a.device.type == "cuda" and torch.allclose(a, b, atol=1e-5), name
    video = sample.main(["--ckpt", ckpt, "--prompt", "a big red circle moving right",
                         "--steps", "3", "--device", "cuda", "--out", str(tmp_path / "v.gif")])
    assert video.shape == (1, 3, 4, 16, 16) and (tmp_path / "v.gif").exists()
    assert torch.isfinite(video).all()
