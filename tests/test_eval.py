"""eval.py: prompt suites, per-video hits against measure, the summary, frame consistency and
Frechet distances in CLIP space."""

import json
import random
import re
import shlex

import pytest
import torch

import clip_tiny
import eval as evaluation
from data import shapes


def test_real_clips_of_every_direction_prompt_score_full_marks():
    suite = evaluation.prompt_suite("directions", shapes.ShapesConfig())
    assert len(suite) == len(shapes.all_combinations()) * len(shapes.DIRECTIONS)
    wants = [want for _, want in suite]
    videos = shapes.render_batch([w["colour"] for w in wants], [w["shape"] for w in wants],
                                 [w["size"] for w in wants], [w["direction"] for w in wants],
                                 seeds=list(range(len(wants))))
    rows = [{"held_out": w["held_out"], "hits": evaluation.score(m, w)}
            for w, m in zip(wants, shapes.measure(videos))]
    summary = evaluation.summarize(rows)
    assert summary["all"] == {k: 1.0 for k in ("colour", "direction", "moving", "shape", "size")}
    assert summary["held_out"] and summary["seen"]


def test_a_static_clip_is_not_moving_and_a_wrong_colour_is_a_miss():
    (prompt, want), = [p for p in evaluation.prompt_suite("demo", shapes.ShapesConfig())
                       if p[0] == "a big red circle"]
    static = shapes.render("blue", "circle", "big", "static")
    hits = evaluation.score(shapes.measure(static), want)
    assert hits == {"colour": 0.0, "shape": 1.0, "size": 1.0, "moving": 0.0}


def test_summary_separates_held_out_prompts():
    rows = [{"held_out": True, "hits": {"colour": 1.0}},
            {"held_out": False, "hits": {"colour": 0.0}}]
    s = evaluation.summarize(rows)
    assert s["held_out"]["colour"] == 1.0 and s["seen"]["colour"] == 0.0
    assert s["all"]["colour"] == pytest.approx(0.5)


def test_confusion_counts_what_was_read_for_each_prompted_value_and_the_markdown_shows_it():
    suite = evaluation.prompt_suite("demo", shapes.ShapesConfig())  # 2 circles, square, triangle
    drawn = {"a big red circle": ("red", "circle", "big", "right"),
             "a small blue square": ("blue", "circle", "small", "right"),
             "a big blue circle": ("blue", "circle", "big", "right"),
             "a small yellow triangle": ("red", "triangle", "small", "right")}
    clips = shapes.render_batch(*zip(*[drawn[p] for p, _ in suite]), seeds=[0, 1, 2, 3])
    clips[2] = -1  # the big blue circle: a black clip, no object
    rows, _ = evaluation.score_videos(suite, 1, clips)
    read = evaluation.confusion(rows)
    assert read["shape"] == {"circle": {"circle": 1, "none": 1}, "square": {"circle": 1},
                             "triangle": {"triangle": 1}}
    assert read["colour"] == {"red": {"red": 1}, "blue": {"blue": 1, "none": 1},
                              "yellow": {"red": 1}}
    assert "direction" not in read  # no demo prompt names one
    gen = {"all": {"shape": 0.5}, "seen": {}, "held_out": {}, "videos": 4,
           "seconds_per_video": 1.0, "read": read} | {k: 0.0 for k, _, _ in evaluation.QUALITY}
    table = evaluation.markdown({"generated": gen, "real": gen}, "demo")
    assert "| prompted shape, read as: | circle | square | triangle | none |" in table
    assert "| square | 1 | 0 | 0 | 0 |" in table and "| circle | 1 | 0 | 0 | 1 |" in table


def test_demo_suite_marks_the_held_out_blue_circle():
    suite = dict(evaluation.prompt_suite("demo", shapes.ShapesConfig()))
    assert suite["a big blue circle"]["held_out"] and not suite["a big red circle"]["held_out"]


def test_contact_sheet_puts_a_prompts_seeds_in_a_row_and_frames_a_miss_red(tmp_path):
    from data.video import GAP, read_video
    seeds = 3  # seed-major, as generated: video i is prompt i % 2 (red, green), seed i // 2
    videos = shapes.render_batch(["red", "green"] * seeds, ["square"] * 6, ["big"] * 6,
                                 ["static"] * 6, list(range(6)), frames=2, resolution=16)
    rows = [{"hits": {"colour": 1.0, "shape": float(i != 3)}} for i in range(6)]
    frames = read_video(evaluation.contact_sheet(str(tmp_path / "s.gif"), videos, rows, seeds))
    tile = 2 * (16 + 2)  # the frame of one pixel around each video, enlarged twice
    assert frames.shape[1:] == (tile, 6 * tile + 5 * GAP, 3)  # one row: 2 prompts x 3 seeds
    tiles = [frames[0, :, i * (tile + GAP): i * (tile + GAP) + tile].astype(int)
             for i in range(6)]
    inside = [t[2:-2, 2:-2].sum(axis=(0, 1)) for t in tiles]
    assert [int(rgb[0] > rgb[1]) for rgb in inside] == [1, 1, 1, 0, 0, 0]  # red prompt first
    border = [t[0, tile // 2] for t in tiles]  # video 3 is the green prompt's second seed
    assert [int(rgb[0] > 150 and rgb[1] < 50) for rgb in border] == [0, 0, 0, 0, 1, 0]
    assert all(rgb[1] > 150 and rgb[0] < 50 for i, rgb in enumerate(border) if i != 4)


# -- consistency and Frechet distances --

def test_frechet_distance_is_zero_for_identical_sets_and_exact_for_shifts_and_scales():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g)
    assert abs(evaluation.frechet_distance(a, a)) < 1e-8
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    # equal covariances: only the means differ
    assert evaluation.frechet_distance(a, a + shift) == pytest.approx(shift.pow(2).sum().item())
    # b = 2 (a - mean): Tr(C + 4C - 2 * 2C) + |mean|^2
    centred = a - a.mean(0)
    expected = torch.cov(a.T.double()).trace().item() + a.mean(0).double().pow(2).sum().item()
    assert evaluation.frechet_distance(a, 2 * centred) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return clip_tiny.CLIP(clip_tiny.PRESETS["tiny"]).eval()


def test_a_steady_clip_is_fully_consistent_and_a_colour_shift_lowers_consistency(clip):
    steady = shapes.render("red", "circle", "big", "static")
    shifted = steady.clone()
    shifted[:, 4:] = shapes.render("blue", "circle", "big", "static")[:, 4:]
    c = evaluation.frame_consistency(evaluation.frame_embeddings(clip, torch.stack([steady,
                                                                                    shifted])))
    assert c[0] == pytest.approx(1.0, abs=1e-5)
    assert c[1] < c[0] - 1e-3


def test_real_clips_score_full_marks_and_beat_corrupted_clips_on_both_frechet_distances(clip):
    suite = evaluation.prompt_suite("full", shapes.ShapesConfig())[::4]  # 12 prompts
    config = shapes.ShapesConfig()
    reference = evaluation.frame_embeddings(clip, evaluation.render_suite(suite, 2, config, 500))
    real = evaluation.render_suite(suite, 2, config, 100)
    rows, measured = evaluation.score_videos(suite, 2, real)
    summary = evaluation.summarize(rows)["all"]
    assert {k: summary[k] for k in ("colour", "shape", "size", "moving")} == {
        "colour": 1.0, "shape": 1.0, "size": 1.0, "moving": 1.0}
    noisy = (real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0)))
    noisy = noisy.clamp(-1, 1)
    good = evaluation.quality(clip, real, measured, reference)
    bad = evaluation.quality(clip, noisy, shapes.measure(noisy), reference)
    assert good["fd_frames"] < bad["fd_frames"] and good["fd_clips"] < bad["fd_clips"]
    assert good["frame_consistency"] > 0.5


def test_ablation_command_trains_scores_and_resumes_every_variant(tmp_path, capsys,
                                                                 monkeypatch):
    from test_train import TINY
    argv = ["--ablate", "coherence", "--preset", "quick", "--train_seeds", "2", "--suite", "demo",
            "--steps", "2", "--out", str(tmp_path), "--train_flags", shlex.join(TINY + [
                "--steps", "2", "--shapes.n_images", "64", "--shapes.n_textfree", "16",
                "--shapes.n_paired", "16"])]
    rows = evaluation.main(argv)
    assert set(rows) == {"baseline", "coherence off"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "baseline_seed0", "baseline_seed1", "coherence_off_seed0", "coherence_off_seed1"]
    table = (tmp_path / "ablation.md").read_text()
    assert "(a) coherence loss off vs on" in table and "+-" in table
    # the coherence loss's two claimed effects: consecutive frames alike, less colour shift
    assert "| frame consistency |" in table and "| colour drift |" in table
    summary = json.loads((tmp_path / "baseline_seed0" / "eval_demo.json").read_text())
    assert summary["train_seconds"] > 0 and 0 <= summary["generated"]["all"]["colour"] <= 1
    assert re.search(r"4 runs: training \d+ min \(mean \d+ min per run\), scoring", table)
    # a second call finds every run finished and scored with these settings: nothing is redone
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr(evaluation.train, "train", lambda *a, **k: pytest.fail("trained again"))
    assert evaluation.main(argv) == rows
    # other settings (here the guidance) score again, from the same checkpoints
    monkeypatch.undo()
    evaluation.main(argv + ["--guidance", "3"])
    summary = json.loads((tmp_path / "baseline_seed0" / "eval_demo.json").read_text())
    assert summary["settings"]["guidance"] == 3.0


# -- caption probe --

def test_caption_probe_pairs_the_noise_so_only_the_caption_differs():
    from test_tft2v import make_model
    model = make_model().eval()
    kwargs = dict(frames=4, resolution=16, clips=6, timesteps=(999, 500))
    # untrained: the zero-initialised output head ignores the caption, so with the same clips
    # and noise under every variant every loss is equal
    losses = evaluation.caption_probe(model, **kwargs)
    assert set(losses) == {"own caption", "wrong direction", "no direction", "wrong colour",
                           "no caption"}
    assert all(row == losses["own caption"] for row in losses.values())
    with torch.no_grad():  # now the output depends on the context: the caption changes the loss
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    losses = evaluation.caption_probe(model, **kwargs)
    assert losses["wrong colour"] != losses["own caption"] != losses["no caption"]
    assert losses == evaluation.caption_probe(model, **kwargs)  # deterministic


def test_terminal_floor_is_lower_with_the_direction_word_and_below_predicting_zero():
    kwargs = dict(frames=4, resolution=16, clips=6, renders=16)
    floor = evaluation.terminal_floor(**kwargs)
    assert floor == evaluation.terminal_floor(**kwargs)  # deterministic
    # naming the direction narrows where a moving object can be, so the mean clip predicts more
    assert 0 < floor["own caption"] < floor["no direction"]
    # and the mean clip beats the trivial prediction 0, whose loss is the clips' mean square
    want = evaluation.probe_clips(6, random.Random(0))
    clips = shapes.render_batch(*map(list, zip(*want)), list(range(6)), 4, 16)
    assert floor["no direction"] < clips.pow(2).mean()


def test_terminal_travel_is_zero_for_an_untrained_model_and_follows_the_rendered_direction():
    from test_tft2v import make_model
    travel = evaluation.terminal_travel(make_model().eval(), frames=4, resolution=16, draws=4)
    assert set(travel) == set(shapes.DIRECTIONS)
    for model_px, rendered_px in travel.values():
        # zero output head: x0 estimate 0 everywhere, a flat grey clip with nothing to follow
        assert model_px == 0.0
        # a big object's mean clip moves the way its caption says (3 steps of 0.5-1 px)
        assert 1.0 < rendered_px < 3.0
