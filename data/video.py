"""Video and image file I/O: read a video into frames, write generated videos as GIF, MP4 or a
PNG filmstrip. sample.py and the training previews write through `write_video`; data/folders.py
reads a user's files through `read_video` and `to_rgb`.

GIF (and still images) always work, through Pillow. MP4 and the other ffmpeg formats need a
video backend for imageio, PyAV (`pip install av`) or imageio-ffmpeg
(`pip install imageio-ffmpeg`); without one, reading or writing them raises MissingBackendError
with that advice.

Tensor legend: B batch, F frames, H W height width. Tensors are channel-first, (3, F, H, W) or
(B, 3, F, H, W) in [-1, 1]; files and numpy frames are channel-last uint8, (F, H, W, 3).
"""

import importlib.util
import math
import os
import tempfile

import numpy as np
import torch
from PIL import Image, ImageSequence

PILLOW_FORMATS = (".gif", ".png", ".apng", ".webp", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BACKEND_FORMATS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v")
GAP = 2  # pixels of grey between the tiles of a filmstrip or grid
GAP_VALUE = 128


class MissingBackendError(RuntimeError):
    """An ffmpeg format was asked for and no imageio video backend is installed."""


def _backend(ext):
    """"pyav" or "ffmpeg", whichever is installed (PyAV first), else MissingBackendError."""
    if importlib.util.find_spec("av"):
        return "pyav"
    if importlib.util.find_spec("imageio_ffmpeg"):
        return "ffmpeg"
    raise MissingBackendError(f"{ext} files need a video backend for imageio: "
                              "pip install imageio-ffmpeg (or: pip install av)")


# ----------------------------------------------------------------------------------------------
# Conversions


def to_rgb(image):
    """A Pillow image of any mode as RGB; transparent parts (RGBA, LA, P with transparency)
    become black, the Shapes world's background."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)),
                                     rgba).convert("RGB")
    return image.convert("RGB")


def to_uint8(video):
    """(3, F, H, W) in [-1, 1] -> uint8 ndarray (F, H, W, 3);
    (B, 3, F, H, W) -> (B, F, H, W, 3)."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.movedim(-4, -1).numpy()  # channels last


def from_uint8(frames):
    """uint8 (F, H, W, 3) -> FloatTensor (3, F, H, W) in [-1, 1]; the inverse of to_uint8."""
    return torch.tensor(np.asarray(frames)).movedim(-1, 0).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------
# Reading


def read_video(path, limit=None):
    """A video (or a still image, as one frame) -> uint8 ndarray (F, H, W, 3); at most `limit`
    frames when given. Any image mode is converted to RGB (see to_rgb)."""
    ext = os.path.splitext(path)[1].lower()
    frames = []
    if ext in BACKEND_FORMATS:
        import imageio.v3 as iio
        plugin = "pyav" if _backend(ext) == "pyav" else "FFMPEG"
        for frame in iio.imiter(path, plugin=plugin):
            frames.append(np.asarray(frame)[..., :3])
            if limit and len(frames) == limit:
                break
    else:
        with Image.open(path) as image:
            for frame in ImageSequence.Iterator(image):
                frames.append(np.asarray(to_rgb(frame)))
                if limit and len(frames) == limit:
                    break
    if not frames:
        raise ValueError(f"{path}: no frames")
    return np.stack(frames)  # (F, H, W, 3)


# ----------------------------------------------------------------------------------------------
# Writing


def _tile(tiles, rows, cols):
    """uint8 (N, H, W, 3), N <= rows * cols -> one (rows*H + gaps, cols*W + gaps, 3) image,
    row by row, with GAP pixels of grey between tiles."""
    n, h, w, _ = tiles.shape
    out = np.full((rows * (h + GAP) - GAP, cols * (w + GAP) - GAP, 3), GAP_VALUE, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + GAP): r * (h + GAP) + h, c * (w + GAP): c * (w + GAP) + w] = tiles[i]
    return out


def check_writable(folder, what="output folder"):
    """Create `folder` if needed and make sure files can be written in it, before any long work
    whose results would go there; ValueError with a one-line reason if not. (A test file rather
    than os.access, which says yes to root everywhere.)"""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"cannot write to the {what} {folder}: {e.strerror}")


def write_video(path, video, fps=8, scale=None, cols=None):
    """Write (3, F, H, W) or (B, 3, F, H, W) in [-1, 1]; the extension picks the format:
      .gif  looping animation (Pillow merges identical consecutive frames into one longer frame)
      .mp4 (and other ffmpeg formats)  needs a backend, see the file docstring
      .png  filmstrip: one row per video, one column per frame
    A batch is laid out as a grid of videos in GIF and MP4, `cols` of them a row (default: a
    near-square grid). Frames are enlarged `scale` times
    with nearest-neighbour pixels; None picks the smallest factor that makes them at least
    128 pixels (4 for 32 x 32 frames). Returns `path`."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".gif", ".png") + BACKEND_FORMATS:
        raise ValueError(f"{path}: unknown video format; use .gif, .png or one of "
                         f"{', '.join(BACKEND_FORMATS)}")
    frames = to_uint8(video if video.dim() == 5 else video[None])  # (B, F, H, W, 3)
    B, F, H, W, _ = frames.shape
    scale = scale or max(1, math.ceil(128 / max(H, W)))
    frames = frames.repeat(scale, axis=2).repeat(scale, axis=3)  # (B, F, sH, sW, 3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    if ext == ".png":
        Image.fromarray(_tile(frames.reshape(B * F, *frames.shape[2:]), B, F)).save(path)
        return path
    cols = min(B, cols or math.ceil(math.sqrt(B)))
    rows = math.ceil(B / cols)
    movie = np.stack([_tile(frames[:, f], rows, cols) for f in range(F)])  # (F, H', W', 3)
    if ext == ".gif":
        images = [Image.fromarray(m) for m in movie]
        images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                       duration=round(1000 / fps))
        return path
    # yuv420p, the pixel format every player reads, needs even sides: repeat the last row/column
    pad = ((0, 0), (0, movie.shape[1] % 2), (0, movie.shape[2] % 2), (0, 0))
    movie = np.pad(movie, pad, mode="edge")
    import imageio.v3 as iio
    if _backend(ext) == "pyav":
        iio.imwrite(path, movie, plugin="pyav", codec="libx264", fps=fps)
    else:
        iio.imwrite(path, movie, plugin="FFMPEG", fps=fps, macro_block_size=1)
    return path
