import numpy as np
import pytest
import torch
from PIL import Image

from data import video
from data.shapes import measure, render, render_batch
from data.video import from_uint8, read_video, to_uint8, write_video


def clips(n=2, frames=6, resolution=16):
    return render_batch(["red", "blue", "green"][:n], ["circle", "square", "cross"][:n],
                        ["big"] * n, ["right", "down", "left"][:n], list(range(n)),
                        frames=frames, resolution=resolution)


def test_to_uint8_and_back_is_exact_on_rendered_values():
    v = clips()[0]
    frames = to_uint8(v)
    assert frames.shape == (6, 16, 16, 3) and frames.dtype == np.uint8
    assert to_uint8(clips()).shape == (2, 6, 16, 16, 3)
    assert (from_uint8(frames) - v).abs().max() < 1 / 127
    assert to_uint8(torch.tensor([-3.0, 3.0]).view(1, 1, 2, 1).expand(3, 1, 2, 1)).tolist() == \
        [[[[0, 0, 0]], [[255, 255, 255]]]]


def test_gif_round_trip_keeps_frames_and_attributes(tmp_path):
    v = render("magenta", "triangle", "big", "left", frames=8, resolution=32, seed=3)
    path = write_video(str(tmp_path / "sub" / "clip.gif"), v, fps=10, scale=1)
    frames = read_video(path)
    assert frames.shape == (8, 32, 32, 3)
    back = from_uint8(frames)
    assert (back - v).abs().max() < 0.05  # GIF palettes are exact for a few flat colours
    read = measure(back)
    assert (read["colour"], read["shape"], read["direction"]) == ("magenta", "triangle", "left")
    with Image.open(path) as image:
        assert image.info["loop"] == 0 and image.info["duration"] == 100
    assert read_video(path, limit=3).shape == (3, 32, 32, 3)


def test_gif_of_a_batch_is_a_grid_and_scale_enlarges(tmp_path):
    frames = read_video(write_video(str(tmp_path / "b.gif"), clips(3), scale=2))
    side = 2 * 16
    assert frames.shape == (6, 2 * side + video.GAP, 2 * side + video.GAP, 3)  # 2 x 2 grid
    auto = read_video(write_video(str(tmp_path / "auto.gif"), clips(1)[0]))
    assert auto.shape[1:] == (128, 128, 3)  # 16 px frames enlarged 8 times by default


def test_png_filmstrip_has_a_row_per_video_and_a_column_per_frame(tmp_path):
    path = write_video(str(tmp_path / "strip.png"), clips(2), scale=3)
    strip = np.asarray(Image.open(path))
    tile, gap = 3 * 16, video.GAP
    assert strip.shape == (2 * tile + gap, 6 * tile + 5 * gap, 3)
    assert (strip[tile: tile + gap] == video.GAP_VALUE).all()
    first = strip[:tile, :tile][::3, ::3]  # first frame of the first video, unscaled
    assert np.array_equal(first, to_uint8(clips(2)[0])[0])


def test_unknown_extension_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=".gif, .png"):
        write_video(str(tmp_path / "x.xyz"), clips(1)[0])


def test_mp4_without_backend_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(video.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(video.MissingBackendError, match="pip install imageio-ffmpeg"):
        write_video(str(tmp_path / "x.mp4"), clips(1)[0])
    with pytest.raises(video.MissingBackendError, match="pip install"):
        read_video(str(tmp_path / "x.mp4"))


def test_mp4_round_trip_when_a_backend_is_installed(tmp_path):
    try:
        video._backend(".mp4")
    except video.MissingBackendError:
        pytest.skip("no imageio video backend (pip install imageio-ffmpeg or av)")
    v = render("yellow", "circle", "big", "up", frames=8, resolution=32, seed=1)
    frames = read_video(write_video(str(tmp_path / "c.mp4"), v, scale=1))
    assert frames.shape == (8, 32, 32, 3)
    read = measure(from_uint8(frames))
    assert (read["colour"], read["shape"], read["direction"]) == ("yellow", "circle", "up")
