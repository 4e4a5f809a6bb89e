"""The Shapes world: the embedded default dataset, and `measure`, which reads a video back.

TF-T2V (§4) trains on three kinds of data: image-text pairs (LAION), text-free videos (the
paper's uncaptioned video set) and, for the semi-supervised setting (§3.4), a few video-text pairs
(WebVid10M). This file makes all three in miniature. One object (colour x shape x size) sits on a
plain black background and moves in one of four directions at a random speed:

    images    "a big red circle"                 F = 1, no motion
    textfree  ""                                 a moving clip, no caption
    paired    "a big red circle moving left"     a moving clip with its caption

Some colour-shape pairs (`ShapesConfig.holdout`) never appear in either video kind, only as
images: a model that draws them moving has taken appearance from images and motion from text-free
videos, the paper's central claim.

Frames are rendered on the fly, a batch at a time, with hard masks (no anti-aliasing), and depend
only on the sample's own seed. `measure` reads colour, shape, size and direction back from a
video, plus consistency figures; it is the ground truth behind every quality figure in eval.py.

Deviation: the paper's datasets are real photographs and videos; this is a synthetic world small
enough to train on a laptop CPU, with attributes that can be read back exactly.

Tensor legend: B batch, F frames, H W height width; videos are (3, F, H, W) or (B, 3, F, H, W)
with values in [-1, 1].
"""

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

# name -> RGB in [0, 1]: corners of the RGB cube, softened a little, far apart from each other
# and from the black background
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.20, 0.30, 1.00),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.20, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUND = (0.0, 0.0, 0.0)
SHAPES = ("circle", "square", "triangle", "cross")
# "radius" as a fraction of the frame side: every shape fills a (2r x 2r) bounding box
SIZES = {"small": 0.125, "big": 0.25}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# speed range in frame sides per frame: 1-2 pixels per frame at 32 x 32 (see speed_range)
SPEED = (1 / 32, 2 / 32)
CROSS_ARM = 1 / 3  # half-width of a cross's arms, as a fraction of its radius
# fraction of the bounding box each shape fills: what `measure` uses to tell shapes apart
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5,
        "cross": 2 * CROSS_ARM - CROSS_ARM ** 2}

IMAGE_TEMPLATES = ("a {size} {colour} {shape}", "one {size} {colour} {shape}",
                   "the {size} {colour} {shape}", "a picture of a {size} {colour} {shape}")
VIDEO_TEMPLATES = ("a {size} {colour} {shape} moving {direction}",
                   "one {size} {colour} {shape} moving {direction}",
                   "the {size} {colour} {shape} going {direction}",
                   "a {size} {colour} {shape} that moves {direction}")


def caption(colour, shape, size, direction=None, variant=0):
    """"a big red circle" (direction None or "static") or "a big red circle moving left";
    `variant` picks one of a few phrasings (0 is the plain one, used for eval prompts)."""
    moving = direction not in (None, "static")
    templates = VIDEO_TEMPLATES if moving else IMAGE_TEMPLATES
    return templates[variant % len(templates)].format(
        size=size, colour=colour, shape=shape, direction=direction)


def parse_caption(text):
    """The attributes a caption names: {"colour", "shape", "size", "direction"}, None where
    a word is missing; direction is "static" when the caption names none."""
    words = text.lower().replace(",", " ").split()

    def find(names, absent=None):
        return next((w for w in words if w in names), absent)

    return {"colour": find(COLOURS), "shape": find(SHAPES), "size": find(SIZES),
            "direction": find(DIRECTIONS, "static")}


def speed_range(frames, resolution):
    """(slowest, fastest) speed in pixels per frame. SPEED scaled to the resolution, and scaled
    down together for long clips so that a big object's whole path still fits in the frame."""
    lo, hi = SPEED[0] * resolution, SPEED[1] * resolution
    if frames > 1:
        room = (1 - 2 * SIZES["big"]) * resolution  # free travel for the biggest object
        scale = min(1.0, room / ((frames - 1) * hi))
        lo, hi = lo * scale, hi * scale
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Rendering


def _shape_masks(dx, dy, r):
    """Hard masks of every shape, centred at the origin of (dx, dy) with radius r: (4, ...)."""
    a = CROSS_ARM * r
    ax, ay = dx.abs(), dy.abs()
    circle = dx * dx + dy * dy <= r * r
    square = (ax <= r) & (ay <= r)
    triangle = (ay <= r) & (2 * ax <= dy + r)  # apex up, base down: width grows with dy
    cross = ((ax <= a) & (ay <= r)) | ((ay <= a) & (ax <= r))
    return torch.stack([circle, square, triangle, cross])


def render_batch(colours, shapes, sizes, directions, seeds, frames=8, resolution=32):
    """Render B clips at once: lists of names (direction None or "static" for no motion) and
    integer seeds, all of length B -> (B, 3, F, H, W) in [-1, 1].

    Each clip depends only on its own seed (speed, start position), so a batch equals the
    stack of single renders. The start is drawn so that the object stays wholly in frame for
    the whole clip."""
    moves = (None, "static", *DIRECTIONS)
    for names, table in ((colours, COLOURS), (shapes, SHAPES), (sizes, SIZES),
                         (directions, moves)):
        bad = [n for n in names if n not in table]
        if bad:
            raise ValueError(f"unknown name(s) {bad}; expected one of {list(table)}")
    n = len(seeds)
    R, F = resolution, frames
    # three uniform draws per clip from its own generator: speed, x start, y start (Python's
    # generator, because torch.Generator keeps only the low 32 bits of a seed)
    u = torch.tensor([[g.random() for _ in range(3)] for g in map(random.Random, seeds)],
                     dtype=torch.float32).view(n, 3)  # (B, 3)
    r = torch.tensor([SIZES[s] * R for s in sizes])  # (B,) radius in pixels
    d = torch.tensor([DIRECTIONS.get(x, (0, 0)) for x in directions],
                     dtype=torch.float32).view(n, 2)  # (B, 2) unit vector, 0 when static
    lo, hi = speed_range(F, R)
    v = d * (lo + u[:, 0] * (hi - lo))[:, None]  # (B, 2) pixels per frame
    travel = v * (F - 1)
    low = r[:, None] + (-travel).clamp(min=0)  # lowest start that keeps the path in frame
    high = R - r[:, None] - travel.clamp(min=0)
    start = low + u[:, 1:] * (high - low)  # (B, 2)
    t = torch.arange(F, dtype=torch.float32)
    centre = start[:, None, :] + t[None, :, None] * v[:, None, :]  # (B, F, 2) x, y

    pix = torch.arange(R, dtype=torch.float32) + 0.5  # pixel centres
    dx = pix.view(1, 1, 1, R) - centre[..., 0, None, None]  # (B, F, 1, W)
    dy = pix.view(1, 1, R, 1) - centre[..., 1, None, None]  # (B, F, H, 1)
    masks = _shape_masks(dx, dy, r.view(n, 1, 1, 1))  # (4, B, F, H, W)
    shape_idx = torch.tensor([SHAPES.index(s) for s in shapes], dtype=torch.long)
    mask = masks[shape_idx, torch.arange(n)]  # (B, F, H, W)

    colour = torch.tensor([COLOURS[c] for c in colours]).view(n, 3, 1, 1, 1) * 2 - 1
    background = torch.tensor(BACKGROUND).view(1, 3, 1, 1, 1) * 2 - 1
    return torch.where(mask[:, None], colour, background)  # (B, 3, F, H, W)


def render(colour, shape, size, direction, frames=8, resolution=32, seed=0):
    """One clip: (3, F, H, W) in [-1, 1]. See render_batch."""
    return render_batch([colour], [shape], [size], [direction], [seed], frames, resolution)[0]


# ----------------------------------------------------------------------------------------------
# The three kinds of training data


def all_combinations():
    """Every (colour, shape, size), in a fixed order: the eval prompt suite."""
    return [(c, s, z) for c in COLOURS for s in SHAPES for z in SIZES]


@dataclass
class ShapesConfig:
    resolution: int = 32  # frame side in pixels
    frames: int = 8  # frames per video clip (images have 1)
    n_images: int = 5000  # image-text pairs
    n_textfree: int = 5000  # text-free videos (the scaling ablation doubles this)
    n_paired: int = 5000  # video-text pairs (semi-supervised branch)
    # colour-shape pairs never in any video kind, only as images: one per shape, four colours
    holdout: tuple = (("red", "triangle"), ("green", "cross"), ("blue", "circle"),
                      ("yellow", "square"))
    seed: int = 0  # the whole dataset is a function of this seed


def is_held_out(colour, shape, config=None):
    """True when (colour, shape) never appears in a video kind of `config`'s dataset."""
    holdout = (config or ShapesConfig()).holdout
    return (colour, shape) in {tuple(p) for p in holdout}


KINDS = ("images", "textfree", "paired")


class ShapesDataset(torch.utils.data.Dataset):
    """One kind of Shapes data. Item i -> ((3, F, H, W) in [-1, 1], caption): F = 1 for images,
    caption "" for text-free videos. Item i is fixed by (config.seed, kind, i) alone, so
    doubling a kind's size keeps its first items, and the kinds never share a sample."""

    def __init__(self, kind, config=None):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        self.kind, self.config = kind, config or ShapesConfig()
        c = self.config
        self.length = {"images": c.n_images, "textfree": c.n_textfree, "paired": c.n_paired}[kind]
        self.frames = 1 if kind == "images" else c.frames
        pairs = [(col, s) for col in COLOURS for s in SHAPES]
        if kind != "images":
            pairs = [p for p in pairs if not is_held_out(*p, c)]
        self.pairs = pairs
        self.base_seed = (c.seed * len(KINDS) + KINDS.index(kind)) << 40  # then + index

    def __len__(self):
        return self.length

    def attributes(self, i):
        """Item i's {"colour", "shape", "size", "direction", "seed", "caption"}."""
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} {self.kind}")
        g = random.Random(self.base_seed + i)
        colour, shape = g.choice(self.pairs)
        size = g.choice(list(SIZES))
        direction = "static" if self.kind == "images" else g.choice(list(DIRECTIONS))
        seed = g.getrandbits(63)
        text = "" if self.kind == "textfree" else caption(colour, shape, size, direction, i)
        return {"colour": colour, "shape": shape, "size": size, "direction": direction,
                "seed": seed, "caption": text}

    def batch(self, indices: Sequence[int]):
        """Items `indices` rendered in one call: ((B, 3, F, H, W), list of B captions)."""
        a = [self.attributes(int(i)) for i in indices]
        videos = render_batch([x["colour"] for x in a], [x["shape"] for x in a],
                              [x["size"] for x in a], [x["direction"] for x in a],
                              [x["seed"] for x in a], self.frames, self.config.resolution)
        return videos, [x["caption"] for x in a]

    def __getitem__(self, i):
        videos, captions = self.batch([i])
        return videos[0], captions[0]


# ----------------------------------------------------------------------------------------------
# Reading a video back

FOUND_THRESHOLD = 0.35  # a pixel is the object when a channel differs from the background by this
MIN_AREA = 0.004  # fewest object pixels, as a fraction of the frame, for a frame to count as found


def _classify_shape(fill, y_offset):
    """Triangles put their centroid below the box centre (1/6 of the box height); the
    symmetric shapes differ in how much of their box they fill (FILL)."""
    if y_offset > 0.08:
        return "triangle"
    if fill > (FILL["square"] + FILL["circle"]) / 2:
        return "square"
    if fill > (FILL["circle"] + FILL["cross"]) / 2:
        return "circle"
    return "cross"


def object_mask(video):
    """Which pixels show the object: a channel more than FOUND_THRESHOLD (in [0, 1] units) from
    the background. (B, 3, F, H, W) in [-1, 1] -> bool (B, F, H, W)."""
    background = torch.tensor(BACKGROUND, device=video.device).view(1, 3, 1, 1, 1) * 2 - 1
    return (video - background).abs().amax(1) > 2 * FOUND_THRESHOLD  # [-1, 1] units: x2


def _measure_chunk(video):
    """measure() for (B, 3, F, H, W): per-frame statistics in one batched pass, then a short
    per-clip summary."""
    B, _, F, H, W = video.shape
    video = video.detach().float().cpu()  # measuring is cheap; generated clips may be on a GPU
    mask = object_mask(video)  # (B, F, H, W)
    m = mask.float()
    area = m.sum((2, 3))  # (B, F)
    found = area >= max(1.0, MIN_AREA * H * W)
    ys = torch.arange(H, dtype=torch.float32) + 0.5
    xs = torch.arange(W, dtype=torch.float32) + 0.5
    a = area.clamp(min=1)
    cx = (m.sum(2) * xs).sum(-1) / a  # (B, F)
    cy = (m.sum(3) * ys).sum(-1) / a
    centroid = torch.stack([cx, cy], -1)  # (B, F, 2)
    colour = torch.einsum("bcfp,bfp->bfc", video.flatten(3), m.flatten(2))  # (B, F, 3) sums
    colour = (colour / a[..., None] + 1) / 2  # mean colour of the object, [0, 1] units

    def extent(any_, n):  # bounding box along one axis from "any object pixel in this line"
        idx = torch.arange(n)
        first = torch.where(any_, idx, n).amin(-1)
        last = torch.where(any_, idx, -1).amax(-1)
        return first.float(), (last - first + 1).clamp(min=1).float()

    top, box_h = extent(mask.any(3), H)  # (B, F)
    _, box_w = extent(mask.any(2), W)
    nan = torch.tensor(float("nan"))
    fill = torch.where(found, area / (box_w * box_h), nan).nanmedian(1).values  # (B,)
    y_offset = torch.where(found, (cy - top - box_h / 2) / box_h, nan).nanmedian(1).values
    area_med = torch.where(found, area, nan).nanmedian(1).values

    palette = torch.tensor(list(COLOURS.values()))  # (K, 3)
    names = list(COLOURS)
    side = min(H, W)
    slow = speed_range(F, side)[0]
    size_cut = math.sqrt(SIZES["small"] * SIZES["big"]) * side
    out = []
    for b in range(B):
        f = found[b]
        n_found = int(f.sum())
        if n_found == 0:
            out.append({"colour": "none", "shape": "none", "size": "none",
                        "direction": "static", "found": 0.0, "colour_drift": 0.0,
                        "area_variation": 0.0, "path_smoothness": 0.0})
            continue
        w = area[b, f]
        mean = (colour[b, f] * w[:, None]).sum(0) / w.sum()  # area-weighted clip colour
        name = names[int((palette - mean).norm(dim=1).argmin())]
        shape = _classify_shape(float(fill[b]), float(y_offset[b]))
        radius = math.sqrt(float(area_med[b]) / FILL[shape]) / 2
        frame_ids = f.nonzero().flatten()
        first, last = int(frame_ids[0]), int(frame_ids[-1])
        shift = centroid[b, last] - centroid[b, first]
        direction = "static"
        if last > first and float(shift.abs().max()) >= 0.5 * slow * (last - first):
            dx, dy = float(shift[0]), float(shift[1])
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"
        triple = f[:-2] & f[1:-1] & f[2:]  # second differences need three found frames
        accel = (centroid[b, 2:] - 2 * centroid[b, 1:-1] + centroid[b, :-2]).norm(dim=-1)
        out.append({
            "colour": name, "shape": shape, "size": "big" if radius > size_cut else "small",
            "direction": direction, "found": n_found / F,
            "colour_drift": float((colour[b, f] - mean).norm(dim=-1).mean()),
            "area_variation": float(w.std(unbiased=False) / w.mean()),
            "path_smoothness": float(accel[triple].mean()) if triple.any() else 0.0,
        })
    return out


@torch.no_grad()
def measure(video, chunk=256):
    """Read a video back: (3, F, H, W) -> dict, (B, 3, F, H, W) -> list of dicts; [-1, 1].

    The object is every pixel with a channel more than FOUND_THRESHOLD (in [0, 1] units) from
    the background; a frame has the object when it has at least MIN_AREA of the frame of such
    pixels ("found" frames). Keys:
      colour          palette name nearest to the object's mean colour over found frames
      shape           from the median over found frames of the bounding-box fill ratio and of
                      the centroid's offset below the box centre (triangles: 1/6 of the box)
      size            "small"/"big": radius sqrt(median area / FILL[shape]) / 2 against the
                      geometric mean of the two SIZES
      direction       dominant axis of the centroid's move from the first to the last found
                      frame; "static" below half the slowest rendered speed (and when F = 1)
      found           fraction of frames where the object is found
      colour_drift    mean distance of each found frame's mean colour from the clip's, in [0, 1]
                      RGB units (0 for a perfectly steady colour)
      area_variation  std / mean of the object's area over found frames
      path_smoothness mean norm in pixels of the centroid's second difference over runs of three
                      found frames (0 for constant velocity, and when there is no such run)
    With no object found anywhere: colour, shape and size are "none", the figures 0.
    Hard-edged rendering makes area and path jitter by a pixel, so rendered clips score a small
    non-zero area_variation and path_smoothness: compare generated clips with rendered ones."""
    single = video.dim() == 4
    if single:
        video = video[None]
    out = []
    for i in range(0, len(video), chunk):
        out += _measure_chunk(video[i: i + chunk])
    return out[0] if single else out
