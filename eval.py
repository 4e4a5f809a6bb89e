"""eval.py: score a tft2v checkpoint by what its videos show (TF-T2V §4, in miniature).

Generates a fixed prompt suite from a checkpoint and reads every video back with
`data.shapes.measure`, the Shapes world's ground truth: does the video show the prompted colour,
shape, size (and direction, on direction prompts), and does the object move? Colour-shape pairs
that were held out of every video split (seen only as images) are scored separately: drawing them
moving is the paper's claim that appearance comes from images and motion from text-free videos.

    python eval.py runs/quick --suite demo --seeds 8     # the README's 32 demo videos
    python eval.py runs/toy --suite full --seeds 2       # every colour x shape x size

Writes a JSON file and a markdown table next to the checkpoint (or to --out).
"""

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import tft2v
import train
from data import shapes



def prompt_suite(name, shapes_config):
    """[(prompt, wanted attributes)] for a suite: "demo", "full" (every colour x shape x size)
    or "directions" (every colour x shape x size x direction, for semi-supervised models)."""
    if name == "demo":
        prompts = train.DEMO_PROMPTS.split(";")  # one (blue circle) held out of the videos
    elif name == "full":
        prompts = [shapes.caption(*c) for c in shapes.all_combinations()]
    elif name == "directions":
        prompts = [shapes.caption(*c, direction=d) for c in shapes.all_combinations()
                   for d in shapes.DIRECTIONS]
    else:
        raise ValueError(f"unknown suite {name!r}: demo, full or directions")
    suite = []
    for p in prompts:
        want = shapes.parse_caption(p)
        want["held_out"] = shapes.is_held_out(want["colour"], want["shape"], shapes_config)
        suite.append((p, want))
    return suite


def score(measured, want):
    """Per-video hits (1.0 / 0.0) of one measured video against its prompt's attributes."""
    hits = {k: float(measured[k] == want[k]) for k in ("colour", "shape", "size")}
    hits["moving"] = float(measured["direction"] != "static")
    if want["direction"] not in (None, "static"):
        hits["direction"] = float(measured["direction"] == want["direction"])
    return hits


def summarize(rows):
    """Mean of every hit over all rows, over held-out rows, and over seen rows."""
    def mean(subset):
        keys = sorted({k for r in subset for k in r["hits"]})
        return {k: sum(r["hits"][k] for r in subset if k in r["hits"]) /
                max(1, sum(k in r["hits"] for r in subset)) for k in keys}
    held = [r for r in rows if r["held_out"]]
    seen = [r for r in rows if not r["held_out"]]
    return {"all": mean(rows), "held_out": mean(held) if held else {},
            "seen": mean(seen) if seen else {}, "videos": len(rows)}


@torch.no_grad()
def evaluate(model, configs, suite, seeds=2, steps=50, guidance=9.0, batch=32, precision="fp32",
             progress=True):
    """Generate every prompt of the suite with each seed; returns (rows, seconds per video)."""
    s = configs["shapes"]
    rows, t0 = [], time.time()
    chunks = [(seed, suite[i: i + batch]) for seed in range(seeds)
              for i in range(0, len(suite), batch)]
    for seed, chunk in tqdm(chunks, disable=not progress, desc="eval"):
        videos = model.generate([p for p, _ in chunk], frames=s["frames"], size=s["resolution"],
                                steps=steps, guidance=guidance, seed=seed, precision=precision)
        for (p, want), m in zip(chunk, shapes.measure(videos.cpu())):
            rows.append({"prompt": p, "seed": seed, "held_out": want["held_out"],
                         "measured": m, "hits": score(m, want)})
    return rows, (time.time() - t0) / max(1, len(rows))


def markdown(summary, title):
    keys = sorted(summary["all"])
    lines = [f"### {title}", "", "| videos | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for name in ("all", "seen", "held_out"):
        if summary[name]:
            cells = [f"{100 * summary[name].get(k, float('nan')):.1f}%" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="checkpoint file or run folder")
    p.add_argument("--suite", default="full", choices=["demo", "full", "directions"])
    p.add_argument("--seeds", type=int, default=2, help="videos per prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=9.0)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", help="auto (bf16 where faster) | fp32 | bf16")
    p.add_argument("--out", default="", help="output stem (default: next to the checkpoint)")
    args = p.parse_args(argv)
    if args.seeds <= 0 or args.steps <= 0:
        sys.exit("error: --seeds and --steps must be positive")
    try:
        device = tft2v.pick_device(args.device)
        model, configs = tft2v.load_checkpoint(args.ckpt, use_ema=not args.raw, device=device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    suite = prompt_suite(args.suite, shapes.ShapesConfig(**{
        k: tuple(map(tuple, v)) if k == "holdout" else v for k, v in configs["shapes"].items()}))
    rows, per_video = evaluate(model, configs, suite, args.seeds, args.steps, args.guidance,
                               args.batch, tft2v.pick_precision(args.precision, device))
    summary = summarize(rows) | {"seconds_per_video": per_video, "suite": args.suite,
                                 "seeds": args.seeds, "steps": args.steps,
                                 "guidance": args.guidance}
    folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt)
    stem = args.out or os.path.join(folder, f"eval_{args.suite}")
    with open(stem + ".json", "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    table = markdown(summary, f"{args.suite} suite, {args.seeds} seed(s), {args.steps} DDIM "
                              f"steps, guidance {args.guidance}")
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"{per_video:.2f} s per video; wrote {stem}.json and {stem}.md")
    return summary


if __name__ == "__main__":
    main()
