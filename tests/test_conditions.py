"""Compositional synthesis: condition maps (data/conditions.py), the UNet's condition encoder,
which branch sees maps (TF-T2V: images only), sampling from a condition sequence, and the IoU
metric and experiment of eval.py."""

import dataclasses
import json
import os
import shlex

import pytest
import torch

import eval as evaluation
import sample
import train
import unet3d
from data import conditions, shapes, video
from test_tft2v import make_model, record_contexts
from test_unet3d import SMALL, inputs, perturb

# ----------------------------------------------------------------------------------------------
# Maps and IoU


def test_silhouette_is_the_rendered_mask_and_sketch_its_one_pixel_outline():
    clip = shapes.render("green", "square", "big", "right", frames=3, resolution=32, seed=1)
    sil = conditions.silhouette(clip[None])[0]  # (F, H, W)
    edge = conditions.sketch(clip[None])[0]
    side = int(2 * shapes.SIZES["big"] * 32)  # a 16 x 16 square
    assert sil.shape == (3, 32, 32) and sil.sum((1, 2)).tolist() == [side * side] * 3
    assert not (edge & ~sil).any()  # the outline lies on the object
    assert edge.sum((1, 2)).tolist() == [4 * side - 4] * 3  # the square's perimeter pixels
    maps = conditions.condition_maps(clip[None], conditions.KINDS)
    assert maps.shape == (1, 2, 3, 32, 32) and set(maps.unique().tolist()) == {-1.0, 1.0}


def test_iou_on_hand_made_masks():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2, :2] = True  # 4 pixels
    b = torch.zeros_like(a)
    b[:2, :1] = True  # 2 of them
    c = torch.zeros_like(a)
    c[3, 3] = True  # disjoint
    masks = torch.stack([a, a, a, torch.zeros_like(a)])
    other = torch.stack([a, b, c, torch.zeros_like(a)])
    assert conditions.iou(masks, other).tolist() == [1.0, 0.5, 0.0, 1.0]


def test_condition_sequence_from_a_path_spec_and_from_its_gif_agree(tmp_path):
    seq = conditions.condition_sequence("silhouette", "shapes:triangle,small,up,3", 6, 32)
    want = conditions.silhouette(shapes.render("red", "triangle", "small", "up", 6, 32, 3)[None])
    assert torch.equal(seq > 0, want[0])
    gif = video.write_video(str(tmp_path / "sil.gif"), seq[None].expand(3, -1, -1, -1))
    assert torch.equal(conditions.condition_sequence("silhouette", gif, 6, 32), seq)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(6):
        video.write_video(str(frames / f"{i:02d}.png"), seq[None, i:i + 1].expand(3, -1, -1, -1))
    assert torch.equal(conditions.condition_sequence("silhouette", str(frames), 6, 32), seq)
    with pytest.raises(ValueError, match="frame"):
        conditions.condition_sequence("sketch", gif, 9, 32)
    with pytest.raises(ValueError, match="path spec"):
        conditions.condition_sequence("sketch", "shapes:hexagon,big,left", 6, 32)
    with pytest.raises(ValueError, match="unknown condition kind"):
        conditions.parse_kinds("silhouette,depth")


# ----------------------------------------------------------------------------------------------
# The condition encoder in the UNet

COND = dataclasses.replace(SMALL, condition_channels=2, condition_dim=8)


@pytest.mark.parametrize("F, use_temporal", [(1, False), (8, True), (8, False)])
def test_condition_maps_shape_and_change_the_output(F, use_temporal):
    torch.manual_seed(0)
    model = unet3d.UNet3D(COND)
    perturb(model.parameters())
    x, t, ctx = inputs(F=F)
    maps = torch.sign(torch.randn(2, 2, F, 8, 8))
    with torch.no_grad():
        out = model(x, t, ctx, use_temporal, condition=maps)
        absent = model(x, t, ctx, use_temporal)  # None = zeros
        zeros = model(x, t, ctx, use_temporal, condition=torch.zeros_like(maps))
    assert out.shape == x.shape
    assert torch.equal(absent, zeros) and not torch.allclose(out, absent)
    with pytest.raises(ValueError, match="no condition maps"):
        unet3d.UNet3D(SMALL)(x, t, ctx, condition=maps)


def test_condition_encoder_mixes_frames_only_in_its_temporal_parameters():
    model = unet3d.UNet3D(COND)
    temporal = {id(p) for p in model.temporal_parameters()}
    mix = list(model.condition_encoder.temporal.parameters())
    assert mix and all(id(p) in temporal for p in mix)
    assert not any(id(p) in temporal for p in model.condition_encoder.spatial.parameters())
    x, t, ctx = inputs(F=1)
    model(x, t, ctx, use_temporal=False, condition=torch.ones(2, 2, 1, 8, 8)).sum().backward()
    assert all(p.grad is None for p in mix)
    assert all(p.grad is not None for p in model.condition_encoder.spatial.parameters())


# ----------------------------------------------------------------------------------------------
# Which branch sees maps: TF-T2V pairs conditions with images only


def test_content_branch_gets_image_maps_and_motion_branch_never_does():
    model = make_model(condition_channels=2, conditions="silhouette,sketch")
    maps = []
    record_contexts(model, maps)
    images, caps = shapes.ShapesDataset("images", shapes.ShapesConfig(resolution=16)).batch(
        range(32))
    clips, _ = shapes.ShapesDataset("textfree", shapes.ShapesConfig(resolution=16)).batch(range(8))
    for _ in range(3):
        model.content_loss(images, caps)
        model.motion_loss(clips)
        model.motion_loss(clips, ["a big red circle moving left"] * 8)
    content, motion = maps[0::3], maps[1::3] + maps[2::3]
    assert all(m is None for m in motion)
    full = conditions.condition_maps(images, conditions.KINDS)  # (B, 2, 1, H, W)
    for m in content:
        kept = m.abs().sum((2, 3, 4)) > 0  # (B, 2) which kinds each image got
        assert torch.equal(m[kept], full[kept]) and not m[~kept].any()
        assert 0 < kept.float().mean() < 1  # dropped at random, for guidance


def test_control_experiment_pairs_videos_with_their_maps():
    model = make_model(condition_channels=2, conditions="silhouette,sketch",
                       video_conditions=True, p_drop_condition=0.0, p_drop_all=0.0,
                       p_drop_each=0.0)
    maps = []
    record_contexts(model, maps)
    clips, _ = shapes.ShapesDataset("textfree", shapes.ShapesConfig(resolution=16)).batch(range(4))
    model.motion_loss(clips)
    assert torch.equal(maps[0], conditions.condition_maps(clips, conditions.KINDS))


@pytest.mark.parametrize("guide_maps", [False, True])
def test_guidance_null_pass_keeps_the_maps_unless_guiding_on_them(guide_maps):
    model = make_model(condition_channels=2, conditions="silhouette,sketch")
    seen = []
    record_contexts(model, seen)
    maps = torch.ones(2, 2, 4, 16, 16)
    model.generate(["a big red circle"] * 2, frames=4, size=16, steps=1, maps=maps,
                   guide_maps=guide_maps)
    cond, null = seen[0].chunk(2)  # the guided batch is (conditional ; null)
    assert torch.equal(cond, maps)
    assert torch.equal(null, torch.zeros_like(maps) if guide_maps else maps)


def test_generate_checks_condition_maps():
    plain = make_model()
    model = make_model(condition_channels=2, conditions="silhouette,sketch")
    maps = torch.ones(1, 2, 4, 16, 16)
    out = model.generate(["a big red circle"], frames=4, size=16, steps=2, maps=maps)
    assert out.shape == (1, 3, 4, 16, 16)
    with pytest.raises(ValueError, match="expected"):
        model.generate(["a big red circle"], frames=4, size=16, steps=2, maps=maps[:, :1])
    with pytest.raises(ValueError, match="without condition maps"):
        plain.generate(["a big red circle"], frames=4, size=16, steps=2, maps=maps)
    with pytest.raises(ValueError, match="condition kind"):
        make_model(condition_channels=1, conditions="silhouette,sketch")


# ----------------------------------------------------------------------------------------------
# End to end: train.py --preset compose, sample.py --condition, eval.py --compose


@pytest.fixture(scope="module")
def compose_checkpoint(tmp_path_factory):
    from test_train import TINY
    folder = tmp_path_factory.mktemp("compose") / "run"
    configs = train.parse_args(["--preset", "compose", *TINY, "--steps", "2", "--out",
                                str(folder)])
    return train.train(configs)[1]


def test_sample_py_follows_a_condition_sequence(compose_checkpoint, tmp_path, capsys):
    out = tmp_path / "c.png"
    v = sample.main(["--ckpt", compose_checkpoint, "--prompt", "a big red circle", "--steps", "2",
                     "--condition", "silhouette=shapes:circle,big,right", "--out", str(out)])
    assert v.shape == (1, 3, 4, 16, 16) and out.exists()
    with pytest.raises(SystemExit, match="KIND=SOURCE"):
        sample.main(["--ckpt", compose_checkpoint, "--condition", "depth=shapes:circle,big,up"])


def test_sample_py_refuses_conditions_for_a_plain_checkpoint(tmp_path):
    from test_train import TINY
    configs = train.parse_args(TINY + ["--steps", "1", "--out", str(tmp_path / "plain")])
    ckpt = train.train(configs)[1]
    with pytest.raises(SystemExit, match="without condition maps"):
        sample.main(["--ckpt", ckpt, "--condition", "silhouette=shapes:circle,big,up"])


def test_rendered_clips_score_full_iou_and_accuracy():
    _, clips, wants = evaluation.condition_suite(shapes.ShapesConfig(), 1)
    hits = [evaluation.score(m, w) for m, w in zip(shapes.measure(clips), wants)]
    assert len(clips) == 48 and all(h["colour"] == h["shape"] == h["direction"] == 1 for h in hits)
    iou = conditions.iou(shapes.object_mask(clips), conditions.silhouette(clips))
    assert bool((iou == 1).all())
    moved = clips.roll(4, dims=-1)  # the same object, off its path by 4 pixels
    assert conditions.iou(shapes.object_mask(moved), conditions.silhouette(clips)).mean() < 0.9


def test_compose_experiment_trains_and_scores_three_models(tmp_path):
    from test_train import TINY
    flags = TINY + ["--steps", "2", "--shapes.n_images", "64", "--shapes.n_textfree", "16"]
    argv = ["--compose", "--train_seeds", "1", "--steps", "2", "--out", str(tmp_path),
            "--train_flags", shlex.join(flags)]
    table = evaluation.main(argv)
    assert set(table) == {("ours", "silhouette"), ("ours", "sketch"), ("ours", "real"),
                          ("control", "silhouette"), ("control", "sketch"), ("control", "real"),
                          ("unconditioned", "none"), ("unconditioned", "real")}
    assert all(f[0]["iou"] == 1 for (name, kind), f in table.items() if kind == "real")
    saved = json.loads((tmp_path / "ours_seed0" / "eval_compose.json").read_text())
    assert saved["silhouette"]["videos"] == 48 and 0 <= saved["silhouette"]["iou"] <= 1
    md = (tmp_path / "compose.md").read_text()
    assert "| ours | silhouette |" in md and "| rendered clips | - |" in md
    assert os.path.exists(tmp_path / "compose_filmstrip.png")


def test_compose_unconditioned_run_is_ours_without_the_maps():
    runs = {name: train.parse_args(flags) for name, flags in evaluation.COMPOSE_RUNS}
    ours, twin = runs["ours"], runs["unconditioned"]
    assert twin["tft2v"].conditions == "" and twin["unet"].condition_channels == 0
    for section in ours:
        a, b = dataclasses.asdict(ours[section]), dataclasses.asdict(twin[section])
        for name in ("conditions", "condition_channels"):
            a.pop(name, None)
            b.pop(name, None)
        assert a == b, section
