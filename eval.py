"""eval.py: score a tft2v checkpoint by what its videos show (TF-T2V §4, in miniature).

Generates a fixed prompt suite from a checkpoint and reads every video back with
`data.shapes.measure`, the Shapes world's ground truth: does the video show the prompted colour,
shape, size (and direction, on direction prompts), and does the object move? Colour-shape pairs
that were held out of every video split (seen only as images) are scored separately: drawing them
moving is the paper's claim that appearance comes from images and motion from text-free videos.

Beside accuracy, with the checkpoint's own (project) CLIP:
- temporal consistency: the paper's frame consistency (mean CLIP cosine similarity of consecutive
  frames) and measure's pixel figures (colour drift, area variation, path smoothness);
- Frechet distances in CLIP feature space against rendered Shapes clips of the same prompts:
  per frame (FID-like) and per clip (FVD-like; the clip feature is defined in `clip_features`);
- the same figures for rendered clips (other seeds) as the ceiling, and the sampling time.

    python eval.py runs/quick --suite demo --seeds 8     # the README's 32 demo videos
    python eval.py runs/toy --suite full --seeds 2       # every colour x shape x size
    python eval.py runs/toy --probe      # does it read each caption word? (caption_probe)

Writes a JSON file, markdown tables (with what each prompted attribute was read as) and a GIF
of every scored video (framed green where every attribute was read as prompted, red where one was
not) next to the checkpoint (or to --out).

The paper's ablations in miniature (`ablate`): train the `toy` preset (or any) with each variant
and several seeds, score every run on the directions suite, write one table of mean and spread:

    python eval.py --ablate all --preset toy --train_seeds 2 --out runs/ablation \
        --train_flags "--steps 9000 --time_budget 0 --unet.attention_levels '(0, 1)' \
                       --clip_trails false --optimizer adamw"

(the README's table: 9,000 steps a run, with the UNet `toy` had then, attending at 16x16 too,
its CLIP stage of then, on images alone: the same CLIP for every variant, and AdamW).

Compositional synthesis (`compose`): train a model whose content branch sees silhouette and
sketch maps with its images while its motion branch sees text-free videos without any (TF-T2V's
recipe), a control that also pairs videos with their maps, and the unconditioned model; score each
on the condition suite (every colour x shape x size on its own path; IoU of the generated object
with the path's silhouette, per frame), write one table and a filmstrip:

    python eval.py --compose --train_seeds 2 --out runs/compose
    python eval.py runs/compose/ours_seed0 --compose      # score one compositional checkpoint
"""

import argparse
import json
import math
import os
import random
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import clip_tiny
import tft2v
import train
from data import conditions, shapes, video

# ----------------------------------------------------------------------------------------------
# 1. Prompt accuracy, read back by data.shapes.measure


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


def confusion(rows):
    """What `measure` read against what the prompt asked, per attribute: {attribute: {prompted:
    {read: videos}}}, the hits on the diagonal; "none" where no object was found. It tells
    "draws circles for everything" from "draws nothing". Directions only for prompts with one."""
    out = {}
    for r in rows:
        want = shapes.parse_caption(r["prompt"])
        for k in ("colour", "shape", "size", "direction"):
            if want[k] in (None, "static"):
                continue
            cell = out.setdefault(k, {}).setdefault(want[k], {})
            cell[r["measured"][k]] = cell.get(r["measured"][k], 0) + 1
    return out


HIT, MISS = (0.0, 0.8, 0.0), (0.9, 0.0, 0.0)  # a tile's frame: every attribute read right / not


def contact_sheet(path, videos, rows, seeds):
    """Every scored video in one animated grid (`path`, GIF): a prompt's seeds side by side,
    prompts in suite order, as many whole prompts a row as fit in 8 videos (one when it has more
    seeds); each video framed green where `measure` read every attribute as prompted, red where
    it missed any (the JSON rows say which).
    videos (N, 3, F, H, W) and rows seed-major, as generate_suite and score_videos give them."""
    N, C, Fr, H, W = videos.shape
    prompts = N // seeds
    order = [s * prompts + p for p in range(prompts) for s in range(seeds)]  # prompt-major
    framed = torch.empty(N, C, Fr, H + 2, W + 2)
    for i, j in enumerate(order):
        colour = HIT if all(rows[j]["hits"].values()) else MISS
        framed[i] = torch.tensor(colour).mul(2).sub(1).view(C, 1, 1, 1)  # [0, 1] -> [-1, 1]
        framed[i, :, :, 1:-1, 1:-1] = videos[j]
    return video.write_video(path, framed, scale=2, cols=seeds * max(1, 8 // seeds))


# ----------------------------------------------------------------------------------------------
# 2. Temporal consistency and Frechet distances in CLIP feature space


@torch.no_grad()
def frame_embeddings(clip, videos, batch=256):
    """Videos (B, 3, F, H, W) in [-1, 1] -> unit-norm CLIP image embeddings of every frame
    (B, F, E)."""
    B, C, F_, H, W = videos.shape
    frames = videos.transpose(1, 2).reshape(B * F_, C, H, W).float()
    out = [F.normalize(clip.encode_image(clip_tiny.preprocess(
        frames[i: i + batch], clip.config.image_resolution)).float(), dim=-1)
        for i in range(0, len(frames), batch)]
    return torch.cat(out).view(B, F_, -1)


def frame_consistency(emb):
    """TF-T2V §4's frame consistency: the mean cosine similarity of consecutive frames' CLIP
    embeddings, per clip. emb: (B, F, E) unit vectors -> (B,)."""
    return (emb[:, 1:] * emb[:, :-1]).sum(-1).mean(1)


def clip_features(emb):
    """The per-clip feature of the FVD-like distance, (B, F, E) -> (B, 2E): the clip's mean frame
    embedding (appearance) next to its last minus its first frame embedding (how appearance and
    position change over the clip). FVD's I3D features are not available here; this is the
    smallest feature that sees both what a clip shows and that it moves, and stays well within
    the number of clips a suite has (2E = 128 for the tiny CLIP)."""
    return torch.cat([emb.mean(1), emb[:, -1] - emb[:, 0]], dim=1)


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two feature sets a (N, d), b (M, d)
    (FID, Heusel et al. 2017):  |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2).
    Matrix square roots by symmetric eigendecomposition, in float64."""
    a, b = a.double(), b.double()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least 2 features in each set")
    cov_a, cov_b = torch.cov(a.T).view(a.shape[1], -1), torch.cov(b.T).view(b.shape[1], -1)
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    mean = (a.mean(0) - b.mean(0)).pow(2).sum()
    return (mean + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def suite_moves(suite, seeds, seed_offset):
    """The direction each rendered clip of (prompt, seed) moves, seed-major: the prompt's, or for
    a prompt without one, one drawn from the clip's seed (seed_offset + its index), as text-free
    clips move."""
    wants = [want for _ in range(seeds) for _, want in suite]
    return [w["direction"] if w["direction"] not in (None, "static")
            else random.Random(seed_offset + i).choice(list(shapes.DIRECTIONS))
            for i, w in enumerate(wants)]


def render_suite(suite, seeds, shapes_config, seed_offset):
    """Rendered Shapes clips of every (prompt, seed), seed-major: the real clips a perfect model
    would draw, moving as `suite_moves` says."""
    wants = [want for _ in range(seeds) for _, want in suite]
    ids = [seed_offset + i for i in range(len(wants))]
    return shapes.render_batch([w["colour"] for w in wants], [w["shape"] for w in wants],
                               [w["size"] for w in wants], suite_moves(suite, seeds, seed_offset),
                               ids, shapes_config.frames, shapes_config.resolution)


def quality(clip, videos, measured, reference_emb):
    """Consistency and Frechet figures of a set of videos (B, 3, F, H, W) against the reference
    clips' frame embeddings."""
    emb = frame_embeddings(clip, videos)
    pixel = {k: sum(m[k] for m in measured) / len(measured)
             for k in ("colour_drift", "area_variation", "path_smoothness")}
    return {"frame_consistency": frame_consistency(emb).mean().item(), **pixel,
            "fd_frames": frechet_distance(emb.flatten(0, 1), reference_emb.flatten(0, 1)),
            "fd_clips": frechet_distance(clip_features(emb), clip_features(reference_emb))}


# ----------------------------------------------------------------------------------------------
# 3. The whole evaluation


@torch.no_grad()
def generate_suite(model, configs, suite, seeds=2, steps=50, guidance=9.0, batch=32,
                   precision="fp32", progress=True):
    """Generate every prompt of the suite with each seed; returns (videos in the order
    seed-major, seconds per video)."""
    s = configs["shapes"]
    videos, t0 = [], time.time()
    chunks = [(seed, suite[i: i + batch]) for seed in range(seeds)
              for i in range(0, len(suite), batch)]
    for seed, chunk in tqdm(chunks, disable=not progress, desc="eval"):
        videos.append(model.generate([p for p, _ in chunk], frames=s["frames"],
                                     size=s["resolution"], steps=steps, guidance=guidance,
                                     seed=seed, precision=precision).cpu())
    videos = torch.cat(videos)
    return videos, (time.time() - t0) / max(1, len(videos))


def score_videos(suite, seeds, videos):
    """Rows of per-video hits (seed-major, as generate_suite and render_suite order them) and the
    measured dicts."""
    measured = shapes.measure(videos)
    rows = [{"prompt": p, "seed": seed, "held_out": want["held_out"], "measured": m,
             "hits": score(m, want)}
            for (seed, (p, want)), m in zip([(s, x) for s in range(seeds) for x in suite],
                                            measured)]
    return rows, measured


def evaluate(model, configs, suite, seeds=2, steps=50, guidance=9.0, batch=32, precision="fp32",
             progress=True):
    """Generated videos and rendered ones (the ceiling), each scored for accuracy, consistency and
    Frechet distances against a third set of rendered clips. Returns (summary, rows, the
    generated videos)."""
    shapes_config = shapes_config_of(configs)
    videos, per_video = generate_suite(model, configs, suite, seeds, steps, guidance, batch,
                                       precision, progress)
    reference = frame_embeddings(model.clip, render_suite(suite, seeds, shapes_config, 2_000_000))
    real = render_suite(suite, seeds, shapes_config, 1_000_000)
    def scored(clips):
        rows, measured = score_videos(suite, seeds, clips)
        return rows, summarize(rows) | quality(model.clip, clips, measured, reference)

    rows, generated = scored(videos)
    summary = {"generated": generated | {"seconds_per_video": per_video, "read": confusion(rows)},
               "real": scored(real)[1]}
    return summary, rows, videos


def shapes_config_of(configs):
    """The ShapesConfig a checkpoint was trained with (its configs dict holds plain lists)."""
    return shapes.ShapesConfig(**{k: tuple(map(tuple, v)) if k == "holdout" else v
                                  for k, v in configs["shapes"].items()})


# ----------------------------------------------------------------------------------------------
# 4. The paper's ablations in miniature: (variant name, train.py flags) per claim. The preset's
# own settings (coherence loss on, 1x text-free videos, captions on some videos) are the baseline,
# trained once per seed and shared by all three comparisons; (d), held-out combinations, is read
# off the baseline runs' held-out rows.

BASELINE = "baseline"
ABLATIONS = {
    "coherence": ("(a) coherence loss off vs on", [("coherence off",
                                                    ["--tft2v.coherence_weight", "0"])]),
    "textfree": ("(b) text-free videos x1 vs x2", [("text-free x2",
                                                    ["--shapes.n_textfree", "10000"])]),
    "captions": ("(c) text-free only vs semi-supervised", [
        ("text-free only", ["--branches", "content,content,motion,motion"])]),
}


def train_run(name, seed, argv, args):
    """Train one run of an experiment with train.py's flags `argv` into <out>/<name>_seed<seed>,
    resuming what the folder already holds; returns (EMA model, configs, its last checkpoint's
    path, seconds): the wall time the run's training took, summed over the invocations that made
    it (recorded in that checkpoint; None for checkpoints older than that record)."""
    folder = os.path.join(args.out, f"{name.replace(' ', '_')}_seed{seed}")
    argv = [*argv, "--out", folder, "--seed", str(seed), "--preview_every", "1000000000",
            *args.train_flags]
    existing = tft2v.checkpoints(folder)
    configs = train.parse_args(argv + (["--resume"] if existing else []))
    last = existing[-1] if existing else None
    state = torch.load(last, map_location="cpu", weights_only=False) if last else None
    if state is None or state["step"] < configs["train"].steps:
        train.train(configs)
        last = tft2v.checkpoints(folder)[-1]
        state = torch.load(last, map_location="cpu", weights_only=False)  # train.py wrote it
    model = tft2v.model_from_checkpoint(state, use_ema=True).to(tft2v.pick_device("auto"))
    return model, state["configs"], last, state.get("seconds")


def train_and_score(name, flags, seed, args):
    """Train one ablation variant, then score it on the prompt suite; a score already written
    for the same checkpoint and settings is read back instead (the experiment spans sessions)."""
    model, saved, ckpt, seconds = train_run(name, seed, ["--preset", args.preset, *flags], args)
    path = os.path.join(os.path.dirname(ckpt), f"eval_{args.suite}.json")
    settings = {"checkpoint": os.path.basename(ckpt), "suite": args.suite, "seeds": args.seeds,
                "steps": args.steps, "guidance": args.guidance}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
        if summary.get("settings") == settings:
            return summary
    t0 = time.time()
    suite = prompt_suite(args.suite, shapes_config_of(saved))
    summary, _, _ = evaluate(model, saved, suite, args.seeds, args.steps, args.guidance,
                             args.batch, tft2v.pick_precision(args.precision, model.device))
    summary |= {"settings": settings, "train_seconds": seconds, "score_seconds": time.time() - t0}
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def mean_min(seconds):
    """Mean of a list of seconds as "N min", or "-" for an empty list."""
    return f"{sum(seconds) / len(seconds) / 60:.0f} min" if seconds else "-"


def mean_and_spread(values):
    """Mean and half the range of one figure over training seeds."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def ablation_rows(results):
    """{variant: [summary per seed]} -> {variant: {figure: (mean, spread)}}; the spread is half
    the range over seeds."""
    def figures(s):
        g = s["generated"]
        out = {k: 100 * g["all"][k] for k in ACCURACY if k in g["all"]}
        out |= {f"held-out {k}": 100 * g["held_out"][k] for k in ("colour", "shape")
                if k in g.get("held_out", {})}
        out |= {k: g[k] for k in ("frame_consistency", "colour_drift", "fd_frames", "fd_clips")}
        return out
    rows = {}
    for variant, summaries in results.items():
        per_seed = [figures(s) for s in summaries]
        rows[variant] = {k: mean_and_spread([f[k] for f in per_seed]) for k in per_seed[0]}
    return rows


def ablate(args):
    """Trains and scores the baseline and each requested variant with every seed."""
    names = list(ABLATIONS) if args.ablate == "all" else args.ablate.split(",")
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        sys.exit(f"error: unknown ablation(s) {unknown}: use {', '.join(ABLATIONS)} or all")
    variants = [(BASELINE, [])] + [v for n in names for v in ABLATIONS[n][1]]
    results = {name: [train_and_score(name, flags, seed, args) for seed in range(args.train_seeds)]
               for name, flags in variants}
    rows = ablation_rows(results)
    keys = list(next(iter(rows.values())))
    runs = [s for summaries in results.values() for s in summaries]
    trained = [s["train_seconds"] for s in runs if s.get("train_seconds") is not None]
    scored = sum(s["score_seconds"] for s in runs)
    lines = [f"Preset `{args.preset}`, {args.train_seeds} training seed(s), {args.suite} suite "
             f"with {args.seeds} sampling seed(s), {args.steps} DDIM steps, guidance "
             f"{args.guidance}; mean +- half-range over training seeds. {len(runs)} runs: "
             f"training {sum(trained) / 60:.0f} min (mean {mean_min(trained)} per run"
             f"{'' if len(trained) == len(runs) else f', {len(trained)} runs timed'}), "
             f"scoring {scored / 60:.0f} min.", "",
             "| claim | variant | " + " | ".join(COLUMNS.get(k, k) for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    claims = [("(d) held-out combinations: see the held-out columns", BASELINE)] + [
        (ABLATIONS[n][0], v) for n in names for v, _ in ABLATIONS[n][1]]
    for claim, variant in claims:
        cells = [f"{m:.1f} +- {d:.1f}" if k in ACCURACY or k.startswith("held") else
                 f"{m:.4f} +- {d:.4f}" for k, (m, d) in rows[variant].items()]
        lines.append(f"| {claim} | {variant} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump({"results": results, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {os.path.join(args.out, 'ablation.md')}")
    return rows


# ----------------------------------------------------------------------------------------------
# 5. Compositional synthesis in miniature (TF-T2V §4): a model that saw condition maps only with
# images, and videos only without them, is asked to follow a condition sequence in video.

COMPOSE_RUNS = (  # (name, train.py flags)
    ("ours", ["--preset", "compose"]),  # TF-T2V: condition-image pairs + text-free videos
    ("control", ["--preset", "compose", "--tft2v.video_conditions", "true"]),  # + video pairs
    # the same recipe without condition maps (compose pins the schedule its figures were made
    # with, so this run stays its twin when the `quick` preset changes)
    ("unconditioned", ["--preset", "compose", "--tft2v.conditions", "",
                       "--unet.condition_channels", "0"]),
)
COMPOSE_FIGURES = ("iou", "colour", "shape", "size", "direction", "frame_consistency")
EXAMPLES = (5, 42)  # filmstrip examples in the suite: big red triangle, small cyan square


def condition_suite(shapes_config, seeds, seed_offset=3_000_000):
    """The full suite (every colour x shape x size, no direction named), `seeds` times, each
    prompt with its own rendered path: (prompts, the rendered clips whose maps are the conditions
    (B, 3, F, H, W), the wanted attributes with the path's direction), seed-major."""
    suite = prompt_suite("full", shapes_config)
    wants = [want for _ in range(seeds) for _, want in suite]
    moves = suite_moves(suite, seeds, seed_offset)
    return ([p for _ in range(seeds) for p, _ in suite],
            render_suite(suite, seeds, shapes_config, seed_offset),
            [w | {"direction": d} for w, d in zip(wants, moves)])


def compose_scores(clip, videos, clips, wants):
    """Figures of videos generated to follow `clips`' conditions: mean per-frame IoU of the
    object's mask with the condition clip's silhouette, accuracy by measure (direction = the
    conditioned path's), and frame consistency."""
    hits = [score(m, w) for m, w in zip(shapes.measure(videos), wants)]
    acc = {k: sum(h[k] for h in hits) / len(hits) for k in ACCURACY}
    iou = conditions.iou(shapes.object_mask(videos), conditions.silhouette(clips))
    return {"iou": iou.mean().item(), **acc, "videos": len(videos),
            "frame_consistency": frame_consistency(frame_embeddings(clip, videos)).mean().item()}


@torch.no_grad()
def evaluate_compose(model, configs, seeds=1, steps=50, guidance=9.0, batch=48, precision="fp32",
                     guide_maps=False):
    """The condition suite generated once per condition kind the model knows (that kind's maps
    given, the others absent; a model without maps gets the prompts alone, "none"), scored by
    compose_scores; "real" scores the rendered clips themselves. Returns (summary, videos per
    kind)."""
    sc = shapes_config_of(configs)
    prompts, clips, wants = condition_suite(sc, seeds)
    summary, generated = {}, {}
    for k, kind in enumerate(model.condition_kinds or ("none",)):
        videos, t0 = [], time.time()
        for i in tqdm(range(0, len(prompts), batch), desc=f"compose ({kind})"):
            maps = None
            if kind != "none":  # this kind's maps, the others absent (zeros)
                chunk = clips[i: i + batch]
                maps = chunk.new_zeros(len(chunk), len(model.condition_kinds), *chunk.shape[2:])
                maps[:, k] = conditions.condition_maps(chunk, (kind,))[:, 0]
            videos.append(model.generate(prompts[i: i + batch], frames=sc.frames,
                                         size=sc.resolution, steps=steps, guidance=guidance,
                                         seed=i, precision=precision, maps=maps,
                                         guide_maps=guide_maps).cpu())
        generated[kind] = torch.cat(videos)
        summary[kind] = compose_scores(model.clip, generated[kind], clips, wants) | {
            "seconds_per_video": (time.time() - t0) / len(prompts)}
    summary["real"] = compose_scores(model.clip, clips, clips, wants)
    return summary, generated


def compose(args):
    """Trains and scores COMPOSE_RUNS with every training seed; writes compose.md / .json and a
    filmstrip of two condition sequences against what each model made of them."""
    t0 = time.time()
    table, strips = {}, []
    tag = "_guide_maps" if args.guide_maps else ""  # the two guidance choices side by side
    for name, flags in COMPOSE_RUNS:
        for seed in range(args.train_seeds):
            model, saved, ckpt, seconds = train_run(name, seed, flags, args)
            summary, videos = evaluate_compose(model, saved, args.seeds, args.steps,
                                               args.guidance, args.batch,
                                               tft2v.pick_precision(args.precision, model.device),
                                               args.guide_maps)
            summary["train_seconds"] = seconds
            with open(os.path.join(os.path.dirname(ckpt), f"eval_compose{tag}.json"), "w") as f:
                json.dump(summary, f, indent=1)
            for kind, figures in summary.items():
                if kind != "train_seconds":
                    table.setdefault((name, kind), []).append(figures)
            if seed == 0:
                strips += [(f"{name} ({kind})", v[list(EXAMPLES)]) for kind, v in videos.items()]
    sc = shapes_config_of(saved)
    _, clips, _ = condition_suite(sc, 1)
    maps = conditions.condition_maps(clips[list(EXAMPLES)], conditions.KINDS)  # (2, K, F, H, W)
    shown = [maps[:, k, None].expand(-1, 3, -1, -1, -1) for k in range(len(conditions.KINDS))]
    rows = torch.stack([*shown, *[v for _, v in strips]], dim=1).flatten(0, 1)  # per example
    os.makedirs(args.out, exist_ok=True)
    strip = video.write_video(os.path.join(args.out, f"compose_filmstrip{tag}.png"), rows, scale=2)

    lines = [f"{args.train_seeds} training seed(s) per model, the condition suite (every colour x "
             f"shape x size on its own path) with {args.seeds} sampling seed(s), {args.steps} "
             f"DDIM steps, guidance {args.guidance} (null pass "
             f"{'without' if args.guide_maps else 'with'} the maps); mean +- half-range over "
             f"training seeds; "
             f"{(time.time() - t0) / 60:.0f} min in all. Filmstrip {strip}: per example, rows "
             f"{', '.join(conditions.KINDS)}, then " + ", ".join(n for n, _ in strips) + ".", "",
             "| model | condition given | IoU (%) | colour | shape | size | path direction | "
             "frame consistency |", "|---|---|---|---|---|---|---|---|"]
    for (name, kind), per_seed in sorted(table.items(), key=lambda row: row[0][1] == "real"):
        if kind == "real" and name != COMPOSE_RUNS[0][0]:
            continue  # rendered clips: one row is enough
        cells = []
        for key in COMPOSE_FIGURES:
            scale = 1 if key == "frame_consistency" else 100
            mean, spread = mean_and_spread([f[key] * scale for f in per_seed])
            cells.append(f"{mean:.4f} +- {spread:.4f}" if key == "frame_consistency"
                         else f"{mean:.1f} +- {spread:.1f}")
        label = "rendered clips" if kind == "real" else name
        given = "-" if kind == "real" else kind
        lines.append(f"| {label} | {given} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"compose{tag}.json"), "w") as f:
        json.dump({" / ".join(k): v for k, v in table.items()}, f, indent=1)
    with open(os.path.join(args.out, f"compose{tag}.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {os.path.join(args.out, f'compose{tag}.md')} and {strip}")
    return table


ACCURACY = ("colour", "shape", "size", "direction", "moving")
QUALITY = (  # (key, column, format)
    ("frame_consistency", "frame consistency", "{:.4f}"),
    ("colour_drift", "colour drift", "{:.4f}"),
    ("area_variation", "area variation", "{:.3f}"),
    ("path_smoothness", "path smoothness (px)", "{:.3f}"),
    ("fd_frames", "FD frames", "{:.4f}"),
    ("fd_clips", "FD clips", "{:.4f}"))
COLUMNS = {key: column for key, column, _ in QUALITY}  # a figure's key -> its table heading


# ----------------------------------------------------------------------------------------------
# 6. Caption probe: which words of a caption does a model read? Cheaper than generating a suite,
# and it tells a word the model ignores from one it reads but cannot draw.

PROBE_TIMESTEPS = (999, 900, 700, 500, 300)


def probe_clips(clips, g):
    """What the probe's clips show: `clips` (colour, shape, size, direction) drawn from the
    random.Random `g`."""
    return [(g.choice(list(shapes.COLOURS)), g.choice(shapes.SHAPES),
             g.choice(list(shapes.SIZES)), g.choice(list(shapes.DIRECTIONS)))
            for _ in range(clips)]


def terminal_floor(frames=8, resolution=32, clips=48, renders=100, seed=0):
    """The lowest loss any model can reach on the probe's clips at t = T, with and without the
    direction word. Under zero terminal SNR x_T is pure noise and the v-target is -x0, so the
    best prediction is minus the mean clip of the caption, and the loss left is the per-pixel
    variance of the clips the caption describes: `renders` rendered clips per caption (without
    the direction word: those of all four directions pooled), averaged over the probe's clips.
    Returns {"own caption": floor, "no direction": floor}."""
    g = random.Random(seed + 1)
    pools = {}

    def pool(colour, shape, size, direction):  # (renders, C, F, H, W), rendered once
        key = (colour, shape, size, direction)
        if key not in pools:
            pools[key] = shapes.render_batch(
                [colour] * renders, [shape] * renders, [size] * renders, [direction] * renders,
                [g.randrange(2**31) for _ in range(renders)], frames, resolution)
        return pools[key]
    own, pooled = [], []
    for c, s, z, d in probe_clips(clips, random.Random(seed)):
        own.append(pool(c, s, z, d).var(0).mean().item())
        pooled.append(torch.cat([pool(c, s, z, e) for e in shapes.DIRECTIONS]).var(0).mean()
                      .item())
    return {"own caption": sum(own) / clips, "no direction": sum(pooled) / clips}


@torch.no_grad()
def caption_probe(model, frames=8, resolution=32, clips=48, timesteps=PROBE_TIMESTEPS,
                  precision="fp32", seed=0):
    """The training loss (v-MSE, TF-T2V §3) of rendered moving clips at fixed timesteps, with
    the same noise under each caption variant: the clip's own caption, its direction or its
    colour swapped for another, its direction left out, and no caption (the null context). A
    word the model reads raises the loss when it is wrong; a word it ignores leaves the loss
    as it was. No image condition. Returns {variant: [loss at each timestep]}."""
    g = random.Random(seed)
    colours, dirs = list(shapes.COLOURS), list(shapes.DIRECTIONS)
    want = probe_clips(clips, g)
    videos = shapes.render_batch(*map(list, zip(*want)), [g.randrange(2**31) for _ in want],
                                 frames, resolution).to(model.device)

    def turn(names, name):  # the next name in the list: a wrong one
        return names[(names.index(name) + 1) % len(names)]
    variants = {
        "own caption": [shapes.caption(c, s, z, d) for c, s, z, d in want],
        "wrong direction": [shapes.caption(c, s, z, turn(dirs, d)) for c, s, z, d in want],
        "no direction": [shapes.caption(c, s, z) for c, s, z, _ in want],
        "wrong colour": [shapes.caption(turn(colours, c), s, z, d) for c, s, z, d in want],
        "no caption": None}
    gen = torch.Generator(device=model.device).manual_seed(seed)
    noise = [torch.randn(videos.shape, generator=gen, device=model.device) for _ in timesteps]
    on = torch.ones(clips, dtype=torch.bool, device=model.device)
    no_image = torch.zeros(clips, model.clip.config.embed_dim, device=model.device)
    losses = {}
    for name, captions in variants.items():
        text = model.encode_text(captions) if captions else model.null_text(clips)
        context = model.context(text, no_image, on if captions else ~on, ~on)
        losses[name] = []
        for step, eps in zip(timesteps, noise):
            t = torch.full((clips,), step, device=model.device)
            x_t = model.diffusion.q_sample(videos, t, eps)
            with torch.autocast(model.device.type, torch.bfloat16, enabled=precision == "bf16"):
                pred = model.unet(x_t, t, context, use_temporal=True).float()
            losses[name].append(F.mse_loss(pred, model.diffusion.target(videos, eps, t)).item())
    return losses


def centroids(clip):
    """Per frame, the centroid (x, y) in pixels of what is brighter than the frame's median:
    clip (3, F, H, W) in [-1, 1] -> (F, 2). Works on blurred mean clips too."""
    w = ((clip + 1) / 2).clamp(0, 1).mean(0)  # (F, H, W) brightness
    w = (w - w.flatten(1).median(1).values[:, None, None]).clamp(min=0)
    ys, xs = torch.meshgrid(*(torch.arange(n, device=clip.device) + 0.5 for n in w.shape[1:]),
                            indexing="ij")
    total = w.sum((1, 2)).clamp(min=1e-8)
    return torch.stack([(w * xs).sum((1, 2)) / total, (w * ys).sum((1, 2)) / total], dim=1)


@torch.no_grad()
def terminal_travel(model, frames=8, resolution=32, draws=32, precision="fp32", seed=0):
    """How far the object of the model's mean clip at t = T moves along the prompted direction,
    against rendered clips. Under zero terminal SNR x_T is pure noise, so the model's x0 estimate
    there, averaged over draws of x_T, is its mean clip of the caption. The rendered clips' mean
    of "a big red square moving right" moves right (a big object's start is nearly fixed by its
    direction and speed), so a model that reads the direction word should predict that too.
    Returns {direction: (model's travel, rendered clips' travel)} in pixels, first to last
    frame's centroid, projected on the direction."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    on = torch.ones(draws, dtype=torch.bool, device=model.device)
    no_image = torch.zeros(draws, model.clip.config.embed_dim, device=model.device)
    t = torch.full((draws,), model.diffusion.num_timesteps - 1, device=model.device)
    travel = {}
    for name, (dx, dy) in shapes.DIRECTIONS.items():
        text = model.encode_text([shapes.caption("red", "square", "big", name)] * draws)
        context = model.context(text, no_image, on, ~on)
        x_T = torch.randn(draws, 3, frames, resolution, resolution, generator=gen,
                          device=model.device)
        with torch.autocast(model.device.type, torch.bfloat16, enabled=precision == "bf16"):
            out = model.unet(x_T, t, context, use_temporal=True).float()
        x0, _ = model.diffusion.x0_eps_from(x_T, t, out)
        rendered = shapes.render_batch(["red"] * 256, ["square"] * 256, ["big"] * 256,
                                       [name] * 256, list(range(256)), frames, resolution)
        unit = torch.tensor([dx, dy], dtype=torch.float32)
        travel[name] = tuple(((c[-1] - c[0]).cpu() @ unit).item()
                             for c in (centroids(x0.mean(0)), centroids(rendered.mean(0))))
    return travel


def output_stem(args, name):
    """Where a score of CKPT is written: --out, or `name` in the checkpoint's run folder."""
    folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt)
    return args.out or os.path.join(folder, name)


def probe(model, configs, args):
    """eval.py CKPT --probe: print the caption probe's table (with the t = T floor, where the
    schedule has zero terminal SNR) and the t = T travel's table, and write them as JSON."""
    sc = shapes_config_of(configs)
    precision = tft2v.pick_precision(args.precision, model.device)
    losses = caption_probe(model, sc.frames, sc.resolution, precision=precision)
    lines = ["| caption | " + " | ".join(f"t = {t}" for t in PROBE_TIMESTEPS) + " |",
             "|---|" + "---|" * len(PROBE_TIMESTEPS)]
    lines += [f"| {name} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
              for name, row in losses.items()]
    d = model.diffusion  # the floor is the caption's variance only where x_T is pure noise
    at_T = d.alpha_bar[-1] == 0 and PROBE_TIMESTEPS[0] == d.num_timesteps - 1
    floor = terminal_floor(sc.frames, sc.resolution) if at_T else {}
    lines += [f"| lowest possible, {name} | {v:.4f} |" + " - |" * (len(PROBE_TIMESTEPS) - 1)
              for name, v in floor.items()]
    travel = terminal_travel(model, sc.frames, sc.resolution, precision=precision)
    lines += ["", "| a big red square moving | mean clip at t = T travels "
                  "| rendered clips' mean |", "|---|---|---|"]
    lines += [f"| {name} | {m:.1f} px | {r:.1f} px |" for name, (m, r) in travel.items()]
    print("\n".join(lines))
    path = output_stem(args, "probe") + ".json"
    with open(path, "w") as f:
        json.dump({"timesteps": PROBE_TIMESTEPS, "losses": losses, "floor_at_T": floor,
                   "travel": travel, "checkpoint": args.ckpt}, f, indent=1)
    print(f"wrote {path}")
    return losses, travel


def markdown(summary, title):
    """Tables: accuracy (generated: all, seen, held-out; real clips), consistency / Frechet
    figures (generated vs real clips), and for each attribute what the generated videos were
    read as (`confusion`: rows prompted, columns read, in videos)."""
    gen, real = summary["generated"], summary["real"]
    keys = [k for k in ACCURACY if k in gen["all"]]
    lines = [f"### {title}", "", f"{gen['videos']} generated videos, "
             f"{gen['seconds_per_video']:.2f} s each; real = rendered Shapes clips of the same "
             "prompts (the ceiling).", "",
             "| videos | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label, part in (("generated, all", gen["all"]), ("generated, seen", gen["seen"]),
                        ("generated, held-out", gen["held_out"]), ("real clips", real["all"])):
        if part:
            cells = [f"{100 * part[k]:.1f}%" if k in part else "-" for k in keys]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| videos | " + " | ".join(name for _, name, _ in QUALITY) + " |",
              "|---|" + "---|" * len(QUALITY)]
    for label, part in (("generated", gen), ("real clips", real)):
        lines.append(f"| {label} | " + " | ".join(fmt.format(part[k]) for k, _, fmt in QUALITY)
                     + " |")
    order = {"colour": list(shapes.COLOURS), "shape": list(shapes.SHAPES),
             "size": list(shapes.SIZES), "direction": list(shapes.DIRECTIONS)}
    for k, table in gen.get("read", {}).items():  # what measure read, per prompted value
        values = {v for row in table.values() for v in row} | set(table)  # read or prompted
        cols = [v for v in order[k] if v in values] + sorted(values - set(order[k]))
        lines += ["", f"| prompted {k}, read as: | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        lines += [f"| {want} | " + " | ".join(str(table[want].get(c, 0)) for c in cols) + " |"
                  for want in order[k] if want in table]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="checkpoint file or run folder (not with --ablate)")
    p.add_argument("--suite", default=None, choices=["demo", "full", "directions"],
                   help="prompt suite (default: full; directions with --ablate)")
    p.add_argument("--seeds", type=int, default=None,
                   help="videos per prompt (default: 2; 1 with --ablate)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=9.0)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where it is faster")
    p.add_argument("--out", default="", help="output stem (default: next to the checkpoint); "
                                             "with --ablate, the folder of all runs")
    p.add_argument("--probe", action="store_true",
                   help="caption probe instead of the suite: the training loss of rendered clips "
                        "under right, wrong and missing words, and the travel of the mean clip "
                        "at t = T (see caption_probe, terminal_travel)")
    g = p.add_argument_group("ablations (train and score)")
    g.add_argument("--ablate", default="", help="coherence,textfree,captions or all")
    g.add_argument("--preset", default="toy", help="train.py preset of every run")
    g.add_argument("--train_seeds", type=int, default=2, help="training seeds per variant")
    g.add_argument("--compose", action="store_true",
                   help="compositional synthesis: score CKPT on the condition suite, or without "
                        "CKPT train and score ours / control / unconditioned (see COMPOSE_RUNS)")
    g.add_argument("--guide_maps", action="store_true",
                   help="--compose: leave the maps out of the guidance's null pass")
    g.add_argument("--train_flags", default="",
                   help='extra train.py flags for every run, e.g. "--steps 3000"')
    args = p.parse_args(argv)
    if args.probe and (args.ablate or args.compose):
        p.error("--probe scores a checkpoint's reading of captions: no --ablate, no --compose")
    if args.ablate and (args.ckpt or args.compose):
        p.error("--ablate trains its own runs: no checkpoint, no --compose")
    if args.ckpt is None and not (args.ablate or args.compose):
        p.error("give a checkpoint, --ablate or --compose")
    args.suite = args.suite or ("directions" if args.ablate else "full")
    if args.seeds is None:
        args.seeds = 1 if args.ablate or args.compose else 2
    if min(args.seeds, args.steps, args.batch, args.train_seeds) <= 0:
        sys.exit("error: --seeds, --steps, --batch and --train_seeds must be positive")
    if not math.isfinite(args.guidance):
        sys.exit(f"error: --guidance must be a finite number, got {args.guidance}")
    args.train_flags = shlex.split(args.train_flags)
    if args.ablate:
        args.out = args.out or "runs/ablation"
        return ablate(args)
    if args.compose and args.ckpt is None:
        args.out = args.out or "runs/compose"
        return compose(args)
    try:
        device = tft2v.pick_device(args.device)
        tft2v.keep_freed_memory()
        model, configs = tft2v.load_checkpoint(args.ckpt, use_ema=not args.raw, device=device)
        if not args.compose:  # where the scores go: before minutes of generating them
            stem = output_stem(args, "probe" if args.probe else f"eval_{args.suite}")
            video.check_writable(os.path.dirname(os.path.abspath(stem)))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.compose:
        summary, _ = evaluate_compose(model, configs, args.seeds, args.steps, args.guidance,
                                      args.batch, tft2v.pick_precision(args.precision, device),
                                      args.guide_maps)
        print(json.dumps(summary, indent=1))
        return summary
    if args.probe:
        return probe(model, configs, args)
    suite = prompt_suite(args.suite, shapes_config_of(configs))
    summary, rows, videos = evaluate(model, configs, suite, args.seeds, args.steps,
                                     args.guidance, args.batch,
                                     tft2v.pick_precision(args.precision, device))
    summary |= {"suite": args.suite, "seeds": args.seeds, "steps": args.steps,
                "guidance": args.guidance, "checkpoint": args.ckpt}
    stem = output_stem(args, f"eval_{args.suite}")
    with open(stem + ".json", "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    sheet = contact_sheet(stem + ".gif", videos, rows, args.seeds)
    table = markdown(summary, f"{args.suite} suite, {args.seeds} seed(s), {args.steps} DDIM "
                              f"steps, guidance {args.guidance}")
    with open(stem + ".md", "w") as f:  # the table, then the videos it scored
        f.write(table + f"\n![every scored video; green: every attribute as prompted, red: a miss]"
                        f"({os.path.basename(sheet)})\n")
    print(table)
    print(f"wrote {stem}.json, {stem}.md and {sheet} (the videos: green frame all right, red a "
          f"miss)")
    return summary


if __name__ == "__main__":
    main()
