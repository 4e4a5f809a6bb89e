"""Spatial conditions for compositional synthesis (TF-T2V §4, "compositional video synthesis"),
in miniature: per-frame maps computed from frames, read from files, or drawn from a path spec.

TF-T2V extends its recipe to VideoComposer's conditions (depth, sketch, motion vectors): the
content branch learns them from condition-image pairs, the motion branch sees text-free videos
without any, and the model still follows a per-frame condition sequence at inference. The Shapes
world has no depth, so its stand-ins are:

    silhouette  the object's mask (a depth map of a flat object on a far background)
    sketch      the object's outline: mask pixels with a non-object pixel among their 8
                neighbours (an edge map, one pixel thick)

A map is +1 on the object (or outline) and -1 elsewhere; 0 means "no condition", so an absent
condition (zeros, as VideoComposer) never looks like a real, empty map.

Sources of a condition sequence (`condition_sequence`):
    "shapes:SHAPE,SIZE,DIRECTION[,SEED]"  a rendered Shapes path, e.g. "shapes:triangle,big,left,3"
    a GIF (or any video file data.video reads)   frames whose bright pixels are "on"
    a folder of images, one per frame in name order   idem

Tensor legend: B batch, K condition kinds, F frames, H W height width.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import shapes, video

KINDS = ("silhouette", "sketch")


def silhouette(frames):
    """(B, 3, F, H, W) in [-1, 1] -> bool (B, F, H, W): the object's pixels (data.shapes'
    reading of "not background")."""
    return shapes.object_mask(frames)


def sketch(frames):
    """(B, 3, F, H, W) -> bool (B, F, H, W): the object's pixels that touch a non-object pixel."""
    mask = silhouette(frames)
    B, F_, H, W = mask.shape
    outside = (~mask).float().view(B * F_, 1, H, W)
    near_outside = F.max_pool2d(outside, 3, stride=1, padding=1).view(B, F_, H, W) > 0
    return mask & near_outside


MAKERS = {"silhouette": silhouette, "sketch": sketch}


def parse_kinds(text):
    """"silhouette,sketch" -> ("silhouette", "sketch"); "" -> ()."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in MAKERS]
    if unknown:
        raise ValueError(f"unknown condition kind(s) {unknown}: use {', '.join(KINDS)}")
    return kinds


def to_map(mask):
    """bool -> float map: +1 on, -1 off (0 is reserved for "absent")."""
    return mask.float() * 2 - 1


def condition_maps(frames, kinds):
    """Frames (B, 3, F, H, W) -> maps (B, K, F, H, W), one channel per kind, in `kinds` order."""
    return torch.stack([to_map(MAKERS[k](frames)) for k in kinds], dim=1)


def iou(pred, target):
    """Intersection over union of boolean masks (..., H, W) -> (...); 1.0 where both are empty."""
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ----------------------------------------------------------------------------------------------
# Condition sequences for inference


def render_spec(spec, frames, resolution):
    """"shapes:SHAPE,SIZE,DIRECTION[,SEED]" -> a rendered clip (3, F, H, W). The colour does not
    matter: maps are colour-blind."""
    parts = [p.strip() for p in spec[len("shapes:"):].split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"a Shapes path spec is shapes:SHAPE,SIZE,DIRECTION[,SEED], got {spec!r}")
    shape, size, direction = parts[:3]
    try:
        seed = int(parts[3]) if len(parts) == 4 else 0
        return shapes.render("red", shape, size, direction, frames, resolution, seed)
    except ValueError as e:
        raise ValueError(f"bad Shapes path spec {spec!r}: {e}")


def read_maps(source, frames, resolution):
    """A GIF/video file or a folder of images -> bool (F, H, W) (bright pixels on); the first
    `frames` frames, resized (nearest) to resolution x resolution."""
    if os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.lower().endswith(video.PILLOW_FORMATS))
        arrays = [video.read_video(os.path.join(source, f), limit=1)[0] for f in files]
    elif os.path.isfile(source):
        arrays = list(video.read_video(source, limit=frames))
    else:
        raise ValueError(f"no condition file or folder at {source}")
    if len(arrays) < frames:
        raise ValueError(f"{source} has {len(arrays)} frame(s); {frames} are needed")
    out = []
    for a in arrays[:frames]:
        grey = Image.fromarray(a).convert("L").resize((resolution, resolution), Image.NEAREST)
        out.append(torch.from_numpy(np.asarray(grey) > 127))
    return torch.stack(out)  # (F, H, W)


def condition_sequence(kind, source, frames, resolution):
    """One condition sequence for inference: (F, H, W) map in {-1, +1} of `kind`, from a Shapes
    path spec (the map is computed from the rendered clip) or from per-frame map files."""
    if kind not in MAKERS:
        raise ValueError(f"unknown condition kind {kind!r}: use {', '.join(KINDS)}")
    if source.startswith("shapes:"):
        clip = render_spec(source, frames, resolution)[None]  # (1, 3, F, H, W)
        return to_map(MAKERS[kind](clip)[0])
    return to_map(read_maps(source, frames, resolution))
