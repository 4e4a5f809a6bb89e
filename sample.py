"""sample.py: generate videos from a trained tft2v checkpoint (TF-T2V inference).

    text -> video          python sample.py --ckpt runs/quick --prompt "a big red circle"
    image -> video         python sample.py --ckpt runs/quick --image frame.png
    image + text -> video  python sample.py --ckpt runs/quick --image frame.png --prompt "... left"
    conditions + text      python sample.py --ckpt runs/compose --prompt "a big red circle" \
                               --condition silhouette=shapes:circle,big,right --out out/c.png

DDIM (or DDPM) with classifier-free guidance against the null context, as the official sampler.
`--out` picks the format by its extension: .gif, .mp4 (needs an imageio ffmpeg backend) or .png
(a filmstrip: one row per video, after one row per condition map). With several videos,
.gif/.mp4 names get _00, _01, ... suffixes. A compositional checkpoint (train.py --preset compose)
takes per-frame condition sequences, `--condition KIND=SOURCE` (repeatable; kinds it was trained
with, e.g. silhouette, sketch), where SOURCE is a GIF, a folder of per-frame images (bright = on)
or a Shapes path spec "shapes:SHAPE,SIZE,DIRECTION[,SEED]" (see data/conditions.py); every video
of the call follows the same sequence.
The same checkpoint, prompt and seed give the same video.
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

import tft2v
from data import conditions, video
from data.folders import resize_crop


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file, or a run folder (its newest)")
    p.add_argument("--prompt", action="append", default=[], help="repeatable; '' = unconditional")
    p.add_argument("--prompts-file", default="", help="one prompt per line")
    p.add_argument("--image", action="append", default=[],
                   help="condition image(s): one for all prompts, or one per prompt")
    p.add_argument("--condition", action="append", default=[], metavar="KIND=SOURCE",
                   help="a per-frame condition sequence (compositional checkpoints)")
    p.add_argument("--guide-maps", action="store_true",
                   help="leave the condition maps out of the guidance's null pass, so guidance "
                        "also pushes towards them (otherwise: maps in both passes)")
    p.add_argument("--num", type=int, default=1, help="videos per prompt (seed, seed+1, ...)")
    p.add_argument("--frames", type=int, default=None, help="default: the training clip length")
    p.add_argument("--size", type=int, default=None, help="default: the training resolution")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default 50); DDPM always takes all T (1000) steps")
    p.add_argument("--guidance", type=float, default=9.0)
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where it is faster")
    p.add_argument("--compile", action="store_true",
                   help="run the UNet under torch.compile: 1-2 min of compiling on a 2-core "
                        "CPU (less once inductor's cache has the graph), then each video ~20%% "
                        "faster there; pays for many videos of one shape (--num)")
    p.add_argument("--out", default="samples/video.gif", help=".gif, .mp4 or .png")
    p.add_argument("--fps", type=int, default=8, help="frames per second of a .gif or .mp4")
    return p.parse_args(argv)


def load_image(path, size):
    """An image file -> (3, size, size) in [-1, 1], converted and centre-cropped as the
    folder loaders do."""
    try:
        img = resize_crop(video.to_rgb(Image.open(path)), (size, size))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}")
    return video.from_uint8(np.asarray(img)[None])[:, 0]  # (3, H, W)


def output_paths(out, count):
    stem, ext = os.path.splitext(out)
    if ext.lower() not in (".gif", ".mp4", ".png"):
        raise ValueError(f"--out must end in .gif, .mp4 or .png, got {out!r}")
    if ext.lower() == ".png" or count == 1:
        return [out]
    return [f"{stem}_{i:02d}{ext}" for i in range(count)]


def check_prompts(prompts, model):
    """Over-long prompts are truncated by the tokenizer; say so once per prompt."""
    limit = model.clip.config.context_length - 2  # start and end tokens
    for p in prompts:
        n = len(model.tokenizer.encode(p))
        if n > limit:
            print(f"warning: prompt truncated to {limit} of its {n} tokens: {p[:60]!r}",
                  file=sys.stderr)


def maps_from_specs(specs, model, frames, size):
    """["silhouette=shapes:circle,big,right", ...] -> maps (1, K, F, H, W) in the checkpoint's
    kind order, absent kinds zero; None when no condition is given."""
    if not specs:
        return None
    kinds = model.condition_kinds
    if not kinds:
        raise ValueError("this checkpoint was trained without condition maps (--condition)")
    maps = torch.zeros(1, len(kinds), frames, size, size)
    for spec in specs:
        kind, sep, source = spec.partition("=")
        if not sep or kind not in kinds:
            raise ValueError(f"--condition wants KIND=SOURCE with KIND one of {', '.join(kinds)}, "
                             f"got {spec!r}")
        maps[0, kinds.index(kind)] = conditions.condition_sequence(kind, source, frames, size)
    return maps


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    try:
        if args.sampler == "ddpm" and args.steps is not None:
            raise ValueError("--steps is for ddim: ddpm takes all T steps (for a few-step "
                             "sampler with fresh noise every step, use ddim with --eta 1)")
        args.steps = 50 if args.steps is None else args.steps
        for name in ("steps", "num", "fps", "frames", "size"):
            value = getattr(args, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")
        if not 0 <= args.eta < math.inf:  # NaN fails this too
            raise ValueError(f"--eta must be at least 0 (and finite), got {args.eta}")
        if not math.isfinite(args.guidance):
            raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
        prompts = list(args.prompt)
        if args.prompts_file:
            try:
                with open(args.prompts_file) as f:
                    prompts += [line.rstrip("\n") for line in f if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read --prompts-file {args.prompts_file}: "
                                 f"{getattr(e, 'strerror', None) or e}") from None
        if not prompts and not args.image and not args.condition:
            raise ValueError("give --prompt, --prompts-file, --image or --condition")
        output_paths(args.out, 1)  # checks the extension before any work
        video.check_writable(os.path.dirname(os.path.abspath(args.out)))
        device = tft2v.pick_device(args.device)
        precision = tft2v.pick_precision(args.precision, device)
        tft2v.keep_freed_memory()
        model, configs = tft2v.load_checkpoint(args.ckpt, use_ema=not args.raw, device=device)
        if args.compile:
            # as train.py --compile: one graph per batch and frame count, the module unchanged
            model.unet.forward = torch.compile(model.unet.forward, dynamic=False)
            print("--compile: the first DDIM step compiles the UNet (1-2 min on a 2-core CPU)",
                  file=sys.stderr)
        frames = args.frames or configs["shapes"]["frames"]
        size = args.size or configs["shapes"]["resolution"]
        multiple = model.unet_config.size_multiple()
        if size % multiple:
            raise ValueError(f"--size must be a multiple of {multiple} for this checkpoint's "
                             f"UNet, got {size}")
        images = [load_image(p, size) for p in args.image]
        maps = maps_from_specs(args.condition, model, frames, size)
        if maps is not None and not prompts and not images:
            prompts = [""]  # conditions alone: unconditional text
        n = max(len(prompts), len(images))
        if len(images) not in (0, 1, n) or len(prompts) not in (0, 1, n):
            raise ValueError(f"{len(prompts)} prompts and {len(images)} images do not pair up")
        prompts = (prompts * n if len(prompts) == 1 else prompts) or None
        images = torch.stack(images * n if len(images) == 1 else images) if images else None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if prompts:
        check_prompts(prompts, model)
    try:
        videos = torch.cat([
            model.generate(prompts, images, frames=frames, size=size, steps=args.steps,
                           guidance=args.guidance, sampler=args.sampler, seed=args.seed + k,
                           eta=args.eta, precision=precision, progress=True,
                           maps=None if maps is None else maps.expand(n, -1, -1, -1, -1),
                           guide_maps=args.guide_maps)
            for k in range(args.num)]).cpu()  # (num * n, C, F, H, W)
    except tft2v.compile_errors(args.compile) as e:  # e.g. no C++ compiler on a CPU
        sys.exit(f"error: --compile could not compile the UNet ({tft2v.compile_failure(e)}); "
                 f"run without --compile")
    paths = output_paths(args.out, len(videos))
    if paths[0].lower().endswith(".png") and maps is not None:  # condition rows first
        shown = maps[0][:, None].expand(-1, 3, -1, -1, -1)  # (K, 3, F, H, W) grey maps
        video.write_video(paths[0], torch.cat([shown, videos]), fps=args.fps)
    elif len(paths) == 1:
        video.write_video(paths[0], videos if len(videos) > 1 else videos[0], fps=args.fps)
    else:
        for path, v in zip(paths, videos):
            video.write_video(path, v, fps=args.fps)
    for path in paths:
        print(path)
    print(f"{len(videos)} video(s) in {time.time() - t0:.1f} s", file=sys.stderr)
    return videos


if __name__ == "__main__":
    main()
