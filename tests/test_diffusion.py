"""Diffusion maths of tft2v.py: schedules, q_sample, parameterisations, samplers, guidance,
and the TF-T2V temporal coherence loss."""

import math

import pytest
import torch

from tft2v import (Diffusion, DiffusionConfig, classifier_free_guidance, coherence_loss,
                   make_betas)


# -- coherence loss --

def test_coherence_loss_matches_hand_computed_value():
    # One sample, one channel, 3 frames of 1x1 pixels: pred 0, 1, 3; target 0, 0, 0.
    pred = torch.tensor([0.0, 1.0, 3.0]).view(1, 1, 3, 1, 1)
    target = torch.zeros_like(pred)
    # pairs: (1 - 0) - 0 = 1, (3 - 1) - 0 = 2  ->  (1^2 + 2^2) / 2 = 2.5
    assert coherence_loss(pred, target).item() == pytest.approx(2.5)
    # two pixels: second pixel has pred 0, 0, 0 -> (1 + 4 + 0 + 0) / 4
    pred2 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]).view(1, 1, 3, 1, 2)
    assert coherence_loss(pred2, torch.zeros_like(pred2)).item() == pytest.approx(1.25)


def test_coherence_loss_is_zero_for_a_constant_offset_while_base_loss_is_not():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 5, 4, 4)
    offset = torch.randn(2, 3, 1, 4, 4)  # same offset in every frame
    pred = target + offset
    assert coherence_loss(pred, target).item() == pytest.approx(0.0, abs=1e-10)
    assert torch.nn.functional.mse_loss(pred, target).item() > 0.1


def test_coherence_loss_gradient_equals_explicit_per_pair_loop():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 4, 5, 5)
    pred_a = torch.randn(2, 3, 4, 5, 5, requires_grad=True)
    pred_b = pred_a.detach().clone().requires_grad_(True)
    coherence_loss(pred_a, target).backward()
    F = pred_b.shape[2]
    loop = sum((((pred_b[:, :, j + 1] - pred_b[:, :, j]) - (target[:, :, j + 1] - target[:, :, j]))
                ** 2).mean() for j in range(F - 1)) / (F - 1)
    loop.backward()
    assert torch.allclose(pred_a.grad, pred_b.grad, atol=1e-7)


def test_coherence_loss_rejects_single_frames():
    x = torch.zeros(2, 3, 1, 4, 4)
    with pytest.raises(ValueError, match="F > 1"):
        coherence_loss(x, x)


# -- schedules --

def test_linear_sd_betas_match_closed_form():
    T = 1000
    betas = make_betas("linear_sd", T)
    for i in (0, 1, 499, 998, 999):
        s = 0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / (T - 1)
        assert betas[i].item() == pytest.approx(s**2, rel=1e-12)
    assert betas.dtype == torch.float64


@pytest.mark.parametrize("schedule", ["linear_sd", "linear", "cosine"])
def test_zero_terminal_snr_sets_last_alpha_bar_to_zero_and_keeps_first(schedule):
    plain = Diffusion(DiffusionConfig(schedule=schedule, zero_terminal_snr=False))
    ztsnr = Diffusion(DiffusionConfig(schedule=schedule, zero_terminal_snr=True))
    assert ztsnr.alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert ztsnr.alpha_bar[0].item() == pytest.approx(plain.alpha_bar[0].item(), rel=1e-10)
    assert plain.alpha_bar[-1].item() > 0
    assert torch.all(ztsnr.alpha_bar[1:] <= ztsnr.alpha_bar[:-1])


def test_zero_terminal_snr_with_eps_prediction_is_refused():
    with pytest.raises(ValueError, match="v-prediction"):
        Diffusion(DiffusionConfig(prediction="eps", zero_terminal_snr=True))


def test_q_sample_mean_and_variance_over_many_draws():
    torch.manual_seed(0)
    d = Diffusion(DiffusionConfig(offset_noise=0.0))
    x0 = torch.full((20000, 1, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    x_t = d.q_sample(x0, t, torch.randn_like(x0))
    a = d.alpha_bar[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.05)


def test_offset_noise_is_shared_across_pixels_of_a_frame():
    torch.manual_seed(0)
    d = Diffusion(DiffusionConfig(offset_noise=1.0))
    eps = d.noise_like(torch.zeros(4000, 2, 3, 8, 8))
    # Per-frame means carry the offset (variance ~ 1 + 1/64) while a frame of pure N(0,1) would
    # have mean variance 1/64.
    assert eps.mean(dim=(-1, -2)).var().item() == pytest.approx(1 + 1 / 64, rel=0.1)


@pytest.mark.parametrize("prediction,ztsnr", [("v", True), ("v", False), ("eps", False)])
def test_x0_eps_v_conversions_round_trip(prediction, ztsnr):
    torch.manual_seed(0)
    d = Diffusion(DiffusionConfig(prediction=prediction, zero_terminal_snr=ztsnr))
    x0, eps = torch.randn(8, 3, 2, 4, 4), torch.randn(8, 3, 2, 4, 4)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 998 if prediction == "eps" else 999])
    x_t = d.q_sample(x0, t, eps)
    x0_back, eps_back = d.x0_eps_from(x_t, t, d.target(x0, eps, t))
    assert torch.allclose(x0_back, x0, atol=1e-4)
    assert torch.allclose(eps_back, eps, atol=1e-4)
    if prediction == "v":
        keep = t < 999  # at alpha_bar = 0, eps = x_t and x0 is read from v alone
        assert torch.allclose(d.eps_from_x0(x_t, t, x0)[keep], eps[keep], atol=1e-4)


# -- samplers --

def oracle(d, x0):
    """A perfect network for the single data point x0: returns the exact target at (x_t, t)."""
    def model_fn(x_t, t):
        if d.config.prediction == "eps":
            return d.eps_from_x0(x_t, t, x0)
        a = d.sqrt_alpha_bar[t].float().view(-1, 1, 1, 1, 1)
        s = d.sqrt_one_minus_alpha_bar[t].float().view(-1, 1, 1, 1, 1)
        return (a * x_t - x0) / s  # v = (a x_t - x0) / s, from x_t = a x0 + s eps
    return model_fn


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_with_oracle_model_recovers_x0(spacing):
    torch.manual_seed(0)
    d = Diffusion()
    x0 = torch.rand(2, 3, 4, 8, 8) * 1.6 - 0.8
    out = d.ddim_sample(oracle(d, x0), x0.shape, steps=20, spacing=spacing,
                        generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x0, atol=1e-4)


def test_ddpm_with_oracle_model_recovers_x0():
    torch.manual_seed(0)
    d = Diffusion(DiffusionConfig(timesteps=100))
    x0 = torch.rand(1, 3, 2, 4, 4) * 1.6 - 0.8
    out = d.ddpm_sample(oracle(d, x0), x0.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out, x0, atol=1e-3)


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not():
    d = Diffusion()

    def model_fn(x_t, t):
        return 0.5 * x_t

    def run(eta):
        return d.ddim_sample(model_fn, (1, 3, 2, 4, 4), steps=10, eta=eta,
                             generator=torch.Generator().manual_seed(7))

    assert torch.equal(run(0.0), run(0.0))
    assert not torch.equal(run(1.0), run(0.0))  # same start x_T, noise injected on the way


def test_sampling_timesteps_spacings():
    d = Diffusion()
    trailing = d.sampling_timesteps(50, "trailing")
    assert trailing[0].item() == 999 and trailing[-1].item() == 19 and len(trailing) == 50
    leading = d.sampling_timesteps(50, "leading")
    assert leading[0].item() == 980 and leading[-1].item() == 0
    with pytest.raises(ValueError):
        d.sampling_timesteps(0)


def test_guidance_scale_one_equals_conditional_prediction():
    torch.manual_seed(0)
    def model(x, t, ctx):
        return x * ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1) * 1e-3
    x = torch.randn(3, 3, 2, 4, 4)
    t = torch.tensor([5, 50, 500])
    cond, null = torch.randn(3, 6, 8), torch.zeros(3, 6, 8)
    guided = classifier_free_guidance(model, cond, null, 1.0)(x, t)
    assert torch.allclose(guided, model(x, t, cond), atol=1e-6)
    g9 = classifier_free_guidance(model, cond, null, 9.0)(x, t)
    expected = model(x, t, null) + 9.0 * (model(x, t, cond) - model(x, t, null))
    assert torch.allclose(g9, expected, atol=1e-5)
