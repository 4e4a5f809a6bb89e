"""train.py and sample.py end to end on a tiny Shapes run: branch mixes, exact resume, DDP with
gloo, a checkpoint driving sample.py, and clear errors on bad input."""

import faulthandler
import json
import os
import re
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

import sample
import train
import unet3d

TINY = ["--clip_steps", "3", "--clip_batch", "16", "--image_batch", "4", "--video_batch", "2",
        "--shapes.resolution", "16", "--shapes.frames", "4", "--clip.image_resolution", "16",
        "--clip.vision_patch_size", "8", "--clip.vision_layers", "1", "--clip.vision_width", "64",
        "--clip.transformer_layers", "1", "--clip.transformer_width", "32",
        "--clip.embed_dim", "16",
        "--unet.model_channels", "16", "--unet.temporal_conv_layers", "2",
        "--unet.channel_mult", "(1, 2)", "--unet.attention_levels", "(1,)",
        "--unet.num_groups", "8",
        "--precision", "fp32", "--warmup", "2", "--preview_every", "1000",
        "--preview_prompts", "", "--log_every", "1"]


def run(tmp_path, *extra, name="run"):
    configs = train.parse_args(TINY + ["--out", str(tmp_path / name), *extra])
    return train.train(configs)


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("branches,mode", [("content,motion", "cycle"),
                                           ("content,motion,paired", "random"),
                                           ("motion,paired", "cycle")])
def test_a_few_steps_of_each_branch_mix_train_and_log(tmp_path, branches, mode):
    model, ckpt = run(tmp_path, "--steps", "3", "--branches", branches, "--branch_mode", mode)
    assert os.path.exists(ckpt)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 3


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_n_plus_n_equals_2n(tmp_path, optimizer):
    flags = ["--ckpt_every", "2", "--branches", "content,motion,paired", "--optimizer", optimizer]
    full, _ = run(tmp_path, "--steps", "4", *flags, name="full")
    run(tmp_path, "--steps", "2", *flags, name="split")
    resumed, ckpt = run(tmp_path, "--steps", "4", "--resume", *flags, name="split")
    a, b = trainable_state(full), trainable_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    ema_full = torch.load(tmp_path / "full" / "ckpt_0000004.pt", weights_only=False)["ema"]
    ema_split = torch.load(ckpt, weights_only=False)["ema"]
    assert all(torch.allclose(ema_full[k], ema_split[k], atol=1e-6) for k in ema_full)


def test_ctrl_c_saves_a_checkpoint_at_that_step_and_resume_continues_exactly(tmp_path,
                                                                            monkeypatch):
    full, _ = run(tmp_path, "--steps", "5", "--ckpt_every", "100", name="full")
    lr_at, fired = train.lr_at, []

    def lr_at_with_ctrl_c(cfg, step):  # Ctrl-C arrives in the middle of step 2 (the third)
        if step == 2 and not fired:
            fired.append(step)
            signal.raise_signal(signal.SIGINT)
        return lr_at(cfg, step)

    monkeypatch.setattr(train, "lr_at", lr_at_with_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit, match="ckpt_0000003.pt holds step 3; continue with --resume"):
        run(tmp_path, "--steps", "5", "--ckpt_every", "100", name="split")
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    resumed, _ = run(tmp_path, "--steps", "5", "--ckpt_every", "100", "--resume", name="split")
    a, b = trainable_state(full), trainable_state(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, monkeypatch):
    lr_at = train.lr_at

    def lr_at_with_two_ctrl_c(cfg, step):
        if step == 1:
            signal.raise_signal(signal.SIGINT)  # the first asks for a checkpoint after the step
            signal.raise_signal(signal.SIGINT)  # the second stops before the step ends
        return lr_at(cfg, step)

    monkeypatch.setattr(train, "lr_at", lr_at_with_two_ctrl_c)
    monkeypatch.setattr(train, "set_backend_flags", lambda: None)  # process-wide flags
    with pytest.raises(SystemExit, match="^interrupted: stopped at once") as e:
        train.main(TINY + ["--out", str(tmp_path / "run"), "--steps", "3", "--ckpt_every", "1"])
    assert "\n" not in str(e.value)
    assert [os.path.basename(p) for p in train.tft2v.checkpoints(tmp_path / "run")] == [
        "ckpt_0000001.pt"]  # the step-1 checkpoint stays; none for the interrupted step


def test_ema_update_is_a_lerp_towards_the_weights():
    ema, weights = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.full((2,), 3.0)]
    train.ema_update(ema, weights, 0.9)
    assert torch.allclose(ema[0], torch.full((3,), 0.1))
    assert torch.allclose(ema[1], torch.full((2,), 1.2))


def test_make_optimizer_is_fused_on_torch_2_4_and_steps_like_plain_adamw():
    torch.manual_seed(0)
    weights = [torch.randn(5, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    twins = [w.detach().clone().requires_grad_() for w in weights]
    start = [w.detach().clone() for w in weights]
    opt = train.make_optimizer(weights, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=False)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert opt.defaults["fused"]
    for _ in range(3):
        for ws, o in ((weights, opt), (twins, plain)):
            o.zero_grad()
            sum((w ** 2).sum() for w in ws).backward()
            o.step()
    for w, t, s in zip(weights, twins, start):
        assert not torch.equal(w.detach(), s)
        assert torch.allclose(w, t, atol=1e-6), (w - t).abs().max()


def test_newton_schulz_gives_near_orthogonal_matrices_of_any_shape():
    gen = torch.Generator().manual_seed(0)
    u0 = torch.linalg.qr(torch.randn(3, 6, 6, generator=gen))[0]
    v0 = torch.linalg.qr(torch.randn(3, 20, 6, generator=gen))[0]
    g = u0 @ torch.diag(torch.logspace(0, -1.5, 6)) @ v0.mT  # singular values 1 ... 0.03
    for x in (g, g.mT):  # wide and tall
        u = train.newton_schulz(x)
        assert u.shape == x.shape
        s = torch.linalg.svdvals(u)  # every singular value pulled from its spread towards 1
        assert s.min() > 0.6 and s.max() < 1.25, s
        assert torch.allclose(u @ u.mT if u.shape[-2] < u.shape[-1] else u.mT @ u,
                              torch.eye(6).expand(3, 6, 6), atol=0.5)


@pytest.mark.parametrize("shape", [(4, 6, 8), (4, 6, 20), (4, 20, 6)])  # x-steps, Gram, tall
def test_newton_schulz_matches_the_plain_iteration(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = g / g.norm(dim=(-2, -1), keepdim=True)
    x = x.mT if shape[-2] > shape[-1] else x
    for _ in range(5):  # Jordan et al.'s quintic step on x itself
        gram = x @ x.mT
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    x = x.mT if shape[-2] > shape[-1] else x
    assert torch.allclose(train.newton_schulz(g), x, atol=1e-9)


def test_muon_orthogonalises_each_matrix_on_its_own_in_a_shared_batch():
    # a wide 4 x 8, a tall 8 x 4 and a 4 x 8 x 1 x 1 kernel share one batch of 4 x 8 matrices
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen))
              for s in ((4, 8), (8, 4), (4, 8, 1, 1), (6, 6))]
    start = [p.detach().clone() for p in params]
    opt = train.Muon(params, lr=0.1, momentum=0.5)
    opt.step()  # no gradients yet: nothing moves
    assert all(torch.equal(p, s) for p, s in zip(params, start)) and not opt.state
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(2)]
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    for i, (p, w) in enumerate(zip(params, start)):  # the same two steps, each matrix alone
        w, buf = w.double(), torch.zeros(p.shape, dtype=torch.float64)
        for step in grads:
            buf = 0.5 * buf + step[i].double()
            m = (step[i].double() + 0.5 * buf).reshape(p.shape[0], -1)[None]  # Nesterov
            u = train.newton_schulz(m)[0] * 0.2 * max(m.shape[-2:]) ** 0.5
            w = w - 0.1 * u.reshape(p.shape)
        assert torch.allclose(p.detach().double(), w, atol=1e-5), (p.shape, (p - w).abs().max())


def test_muon_steps_every_weight_matrix_with_an_orthogonal_update_of_adamw_size():
    lin = torch.nn.Linear(8, 4)  # weight: Muon; bias: AdamW
    model = torch.nn.Module()
    model.proj = lin
    model.unet = unet3d.UNet3D(unet3d.UNetConfig(
        model_channels=8, channel_mult=(1,), attention_levels=(), num_groups=4, context_dim=8))
    model.unet.time_embed.requires_grad_(False)  # frozen: in neither optimiser
    edges = {id(model.unet.conv_in.weight), id(model.unet.out[-1].weight)}  # pixels: AdamW
    opt = train.MuonAdamW(model, lr=1e-2)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    for p in model.parameters():
        if not p.requires_grad:
            assert id(p) not in muon | adamw
        else:
            assert (id(p) in muon) == (p.ndim >= 2 and id(p) not in edges), p.shape
            assert (id(p) in adamw) != (id(p) in muon)
    assert len(opt.param_groups) == 2
    before = lin.weight.detach().clone()
    y = torch.randn(5, 4)  # a full-rank gradient for the 4 x 8 weight
    (((lin(torch.randn(5, 8)) - y) ** 2).sum() + model.unet.conv_in.weight.sum()).backward()
    opt.step()
    step = (before - lin.weight.detach()) / 1e-2  # lr * 0.2 sqrt(8) * about-orthogonal rows
    s = torch.linalg.svdvals(step / (0.2 * 8 ** 0.5))
    assert s.min() > 0.6 and s.max() < 1.25, s
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]


def test_checkpoint_seconds_add_up_over_resumes(tmp_path):
    _, ckpt = run(tmp_path, "--steps", "1")
    state = torch.load(ckpt, weights_only=False)
    assert state["seconds"] > 0
    state["seconds"] = 1000.0  # as if the first invocation had taken 1000 s
    torch.save(state, ckpt)
    t0 = time.time()
    _, resumed = run(tmp_path, "--steps", "2", "--resume")
    elapsed = time.time() - t0
    assert 1000 < torch.load(resumed, weights_only=False)["seconds"] <= 1000 + elapsed


def test_fit_steps_fills_the_budget_with_steps_previews_and_samples():
    cfg = train.TrainConfig(steps=10_000, time_budget=1.0, preview_every=100)
    for sample_s in (0.0, 0.05):
        n = train.fit_steps(cfg, 30, 10.0, 0.1, sample_s, cfg.steps)  # 50 s left at 0.1 s a step

        def seconds(steps):  # what the rest of the run takes with `steps` more steps
            previews = steps // cfg.preview_every * train.PREVIEW_STEPS * sample_s
            final = train.FINAL_STEPS * len(train.FINAL_SEEDS) * sample_s
            return steps * 0.1 + previews + final
        assert 0.95 * 50 <= seconds(n - 30) <= 50
    assert train.fit_steps(cfg, 30, 10.0, 0.1, 0.05, 10_000) < train.fit_steps(
        cfg, 30, 10.0, 0.1, 0.0, 10_000)
    assert train.fit_steps(cfg, 30, 1.0, 0.001, 0.0, 10_000) == 10_000  # it all fits: unchanged
    assert train.fit_steps(cfg, 30, 1.0, 0.001, 0.0, 400) == 400  # never past the planned steps
    assert train.fit_steps(cfg, 30, 70.0, 0.1, 0.0, 10_000) == 31  # spent: this step, then stop


def test_budget_ema_decay_shortens_the_window_with_the_cube_of_the_cut():
    for decay in (0.999, 0.3):  # not cut: exactly the configured decay (1 - (1 - 0.3) != 0.3)
        assert train.budget_ema_decay(decay, 5400, 5400) == decay
    # half the steps: a window of 1,000 steps becomes 125, a quarter of its share of the run
    assert train.budget_ema_decay(0.999, 5400, 2700) == pytest.approx(0.992)
    assert train.budget_ema_decay(0.999, 5400, 4800) > train.budget_ema_decay(0.999, 5400, 2430)
    assert train.budget_ema_decay(0.999, 5400, 2) == 0.0  # shorter than the window: raw weights
    assert train.budget_ema_decay(0.0, 5400, 100) == 0.0


def record_ema_decays(monkeypatch):
    """The decay of every EMA update train.py makes from here on, in order."""
    decays, ema_update = [], train.ema_update

    def recording(ema_tensors, params, decay):
        decays.append(decay)
        ema_update(ema_tensors, params, decay)
    monkeypatch.setattr(train, "ema_update", recording)
    return decays


def fit_early(monkeypatch, at=6):
    """The budget's first fit times steps 2 .. `at`, not 10 .. 30: the same code, fewer steps."""
    monkeypatch.setattr(train, "FIT_FROM", 2)
    monkeypatch.setattr(train, "FIT_AT", at)


def test_time_budget_fixes_the_steps_after_warm_up_and_resume_keeps_them(tmp_path, monkeypatch,
                                                                         capsys):
    fit_early(monkeypatch)
    decays = record_ema_decays(monkeypatch)
    # TINY warms up for 2 steps, so the budget times steps 2-6 and decides at step 6
    _, ckpt = run(tmp_path, "--steps", "12", "--time_budget", "1e-6", "--ckpt_every", "100")
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == state["fitted_steps"] == state["configs"]["train"]["steps"] == 7
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 7
    cut = train.budget_ema_decay(0.999, 12, 7)  # the EMA shrinks with the run: 0.99496
    assert decays == [0.999] * 6 + [cut] and state["configs"]["train"]["ema_decay"] == cut
    out = capsys.readouterr().out
    assert "7 of 12 steps fit" in out
    assert "EMA decay 0.999 -> 0.99496 (a window of ~198 steps)" in out
    _, again = run(tmp_path, "--steps", "12", "--time_budget", "1e-6", "--resume")
    assert again == ckpt  # nothing left to train
    decays.clear()
    _, longer = run(tmp_path, "--steps", "9", "--time_budget", "0", "--resume")
    assert longer.endswith("ckpt_0000009.pt")
    assert decays == [0.999, 0.999]  # no budget: the configured decay
    _, wide = run(tmp_path, "--steps", "12", "--time_budget", "100", "--max_steps", "0",
                  name="wide")
    state = torch.load(wide, weights_only=False)
    assert state["step"] == state["fitted_steps"] == 12  # it fits: unchanged
    assert state["configs"]["train"]["ema_decay"] == 0.999


def test_time_budget_raises_the_steps_up_to_max_steps_on_a_fast_machine(tmp_path, monkeypatch,
                                                                        capsys):
    fit_early(monkeypatch)
    decays = record_ema_decays(monkeypatch)
    _, ckpt = run(tmp_path, "--steps", "10", "--max_steps", "16", "--time_budget", "100",
                  "--ckpt_every", "100")
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == state["fitted_steps"] == state["configs"]["train"]["steps"] == 16
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 16
    assert decays == [0.999] * 16  # a longer run keeps the configured EMA
    assert "16 steps fit, more than the 10 planned (--max_steps 16;" in capsys.readouterr().out
    seen = []  # below --steps, --max_steps changes nothing: the fits stop at --steps
    monkeypatch.setattr(train, "fit_steps", lambda cfg, step, el, s_s, sa_s, most: (
        seen.append(most), most)[1])
    _, ckpt = run(tmp_path, "--steps", "10", "--max_steps", "5", "--time_budget", "100",
                  name="low")
    assert seen == [10] and ckpt.endswith("ckpt_0000010.pt")


def test_time_budget_fits_again_every_refit_every_steps_at_the_pace_since_its_last_fit(
        tmp_path, monkeypatch):
    fit_early(monkeypatch, at=8)
    monkeypatch.setattr(train, "REFIT_EVERY", 4)
    counts, calls = iter([14, 20, 17]), []  # fit at step 8, then at 12 (grows) and 16 (shrinks)

    def fit_steps(cfg, step, elapsed, step_s, sample_s, most):
        calls.append((step, step_s, most))
        return next(counts)
    monkeypatch.setattr(train, "fit_steps", fit_steps)
    monkeypatch.setattr(train, "sample_step_seconds", lambda *args: 0.0)
    lr_at = train.lr_at  # from step 8 on, every step takes 2 x 0.02 s longer (two lr_at calls)
    monkeypatch.setattr(train, "lr_at", lambda cfg, step: (
        time.sleep(0.02) if step >= 8 else None, lr_at(cfg, step))[1])
    monkeypatch.setattr(train, "write_samples", lambda *args, **kwargs: (  # a 1-s preview
        time.sleep(1.0) if "previews" in args[4] else None, [])[1])
    decays = record_ema_decays(monkeypatch)
    _, ckpt = run(tmp_path, "--steps", "20", "--time_budget", "1", "--ckpt_every", "100",
                  "--preview_every", "10", "--preview_prompts", "a red circle", "--max_steps", "0")
    assert [(step, most) for step, _, most in calls] == [(8, 20), (12, 20), (16, 20)]
    # the pace since the last fit, without the preview after step 10 (it would add 0.25 s a step)
    assert 0.04 <= calls[1][1] < 0.2
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == state["fitted_steps"] == 17
    d = [train.budget_ema_decay(0.999, 20, n) for n in (14, 20, 17)]
    assert decays == [0.999] * 8 + [d[0]] * 4 + [d[1]] * 4 + [d[2]] * 1
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    cfg = train.TrainConfig(**state["configs"]["train"])
    assert cfg.steps == 17 and log[-1]["lr"] == pytest.approx(lr_at(cfg, 16))  # its cosine's end


def test_resuming_a_budget_cut_run_keeps_its_ema_decay(tmp_path, monkeypatch):
    fit_early(monkeypatch)
    monkeypatch.setattr(train, "fit_steps", lambda *args: 10)  # the budget cuts 16 steps to 10
    decays = record_ema_decays(monkeypatch)
    run(tmp_path, "--steps", "16", "--time_budget", "1", "--ckpt_every", "8")
    decays.clear()
    os.remove(tmp_path / "run" / "ckpt_0000010.pt")  # resume from step 8, after the cut at 6
    _, ckpt = run(tmp_path, "--steps", "16", "--time_budget", "1", "--resume")
    assert ckpt.endswith("ckpt_0000010.pt")
    assert decays == [train.budget_ema_decay(0.999, 16, 10)] * 2


def test_existing_run_folder_needs_resume_and_same_config(tmp_path):
    run(tmp_path, "--steps", "1")
    with pytest.raises(SystemExit, match="--resume"):
        run(tmp_path, "--steps", "2")
    with pytest.raises(SystemExit, match="other unet settings"):
        run(tmp_path, "--steps", "2", "--resume", "--unet.model_channels", "8")
    with pytest.raises(SystemExit, match="trained with --optimizer muon; resume it with the same"):
        run(tmp_path, "--steps", "2", "--resume", "--optimizer", "adamw")  # quick's is muon


def test_checkpoint_from_before_a_new_config_field_still_resumes(tmp_path):
    _, ckpt = run(tmp_path, "--steps", "1")
    state = torch.load(ckpt, weights_only=False)
    del state["configs"]["unet"]["condition_channels"], state["configs"]["tft2v"]["conditions"]
    del state["seconds"]
    torch.save(state, ckpt)  # as written by a version without compositional synthesis
    _, resumed = run(tmp_path, "--steps", "2", "--resume")
    assert resumed.endswith("ckpt_0000002.pt")
    with pytest.raises(SystemExit, match="other unet settings"):
        run(tmp_path, "--steps", "3", "--resume", "--unet.condition_channels", "2")


def test_command_line_values_are_type_checked(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--steps", "many"])
    assert "expected int" in capsys.readouterr().err
    configs = train.parse_args(["--preset", "toy", "--tft2v.coherence_weight", "0",
                                "--unet.channel_mult", "(1, 2)"])
    assert configs["tft2v"].coherence_weight == 0.0 and configs["unet"].channel_mult == (1, 2)
    assert "paired" in configs["train"].branches  # the toy preset is semi-supervised
    with pytest.raises(SystemExit):
        train.parse_args(["--unet.channel_mult", "(1, 2"])
    assert "expected a Python tuple" in capsys.readouterr().err


@pytest.mark.parametrize("bad,message", [
    (["--steps", "-1"], "--steps must be positive"),
    (["--video_batch", "0"], "--video_batch must be positive"),
    (["--ema_decay", "1.5"], "--ema_decay must be in"),
    (["--time_budget", "-1"], "--time_budget must be at least 0"),
    (["--max_steps", "-5"], "--max_steps must be at least 0"),
    (["--branches", "content,videos"], "--branches takes content, motion and paired"),
    (["--branch_mode", "sometimes"], "--branch_mode must be"),
    (["--optimizer", "sgd"], "--optimizer must be adamw or muon"),
    (["--precision", "fp16"], "unknown precision"),
    (["--device", "tpu"], "unknown device"),
    (["--shapes.resolution", "18"], "must be a multiple of 4"),
    (["--shapes.frames", "1"], "2 or more frames"),
    (["--unet.num_groups", "5"], "--unet.* settings do not make a model: num_channels"),
    (["--clip.transformer_width", "30"], "--clip.* settings do not make a model"),
    (["--unet.context_maps", "-1"], "context_maps must be 0 or more"),
    (["--images_dir", "/nonexistent"], "no captions file"),
    (["--videos_dir", "/nonexistent"], "no such folder"),
    (["--out", "/proc/forbidden"], "cannot write to the run folder"),
])
def test_bad_settings_stop_with_one_line_before_any_work(tmp_path, monkeypatch, bad, message):
    """Each fails in check_configs or on its folders, before the CLIP stage starts."""
    monkeypatch.setattr(train.clip_tiny, "train_clip", lambda *a, **k: pytest.fail("trained"))
    opts = TINY + ["--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=f"^error: .*{re.escape(message)}") as e:
        train.train(train.parse_args(opts + bad))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags,trails", [(["--branches", "content,motion,paired"], True),
                                          (["--branches", "content,motion"], False),
                                          (["--branches", "content,paired", "--clip_trails",
                                            "false"], False)])
def test_the_clip_stage_sees_captioned_clips_when_the_paired_branch_trains(
        tmp_path, monkeypatch, flags, trails):
    seen = {}

    def fake_train_clip(data, *args, videos=None, **kwargs):
        seen["videos"] = videos
        raise KeyboardInterrupt  # stop before the diffusion stage

    monkeypatch.setattr(train.clip_tiny, "train_clip", fake_train_clip)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *flags)
    assert (seen["videos"] is not None) == trails
    if trails:
        assert seen["videos"].kind == "paired"


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="^error: non-finite loss .*; no checkpoint was written"):
        run(tmp_path, "--steps", "3", "--lr", "1e30", "--grad_clip", "1e30")


def _join_two_process_group(rank, port, timeout):
    """A spawned worker's set-up: rank `rank` of 2 on localhost, one thread; a rank still running
    after `timeout` s (e.g. waiting on a peer) prints where it is and exits, failing the test."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(timeout, exit=True)


def _ddp_replicas(rank, tmp, result):
    model, _ = train.train(train.parse_args(TINY + [
        "--out", tmp, "--steps", "3", "--branches", "content,motion", "--branch_mode", "rank"]))
    torch.save(trainable_state(model), os.path.join(result, f"rank{rank}.pt"))


def _ddp_budget(rank, tmp, result):
    # rank 0 fits 12 steps, then 10; were rank 1 to keep its own 16, the ranks would part at 10
    counts = iter([12, 10]) if rank == 0 else iter([16, 16])
    kept = train.FIT_FROM, train.FIT_AT, train.REFIT_EVERY, train.fit_steps
    train.FIT_FROM, train.FIT_AT, train.REFIT_EVERY = 2, 6, 4  # a fit at step 6, a re-fit at 8
    train.fit_steps = lambda *args: next(counts)
    try:
        train.train(train.parse_args(TINY + ["--out", tmp, "--steps", "16", "--time_budget",
                                             "1", "--ckpt_every", "100"]))
    finally:
        train.FIT_FROM, train.FIT_AT, train.REFIT_EVERY, train.fit_steps = kept


def _ddp_nan(rank, tmp, result):
    calls, motion_loss = [], train.tft2v.TFT2V.motion_loss

    def nan_on_second_call(self, *args, **kwargs):
        calls.append(1)
        loss, parts = motion_loss(self, *args, **kwargs)
        return (loss * float("nan") if len(calls) == 2 else loss), parts
    if rank == 1:  # the motion rank's loss turns NaN at its second step
        train.tft2v.TFT2V.motion_loss = nan_on_second_call
    try:
        train.train(train.parse_args(TINY + ["--out", tmp, "--steps", "4", "--branches",
                                             "content,motion", "--branch_mode", "rank"]))
        message = "finished"
    except SystemExit as e:
        message = str(e)
    finally:
        train.tft2v.TFT2V.motion_loss = motion_loss
    with open(os.path.join(result, f"rank{rank}.txt"), "w") as f:
        f.write(message)


DDP_CASES = {"replicas": _ddp_replicas, "budget": _ddp_budget, "nan": _ddp_nan}


def _ddp_worker(rank, ports, folder):
    """Every DDP case in turn, each in a process group of its own on its own port, in one pair of
    processes: a spawn costs ~5 s of imports and first-step set-up on a 2-core CPU."""
    for (name, case), port in zip(DDP_CASES.items(), ports):
        _join_two_process_group(rank, port, timeout=120)  # a rank left waiting fails the tests
        result = os.path.join(folder, name)
        case(rank, os.path.join(result, "run"), result)
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ddp_cases(tmp_path_factory):
    """Run the DDP cases in 2 processes on free local ports; each case's folder by its name."""
    folder = tmp_path_factory.mktemp("ddp")
    sockets = [socket.socket() for _ in DDP_CASES]  # all open at once: three different ports
    for s, name in zip(sockets, DDP_CASES):
        s.bind(("127.0.0.1", 0))
        (folder / name).mkdir()
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    mp.spawn(_ddp_worker, args=(ports, str(folder)), nprocs=2)
    return folder


def test_two_process_gloo_ddp_keeps_replicas_identical(ddp_cases):
    folder = ddp_cases / "replicas"
    r0, r1 = (torch.load(folder / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    start = torch.load(folder / "run" / "ckpt_0000003.pt", weights_only=False)
    assert start["step"] == 3 and len(start["ranks"]) == 2


def test_under_ddp_every_rank_takes_rank_0s_time_budget_steps(ddp_cases):
    assert [os.path.basename(p) for p in train.tft2v.checkpoints(ddp_cases / "budget" / "run")
            ] == ["ckpt_0000010.pt"]


def test_non_finite_loss_on_one_ddp_rank_stops_every_rank(ddp_cases):
    r0, r1 = ((ddp_cases / "nan" / f"rank{r}.txt").read_text() for r in (0, 1))
    assert r1.startswith("error: non-finite loss (nan) at step 1 on the motion branch")
    assert r0.startswith("error: non-finite loss on another process at step 1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    _, path = train.train(train.parse_args(TINY + ["--out", str(tmp / "run"), "--steps", "2"]))
    return path


def test_checkpoint_drives_sample_py_and_same_seed_gives_same_video(checkpoint, tmp_path,
                                                                     capsys):
    args = ["--ckpt", checkpoint, "--prompt", "a big red circle moving right", "--prompt", "",
            "--steps", "3", "--seed", "3"]
    a = sample.main(args + ["--out", str(tmp_path / "a.gif")])
    b = sample.main(args + ["--out", str(tmp_path / "strip.png")])
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "a_00.gif") in printed and str(tmp_path / "strip.png") in printed
    assert (tmp_path / "a_01.gif").exists() and (tmp_path / "strip.png").exists()
    assert a.shape == (2, 3, 4, 16, 16) and torch.equal(a, b)


def test_sample_py_compile_draws_the_same_video_through_a_compiled_unet(checkpoint, tmp_path,
                                                                        monkeypatch):
    """--compile puts the UNet's forward under torch.compile (inductor; its speed is measured in
    README), here through the "eager" backend, which traces the same graph through
    torch._dynamo in seconds rather than minutes. Same checkpoint, prompt and seed: the same
    video."""
    asked = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (
        asked.append(kw), real_compile(fn, **dict(kw, backend="eager")))[1])
    counters.clear()
    args = ["--ckpt", checkpoint, "--prompt", "a big red circle moving right", "--steps", "2",
            "--out", str(tmp_path / "v.gif")]
    eager = sample.main(args)
    assert asked == [] and counters["stats"]["unique_graphs"] == 0
    compiled = sample.main(args + ["--compile"])
    assert asked == [dict(dynamic=False)]  # inductor, torch's default
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the UNet's forward
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("program", ["sample", "train"])
def test_compile_that_cannot_build_the_graph_is_a_one_line_error(program, checkpoint, tmp_path,
                                                                 monkeypatch):
    """--compile where torch.compile fails at the first call (here: inductor finds no C++
    compiler, as on a CPU without one) stops sample.py and train.py with one line naming the
    cause, not torch's traceback."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InvalidCxxCompiler

    def compile_without_a_cxx(fn, **kwargs):
        def call(*args, **kw):
            raise BackendCompilerFailed("inductor", InvalidCxxCompiler(), None)
        return call
    monkeypatch.setattr(torch, "compile", compile_without_a_cxx)
    monkeypatch.setattr(train, "set_backend_flags", lambda: None)  # process-wide flags
    with pytest.raises(SystemExit, match=r"^error: --compile could not compile the UNet "
                                         r"\(InvalidCxxCompiler: No working C\+\+ compiler") as e:
        if program == "sample":
            sample.main(["--ckpt", checkpoint, "--prompt", "a big red circle", "--steps", "2",
                         "--compile", "--out", str(tmp_path / "v.gif")])
        else:
            train.main(TINY + ["--out", str(tmp_path / "run"), "--steps", "2", "--compile"])
    assert "\n" not in str(e.value)


def test_sample_py_run_folder_and_image_conditioning(checkpoint, tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    v = sample.main(["--ckpt", os.path.dirname(checkpoint), "--image", str(tmp_path / "red.png"),
                     "--steps", "2", "--frames", "3", "--out", str(tmp_path / "v.gif")])
    assert v.shape == (1, 3, 3, 16, 16)


@pytest.mark.parametrize("bad,message", [
    (["--ckpt", "/nonexistent/ckpt.pt"], "no checkpoint"),
    (["--steps", "-1"], "--steps must be positive"),
    (["--out", "/proc/forbidden/x.gif"], "output folder"),
    (["--out", "/proc/x.gif"], "cannot write to the output folder /proc"),
    (["--out", "x.avi"], "must end in"),
    (["--frames", "0"], "--frames must be positive"),
    (["--size", "10"], "--size must be a multiple of 4"),
    (["--fps", "0"], "--fps must be positive"),
    (["--eta", "-0.5"], "--eta must be at least 0"),
    (["--eta", "nan"], "--eta must be at least 0"),
    (["--eta", "inf"], "--eta must be at least 0"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "cannot read --prompts-file"),
    (["--sampler", "ddpm"], "--steps is for ddim"),
])
def test_sample_py_bad_input_gives_one_line_error(checkpoint, tmp_path, bad, message):
    opts = {"--ckpt": checkpoint, "--prompt": "a red circle", "--steps": "2",
            "--out": str(tmp_path / "x.gif")}
    opts.update(zip(bad[::2], bad[1::2]))
    with pytest.raises(SystemExit, match=message):
        sample.main([item for pair in opts.items() for item in pair])


def test_eval_py_probe_reads_a_train_py_checkpoint_and_writes_both_tables(checkpoint, tmp_path,
                                                                          capsys):
    import eval as evaluation
    losses, travel = evaluation.main([checkpoint, "--probe", "--out", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert "| wrong direction |" in out and "| a big red square moving |" in out
    assert "| lowest possible, own caption |" in out  # zero terminal SNR: the t = T floor
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["floor_at_T"]["own caption"] < saved["floor_at_T"]["no direction"]
    assert saved["losses"] == losses and len(losses["own caption"]) == 5
    assert {k: tuple(v) for k, v in saved["travel"].items()} == travel


def test_eval_py_scores_a_suite_and_writes_its_table_and_its_videos(checkpoint, tmp_path):
    import eval as evaluation
    from data.video import GAP, read_video
    evaluation.main([checkpoint, "--suite", "demo", "--seeds", "1", "--steps", "2",
                     "--out", str(tmp_path / "e")])
    saved = json.loads((tmp_path / "e.json").read_text())
    assert len(saved["rows"]) == 4 and saved["summary"]["generated"]["videos"] == 4
    assert "| generated, all |" in (tmp_path / "e.md").read_text()
    assert "](e.gif)" in (tmp_path / "e.md").read_text()  # the table shows what it scored
    tile = 2 * (16 + 2)
    assert read_video(str(tmp_path / "e.gif")).shape[1:] == (tile, 4 * tile + 3 * GAP, 3)


def test_eval_py_bad_input_stops_before_generating(checkpoint, monkeypatch):
    import eval as evaluation
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(SystemExit, match="must be positive"):
        evaluation.main([checkpoint, "--seeds", "0"])
    with pytest.raises(SystemExit, match="--guidance must be a finite number, got nan"):
        evaluation.main([checkpoint, "--guidance", "nan"])
    with pytest.raises(SystemExit, match="cannot write to the output folder /proc/forbidden"):
        evaluation.main([checkpoint, "--out", "/proc/forbidden/scores"])


def test_sample_py_rejects_a_foreign_checkpoint(checkpoint, tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a tft2v checkpoint"):
        sample.main(["--ckpt", str(tmp_path / "other.pt"), "--prompt", "x"])
    state = torch.load(checkpoint, weights_only=False)  # our format, another version's config
    state["configs"]["unet"]["retired_setting"] = 1
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="another version or config"):
        sample.main(["--ckpt", str(tmp_path / "old.pt"), "--prompt", "x"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable"):
        sample.main(["--ckpt", str(tmp_path / "junk.pt"), "--prompt", "x"])


def test_over_long_prompt_is_truncated_with_a_warning(checkpoint, tmp_path, capsys):
    long_prompt = " ".join(["a big red circle moving right"] * 20)
    sample.main(["--ckpt", checkpoint, "--prompt", long_prompt, "--steps", "2",
                 "--out", str(tmp_path / "long.gif")])
    assert "truncated" in capsys.readouterr().err
