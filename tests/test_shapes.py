import random

import pytest
import torch

from data import shapes
from data.shapes import (COLOURS, DIRECTIONS, SHAPES, SIZES, ShapesConfig, ShapesDataset,
                         caption, measure, parse_caption, render, render_batch)

KEYS = ("colour", "shape", "size", "direction")


def random_attributes(n, moving=True, seed=0):
    rnd = random.Random(seed)
    moves = list(DIRECTIONS) if moving else ["static"]
    return [(rnd.choice(list(COLOURS)), rnd.choice(SHAPES), rnd.choice(list(SIZES)),
             rnd.choice(moves), rnd.randrange(2 ** 40)) for _ in range(n)]


def accuracy(attrs, videos):
    """Fraction of clips whose four attributes all read back right."""
    read = measure(videos)
    right = sum(all(r[k] == a for k, a in zip(KEYS, at)) for at, r in zip(attrs, read))
    return right / len(attrs)


def test_vocabulary_is_as_the_issue_asks():
    assert len(COLOURS) >= 6 and {"circle", "square", "triangle"} <= set(SHAPES)
    assert len(SHAPES) >= 4 and set(SIZES) == {"small", "big"}
    assert DIRECTIONS == {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def test_render_shape_range_and_plain_background():
    v = render("red", "circle", "big", "left")
    assert v.shape == (3, 8, 32, 32) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    assert (v[:, :, 0, 0] == -1).all()  # black corner: the object never reaches it here
    assert render("blue", "square", "small", "up", frames=3, resolution=20).shape == (3, 3, 20, 20)


def test_render_is_deterministic_from_its_seed():
    a = render("green", "triangle", "small", "down", seed=7)
    assert torch.equal(a, render("green", "triangle", "small", "down", seed=7))
    assert not torch.equal(a, render("green", "triangle", "small", "down", seed=8))


def test_render_batch_equals_render():
    attrs = random_attributes(12)
    batch = render_batch(*zip(*attrs), frames=5, resolution=24)
    assert batch.shape == (12, 3, 5, 24, 24)
    for i, (c, s, z, d, seed) in enumerate(attrs):
        assert torch.equal(batch[i], render(c, s, z, d, frames=5, resolution=24, seed=seed))


def test_object_stays_wholly_in_frame_for_the_whole_clip():
    attrs = random_attributes(1000, seed=1)
    videos = render_batch(*zip(*attrs))
    mask = (videos > -1).any(1)  # (B, F, H, W)
    rows, cols = mask.any(3).sum(-1), mask.any(2).sum(-1)  # (B, F) bounding-box height, width
    diameter = torch.tensor([2 * SIZES[a[2]] * 32 for a in attrs])[:, None]
    # a shape cut off by the frame edge would have a smaller box (a triangle's apex row may hold
    # no pixel centre, hence the one pixel of slack)
    assert (rows >= diameter - 1).all() and (cols >= diameter - 1).all()


def test_measure_reads_back_2000_random_samples():
    attrs = random_attributes(2000, seed=2)
    videos = render_batch(*zip(*attrs))
    assert accuracy(attrs, videos) >= 0.995


def test_measure_reads_back_2000_noisy_samples():
    attrs = random_attributes(2000, seed=3)
    videos = render_batch(*zip(*attrs))
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    assert accuracy(attrs, videos + 0.05 * noise) >= 0.98


@pytest.mark.parametrize("frames,resolution", [(1, 32), (2, 32), (16, 64), (4, 24)])
def test_measure_reads_other_frame_counts_and_resolutions(frames, resolution):
    attrs = random_attributes(200, moving=frames > 1, seed=frames)
    videos = render_batch(*zip(*attrs), frames=frames, resolution=resolution)
    assert accuracy(attrs, videos) >= 0.995


def test_single_frame_reads_static():
    r = measure(render("cyan", "cross", "big", "left", frames=1))
    assert r["direction"] == "static" and r["found"] == 1.0


def test_measure_consistency_figures_on_rendered_clips():
    r = measure(render("magenta", "square", "big", "right"))
    assert r["found"] == 1.0 and r["colour_drift"] < 1e-6
    assert r["area_variation"] == 0.0  # axis-aligned squares keep their pixel count
    assert r["path_smoothness"] <= 1.0  # constant velocity, up to a pixel of rounding


def test_measure_on_empty_and_flickering_videos():
    empty = measure(-torch.ones(3, 8, 32, 32))
    assert empty["colour"] == empty["shape"] == empty["size"] == "none"
    assert empty["found"] == 0.0
    v = render("yellow", "circle", "big", "down").clone()
    v[:, ::2] = -1  # object only in every other frame
    r = measure(v)
    assert r["found"] == 0.5 and r["colour"] == "yellow" and r["path_smoothness"] == 0.0


def test_measure_sees_colour_drift_and_jumps():
    v = render("red", "circle", "big", "static").clone()
    steady = measure(v)
    v[1, 4:] = torch.where(v[0, 4:] > 0, 0.6, v[1, 4:])  # red turns orange halfway
    assert measure(v)["colour_drift"] > steady["colour_drift"] + 0.1
    jump = render_batch(["red"] * 2, ["square"] * 2, ["small"] * 2, ["static"] * 2, [1, 2])
    clip = torch.cat([jump[0, :, :4], jump[1, :, 4:]], 1)  # teleports halfway
    assert measure(clip)["path_smoothness"] > 1.0


def test_captions_name_the_attributes():
    assert caption("red", "circle", "big") == "a big red circle"
    assert caption("red", "circle", "big", "left") == "a big red circle moving left"
    variants = {caption("red", "circle", "big", "left", v) for v in range(4)}
    assert len(variants) == 4
    for v in range(4):
        text = caption("blue", "cross", "small", "up", v)
        assert parse_caption(text) == {"colour": "blue", "shape": "cross", "size": "small",
                                       "direction": "up"}
    assert parse_caption("one big red circle")["direction"] == "static"


def test_dataset_kinds_items_and_captions():
    cfg = ShapesConfig(n_images=30, n_textfree=20, n_paired=10, frames=4, resolution=24)
    images, free, paired = (ShapesDataset(k, cfg) for k in ("images", "textfree", "paired"))
    assert (len(images), len(free), len(paired)) == (30, 20, 10)
    x, text = images[3]
    assert x.shape == (3, 1, 24, 24) and text == caption(*parse_caption(text).values(), 3)
    x, text = free[0]
    assert x.shape == (3, 4, 24, 24) and text == ""
    x, text = paired[5]
    a = paired.attributes(5)
    assert text == caption(a["colour"], a["shape"], a["size"], a["direction"], 5)
    assert "moving" in text or "going" in text or "moves" in text
    read = measure(x)
    assert all(read[k] == a[k] for k in KEYS)
    with pytest.raises(IndexError):
        paired[10]


def test_dataset_batch_equals_items_and_is_deterministic():
    cfg = ShapesConfig(n_paired=50)
    data = ShapesDataset("paired", cfg)
    videos, texts = data.batch([4, 0, 17])
    assert videos.shape == (3, 3, 8, 32, 32)
    for j, i in enumerate([4, 0, 17]):
        x, t = ShapesDataset("paired", cfg)[i]
        assert torch.equal(videos[j], x) and texts[j] == t


def test_doubling_the_textfree_set_keeps_its_first_half():
    small = ShapesDataset("textfree", ShapesConfig(n_textfree=100))
    big = ShapesDataset("textfree", ShapesConfig(n_textfree=200))
    assert all(small.attributes(i) == big.attributes(i) for i in range(100))
    other = ShapesDataset("paired", ShapesConfig())
    assert small.attributes(0)["seed"] != other.attributes(0)["seed"]


def test_held_out_combinations_never_in_videos():
    cfg = ShapesConfig(n_images=3000, n_textfree=3000, n_paired=3000)
    assert len(cfg.holdout) >= 3
    for kind in ("textfree", "paired"):
        data = ShapesDataset(kind, cfg)
        pairs = {(a["colour"], a["shape"]) for a in map(data.attributes, range(len(data)))}
        assert not pairs & set(cfg.holdout)
        assert len(pairs) == len(COLOURS) * len(SHAPES) - len(cfg.holdout)
    data = ShapesDataset("images", cfg)
    pairs = {(a["colour"], a["shape"]) for a in map(data.attributes, range(len(data)))}
    assert set(cfg.holdout) <= pairs  # held-out pairs are still seen as images
    assert shapes.is_held_out(*cfg.holdout[0], cfg) and not shapes.is_held_out("red", "circle")


def test_all_combinations_lists_every_colour_shape_size():
    combos = shapes.all_combinations()
    assert len(combos) == len(set(combos)) == len(COLOURS) * len(SHAPES) * len(SIZES)
