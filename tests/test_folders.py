import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data.folders import ImageTextFolder, VideoFolder, VideoTextFolder, read_captions
from data.shapes import measure, render
from data.video import write_video

RED, BLUE = (230, 26, 26), (51, 77, 255)


@pytest.fixture
def images(tmp_path):
    """A folder of real images in several modes and formats, one corrupt, with captions."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (40, 20), RED).save(root / "red.png")  # wide: centre crop
    Image.new("RGB", (64, 64), BLUE).save(root / "blue.jpg", quality=95)
    Image.new("L", (32, 48), 200).save(root / "grey.jpg")
    rgba = Image.new("RGBA", (32, 32), (0, 255, 0, 255))
    rgba.paste((0, 255, 0, 0), (0, 0, 16, 32))  # left half transparent
    rgba.save(root / "half.png")
    Image.new("RGB", (8, 8), RED).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "palette.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    entries = [("red.png", "a red thing"), ("blue.jpg", "blue"), ("grey.jpg", "grey, light"),
               ("half.png", "half green"), ("palette.png", "small red"),
               ("broken.png", "never seen"), ("missing.png", "not there")]
    with open(root / "captions.jsonl", "w") as f:
        for name, text in entries:
            f.write(json.dumps({"file": name, "caption": text}) + "\n")
    with open(root / "list.csv", "w") as f:
        f.write("file,caption\n" + "".join(f'{n},"{t}"\n' for n, t in entries))
    return root


@pytest.fixture
def videos(tmp_path):
    """A folder of GIF videos (one too short, one corrupt) with captions for some."""
    root = tmp_path / "videos"
    (root / "more").mkdir(parents=True)
    write_video(str(root / "red_right.gif"), render("red", "circle", "big", "right", 12), scale=1)
    write_video(str(root / "more" / "blue_down.gif"),
                render("blue", "square", "big", "down", 12, resolution=64), scale=1)
    write_video(str(root / "short.gif"), render("green", "cross", "big", "left", 3), scale=1)
    (root / "corrupt.gif").write_bytes(b"GIF89a" + bytes(20))
    (root / "notes.txt").write_text("not a video")
    with open(root / "captions.csv", "w") as f:
        f.write("red_right.gif,a big red circle moving right\n"
                "more/blue_down.gif,a big blue square moving down\n"
                "corrupt.gif,broken\n")
    return root


def colour_at(x, y, item):
    return ((item[:, 0, y, x] + 1) * 127.5).round().tolist()


def test_captions_files_read_jsonl_and_csv_alike(images):
    assert read_captions(str(images / "captions.jsonl")) == read_captions(str(images / "list.csv"))
    assert read_captions(str(images / "list.csv"))[2] == ("grey.jpg", "grey, light")


@pytest.mark.parametrize("captions", ["", "list.csv"])
def test_image_folder_gives_right_tensors(images, captions):
    data = ImageTextFolder(str(images), captions, resolution=16)
    assert len(data) == 5
    x, text = data[0]
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32 and text == "a red thing"
    assert all(-1 <= data[i][0].min() and data[i][0].max() <= 1 for i in range(5))
    assert colour_at(8, 8, x) == list(RED)
    assert np.allclose(colour_at(8, 8, data[1][0]), BLUE, atol=4)  # JPEG
    assert np.allclose(colour_at(8, 8, data[2][0]), [200] * 3, atol=2)  # L -> RGB
    half = data[3][0]
    assert colour_at(2, 8, half) == [0, 0, 0] and colour_at(13, 8, half) == [0, 255, 0]  # RGBA
    assert colour_at(8, 8, data[4][0]) == list(RED)  # P -> RGB
    assert [data[i][1] for i in range(5)] == ["a red thing", "blue", "grey, light",
                                             "half green", "small red"]


def test_corrupt_file_is_skipped_counted_and_reported(images, caplog):
    with caplog.at_level(logging.WARNING, logger="data.folders"):
        ImageTextFolder(str(images))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "skipped 2 unreadable" in lines[0] and "broken.png" in lines[0]
    assert "missing.png" in lines[0] and "\n" not in lines[0]


def test_empty_dataset_after_skipping_names_the_folder(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.gif").write_bytes(b"nothing")
    with pytest.raises(ValueError, match=str(root)):
        VideoFolder(str(root))
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        ImageTextFolder(str(root))


def test_video_folder_reads_gifs_with_stride_and_crop(videos, caplog):
    with caplog.at_level(logging.WARNING, logger="data.folders"):
        data = VideoFolder(str(videos), frames=4, stride=2, resolution=32)
    assert len(data) == 3  # red_right, more/blue_down, short; corrupt skipped, .txt ignored
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 1 unreadable file(s): corrupt.gif" in messages
    assert "padded 1 video(s) shorter than 7 frames" in messages and "short.gif" in messages
    for x, text in (data[i] for i in range(3)):
        assert x.shape == (3, 4, 32, 32) and text == "" and -1 <= x.min() and x.max() <= 1
    blue = measure(data[0][0])  # sorted: more/blue_down.gif first, downscaled from 64
    assert (blue["colour"], blue["shape"], blue["direction"]) == ("blue", "square", "down")
    red = measure(data[1][0])
    assert (red["colour"], red["shape"], red["direction"]) == ("red", "circle", "right")
    short = data[2][0]
    assert torch.equal(short[:, 2], short[:, 3])  # padded by repeating the last frame


def test_stride_picks_every_other_frame(videos):
    full = VideoFolder(str(videos), frames=8, stride=1)[1][0]
    strided = VideoFolder(str(videos), frames=4, stride=2)[1][0]
    assert torch.equal(strided, full[:, ::2])


def test_video_text_folder_pairs_videos_with_captions(videos):
    data = VideoTextFolder(str(videos), "captions.csv", frames=8, resolution=24)
    assert len(data) == 2
    x, text = data[1]
    assert x.shape == (3, 8, 24, 24) and text == "a big blue square moving down"
    assert measure(x)["direction"] == "down"


def test_mp4_without_backend_is_an_error_naming_what_to_install(videos, monkeypatch):
    from data import video
    (videos / "clip.mp4").write_bytes(b"")
    monkeypatch.setattr(video.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(video.MissingBackendError, match="pip install imageio-ffmpeg"):
        VideoFolder(str(videos))
