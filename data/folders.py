"""A user's own data as torch Datasets, with the same items as data/shapes.py's ShapesDataset:
(FloatTensor (3, F, H, W) in [-1, 1], caption). These are the three kinds of TF-T2V training data
(§3.1, §3.4) from files:

    ImageTextFolder   image-text pairs    a folder of images + a captions file    F = 1
    VideoFolder       text-free videos    every video in a folder                 caption ""
    VideoTextFolder   video-text pairs    a folder of videos + a captions file

Captions file: JSONL, one `{"file": "cat.png", "caption": "a cat"}` per line, or CSV with the
columns `file,caption` (a header line, or none and those two columns). File names are relative to
the folder. Left empty, the captions file is `captions.jsonl` or `captions.csv` in the folder.

Every file is read once, when the dataset is made: frames are picked (F of them, `stride` apart,
from the first), resized so the short side fits, centre-cropped to H x W, and kept in memory as
uint8 (N * F * H * W * 3 bytes: 24 KB a clip at 8 x 32 x 32). This is what lets an unreadable file
be found up front:
  - a corrupt, unreadable or missing file is skipped, and all of them are reported in one
    logging.warning line with their count and names; no readable file at all is an error naming
    the folder. (A missing video backend for MP4 is an error, not a skip: see data/video.py.)
  - a video with fewer than (F - 1) * stride + 1 frames is padded by repeating its last frame
    (so a still image or a short GIF still gives a clip), and the padded ones are reported in one
    warning line as well.

Tensor legend: F frames, H W height width.
"""

import csv
import json
import logging
import os

import numpy as np
import torch
from PIL import Image

from data.video import BACKEND_FORMATS, MissingBackendError, from_uint8, read_video, to_rgb

log = logging.getLogger(__name__)
VIDEO_FORMATS = (".gif",) + BACKEND_FORMATS


def read_captions(path):
    """[(file, caption)] from a JSONL or CSV captions file."""
    with open(path, newline="", encoding="utf-8") as f:
        if path.lower().endswith(".csv"):
            rows = [r for r in csv.reader(f) if r]
            if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "caption"]:
                rows = rows[1:]
            return [(r[0].strip(), r[1].strip()) for r in rows]
        items = [json.loads(line) for line in f if line.strip()]
        return [(item["file"], item["caption"]) for item in items]


def find_captions(root, captions):
    """The captions file: `captions` as given or relative to root; captions.jsonl/.csv if ""."""
    names = [captions] if captions else ["captions.jsonl", "captions.csv"]
    for name in names:
        for path in (name, os.path.join(root, name)):
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"no captions file in {root}: looked for {', '.join(names)}")


def resize_crop(image, size):
    """A Pillow image scaled so that it covers (H, W) = size, then centre-cropped to it."""
    h, w = size
    scale = max(h / image.height, w / image.width)
    rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - w) // 2, (rh - h) // 2
    return image.crop((left, top, left + w, top + h))


class _FileDataset(torch.utils.data.Dataset):
    """Loads (file, caption) entries once at construction (see the file docstring)."""

    def __init__(self, root, entries, frames, stride, resolution):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no such folder: {root}")
        self.root, self.frames, self.stride = root, frames, stride
        self.size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.clips, self.captions, skipped, padded = [], [], [], []
        for name, text in entries:
            try:
                clip, short = self.load(os.path.join(root, name))
            except MissingBackendError:
                raise
            except Exception:  # corrupt, unreadable or missing: skip it, report below
                skipped.append(name)
                continue
            if short:
                padded.append(name)
            self.clips.append(clip)
            self.captions.append(text)
        if skipped:
            log.warning("%s: skipped %d unreadable file(s): %s", root, len(skipped),
                        ", ".join(skipped))
        if padded:
            log.warning("%s: padded %d video(s) shorter than %d frames by repeating the last "
                        "frame: %s", root, len(padded), (frames - 1) * stride + 1,
                        ", ".join(padded))
        if not self.clips:
            raise ValueError(f"no readable files in {root} ({len(skipped)} skipped)")

    def load(self, path):
        """One file -> (uint8 (F, H, W, 3), whether it had to be padded)."""
        need = (self.frames - 1) * self.stride + 1
        video = read_video(path, limit=need)  # (n, h, w, 3)
        n = len(video)
        picks = [min(i * self.stride, n - 1) for i in range(self.frames)]  # last one repeats
        clip = np.stack([np.asarray(resize_crop(Image.fromarray(video[i]), self.size))
                         for i in picks])  # (F, H, W, 3)
        return clip, n < need

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        return from_uint8(self.clips[i]), self.captions[i]  # (3, F, H, W)


class ImageTextFolder(_FileDataset):
    """Image-text pairs: the images named in a captions file. Items ((3, 1, H, W), caption)."""

    def __init__(self, root, captions="", resolution=32):
        entries = read_captions(find_captions(root, captions))
        super().__init__(root, entries, frames=1, stride=1, resolution=resolution)

    def load(self, path):
        with Image.open(path) as image:
            frame = resize_crop(to_rgb(image), self.size)
        return np.asarray(frame)[None], False  # (1, H, W, 3)


class VideoFolder(_FileDataset):
    """Text-free videos: every video file under root (GIF; MP4 and others with a backend),
    in sorted order. Items ((3, F, H, W), "")."""

    def __init__(self, root, frames=8, stride=1, resolution=32):
        names = sorted(os.path.relpath(os.path.join(d, f), root)
                       for d, _, files in os.walk(root) for f in files
                       if os.path.splitext(f)[1].lower() in VIDEO_FORMATS)
        super().__init__(root, [(n, "") for n in names], frames, stride, resolution)


class VideoTextFolder(_FileDataset):
    """Video-text pairs: the videos named in a captions file. Items ((3, F, H, W), caption)."""

    def __init__(self, root, captions="", frames=8, stride=1, resolution=32):
        entries = read_captions(find_captions(root, captions))
        super().__init__(root, entries, frames, stride, resolution)
