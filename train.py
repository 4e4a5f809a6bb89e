"""train.py: the TF-T2V training program (TF-T2V §3, Fig. 2; setup of §4).

Two stages:
1. "clip": train the tiny CLIP on the image-text pairs, and on the paired branch's captioned clips
   when that branch trains (--clip_trails), or load one: ours, or a real OpenAI-format state dict
   with its merges file. It is frozen from then on.
2. "diffusion": joint training of one UNet by the two branches. Every optimiser step takes one
   branch (TF-T2V §3.1):
      content  image-text pairs      text OR image condition   spatial layers only
      motion   text-free videos      middle-frame image embed   spatial + temporal, + L_coh
      paired   video-text pairs      image embed + caption      (semi-supervised, §3.4)
   chosen by a fixed cycle or by proportions; under DistributedDataParallel each rank can instead
   keep one branch, as the official code does (1 rank in 8 on images).

Usage:
    python train.py --preset quick                       # CPU, minutes (the README's main job)
    python train.py --preset toy --out runs/toy
    python train.py --preset compose                     # + silhouette/sketch conditions
    python train.py --preset quick --resume              # continue exactly where it stopped
    torchrun --nproc_per_node 2 train.py --preset gpu    # DDP (gloo on CPU, NCCL on CUDA)
    python train.py --help                               # every setting, with its default

Every dataclass field below is a command-line flag: TrainConfig fields as --name, the others with
their section as prefix, e.g. --unet.model_channels 64, --tft2v.coherence_weight 0.0,
--shapes.n_textfree 8000, --diffusion.prediction eps.
"""

import argparse
import ast
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import clip_tiny
import tft2v
import unet3d
from data import fetch_batch, shapes, video
from data.folders import ImageTextFolder, VideoFolder, VideoTextFolder


@dataclass
class TrainConfig:
    out: str = "runs/quick"  # run folder: checkpoints, log.jsonl, previews
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where it is faster) | fp32 | bf16
    # stage 1: CLIP
    clip_ckpt: str = ""  # load this CLIP instead of training one (ours, or OpenAI's state dict)
    clip_merges: str = ""  # merges file for an OpenAI-format CLIP (bpe_simple_vocab_16e6.txt.gz)
    clip_steps: int = 1200
    clip_batch: int = 64
    clip_lr: float = 1e-3
    # when the paired branch trains, its captioned clips (as trail images) fill half of each CLIP
    # batch, so the words only videos use are trained too (clip_tiny.train_clip); a trail image
    # suits bright objects on a dark ground, as in the Shapes world: for other videos, consider
    # false or a pretrained --clip_ckpt
    clip_trails: bool = True
    # stage 2: diffusion
    steps: int = 1000
    # minutes for the whole run, CLIP stage and samples included (0: no limit): at the end of the
    # warm-up, --steps shrinks to what the measured speed fits in them, and the EMA with it
    # (budget_ema_decay); every REFIT_EVERY steps it is fitted again (never past --steps)
    time_budget: float = 0.0
    # on a machine faster than planned, --time_budget may also raise --steps, up to this many
    # (0, or anything up to --steps: never past --steps); the EMA decay is then kept as set
    max_steps: int = 0
    image_batch: int = 32  # content-branch batch (images)
    video_batch: int = 8  # motion-branch batch (clips)
    branches: str = "content,motion"  # a fixed cycle over these names (repeat to weight)
    branch_mode: str = "cycle"  # cycle | random (draw from the list above) | rank (DDP)
    lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | muon: Muon for the weight matrices, AdamW for the rest
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    compile: bool = False  # torch.compile the UNet (H100, gpu preset: ~1.5x steps/s; CPU: no gain)
    grad_checkpoint: bool = False
    # bookkeeping
    ckpt_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    preview_every: int = 500
    preview_prompts: str = "a big red circle moving right;a small blue square moving up"
    resume: bool = False
    # a user's own data instead of the Shapes world (see data/folders.py)
    images_dir: str = ""
    images_captions: str = ""
    videos_dir: str = ""
    videos_captions: str = ""  # captions of (some) videos: the "paired" branch


DEMO_PROMPTS = "a big red circle;a small blue square;a big blue circle;a small yellow triangle"


def presets():
    """Named presets: every config for a run. `quick` is the README's main job on a CPU."""
    quick = dict(
        # under 10 minutes on a 2-core CPU with bf16 instructions: CLIP ~40 s, 5400 diffusion
        # steps ~8 min, samples; on slower CPUs the 9-minute budget cuts the steps (the install
        # takes 21-43 s, and the README's command counts it). The lower lr and slower EMA are
        # what let the extra steps pay: at lr 2e-3 and EMA 0.995, 6000 steps drew no better
        # shapes than 3000 (docs/experiments.md). On a faster machine the budget may raise the
        # steps to 8,100: two such runs on that CPU (13 minutes there) drew the prompted shape in
        # 71.9% and 84.4% of the demo videos, against 34.4-75.0% for 5,400 steps. Muon: on the
        # 2-core Emerald Rapids Xeon (fp32, ~2,500-2,650 steps fit) the shape in 43.8-68.8% of
        # the demo videos in three seeds, 0-50% in thirteen AdamW runs (docs/experiments.md)
        train=TrainConfig(steps=5400, time_budget=9.0, max_steps=8100, image_batch=32,
                          video_batch=4, lr=1e-3, warmup=200, ema_decay=0.999, optimizer="muon",
                          branches="content,content,motion",
                          clip_steps=600, ckpt_every=900, preview_every=900,
                          preview_prompts=DEMO_PROMPTS),
        shapes=shapes.ShapesConfig(),
        clip=copy.deepcopy(clip_tiny.PRESETS["tiny"]),
        # the tiny UNet on 2x2 patches (16x16 tokens, a stand-in for the paper's VAE latent) with
        # attention at 8x8 and below: about 1/6 of the full-resolution UNet's step time; 4
        # channels per GroupNorm group at the top level (with 32 groups of 1 channel each, the
        # norm erases every channel's mean: colour 75-97% over 3 seeds, 100% with 8 groups)
        unet=dataclasses.replace(unet3d.PRESETS["tiny"], patch_size=2, attention_levels=(1,),
                                 num_groups=8),
        # caption (not image) on 80% of content samples: text is learnt only there (default 50%)
        tft2v=tft2v.TFT2VConfig(p_text_in_content=0.8),
        diffusion=tft2v.DiffusionConfig(),
    )
    # quick's UNet, 20,000 steps and the paired branch, whose clips also train the CLIP
    # (clip_trails), Muon as quick: on a 2-core Zen 3 EPYC (fp32), where 9,700-10,700 steps fit
    # the 57-minute budget, shape 96.4, 98.4, 99.0 and 99.5% in seeds 0-3, 88.5% with AdamW
    # (seed 0).
    # AdamW on a 2-core Emerald Rapids Xeon (fp32): 16,000-18,100 steps fit the budget on slow
    # hours, colour / shape 97.9-100 / 96.4-98.4% in 3 seeds; with the CLIP on images alone
    # 18,700-19,700 steps, shape 95.3-97.4% in 4 seeds but colour 93.8% in one. Until
    # 2026-12-06 it also attended at 16x16: 1.5x the step time, 20,000 steps in 50 min on a Zen 5
    # (bf16, shape 97.9%) but 11,630 on the Xeon (92.2%). The README's ablation trained that UNet
    # for 9,000 steps (its command pins both, and the CLIP stage).
    toy = copy.deepcopy(quick)
    toy["train"] = dataclasses.replace(
        quick["train"], out="runs/toy", steps=20000, time_budget=57.0, max_steps=0,
        optimizer="muon",
        branches="content,content,motion,paired", clip_steps=1200, ckpt_every=2000, keep_last=5,
        preview_every=2500,
        preview_prompts="a big red circle moving right;a small blue square moving up")
    gpu = copy.deepcopy(toy)
    gpu["train"] = dataclasses.replace(
        toy["train"], out="runs/gpu", steps=20000, time_budget=0.0, image_batch=64, video_batch=16,
        clip_steps=2000, optimizer="adamw")  # as measured on the H100
    gpu["shapes"] = dataclasses.replace(quick["shapes"], resolution=64, frames=16)
    gpu["clip"] = dataclasses.replace(quick["clip"], image_resolution=64)
    # attention at the top level too (32x32 positions), as in the H100 figures of the README
    gpu["unet"] = dataclasses.replace(toy["unet"], model_channels=64, attention_levels=(0, 1))
    # compositional synthesis (TF-T2V §4) in miniature: quick + silhouette and sketch maps on the
    # content branch's images only; `--tft2v.video_conditions true` is the paired control
    compose = copy.deepcopy(quick)
    # (2,100 steps, 32 GroupNorm groups, lr 2e-3, EMA 0.995: the `quick` of the README's
    # compose figures)
    compose["train"] = dataclasses.replace(quick["train"], out="runs/compose", steps=2100,
                                           time_budget=0.0, lr=2e-3, warmup=100, ema_decay=0.995,
                                           optimizer="adamw",
                                           ckpt_every=800, preview_every=800)
    compose["tft2v"] = dataclasses.replace(quick["tft2v"], conditions="silhouette,sketch")
    compose["unet"] = dataclasses.replace(quick["unet"], condition_channels=2, num_groups=32)
    return {"quick": quick, "toy": toy, "gpu": gpu, "compose": compose}


# ----------------------------------------------------------------------------------------------
# Command line: one flag per dataclass field, typed like its default


def parse_value(text, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    if isinstance(default, (int, float, str)):
        try:
            return type(default)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {type(default).__name__}, got {text!r}")
    try:
        value = ast.literal_eval(text)  # tuples and lists: --unet.channel_mult "(1, 2, 2)"
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"expected a Python {type(default).__name__}, "
                                         f"got {text!r}")
    if not isinstance(value, type(default)):
        raise argparse.ArgumentTypeError(f"expected a {type(default).__name__}, got {text!r}")
    return value


def parse_args(argv=None):
    """Returns the configs of the chosen preset with the command line's overrides applied."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="quick", choices=sorted(presets()))
    known, _ = pre.parse_known_args(argv)
    configs = presets()[known.preset]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], parents=[pre],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for section, cfg in configs.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cfg):
            default = getattr(cfg, f.name)
            flag = f"--{f.name}" if section == "train" else f"--{section}.{f.name}"
            if isinstance(default, bool) and section == "train":
                group.add_argument(flag, nargs="?", const="true", default=default,
                                   type=lambda s, d=default: parse_value(s, d), dest=flag[2:])
            else:
                group.add_argument(flag, default=default, dest=flag[2:],
                                   type=lambda s, d=default: parse_value(s, d))
    args = vars(parser.parse_args(argv))
    for key, value in args.items():
        section, _, name = key.rpartition(".")
        if key != "preset":
            setattr(configs[section or "train"], name, value)
    return configs


def check_configs(configs):
    """Settings that cannot run raise ValueError with a one-line reason, before any work."""
    cfg, s = configs["train"], configs["shapes"]
    for name in ("steps", "clip_batch", "image_batch", "video_batch", "ckpt_every", "keep_last",
                 "log_every", "preview_every", "lr", "clip_lr", "grad_clip"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("clip_steps", "warmup", "weight_decay", "time_budget", "max_steps"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.ema_decay <= 1:
        raise ValueError(f"--ema_decay must be in [0, 1], got {cfg.ema_decay}")
    names = branch_names(cfg)
    unknown = sorted(set(names) - {"content", "motion", "paired"})
    if not names or unknown:
        raise ValueError(f"--branches takes content, motion and paired, got {cfg.branches!r}")
    if cfg.optimizer not in ("adamw", "muon"):
        raise ValueError(f"--optimizer must be adamw or muon, got {cfg.optimizer!r}")
    if cfg.branch_mode not in ("cycle", "random", "rank"):
        raise ValueError(f"--branch_mode must be cycle, random or rank, got {cfg.branch_mode!r}")
    if {"motion", "paired"} & set(names) and s.frames < 2:
        raise ValueError(f"the motion branches need clips of 2 or more frames, got "
                         f"--shapes.frames {s.frames}")
    tft2v.pick_precision(cfg.precision, tft2v.pick_device(cfg.device))
    multiple = configs["unet"].size_multiple()
    if s.resolution <= 0 or s.resolution % multiple:
        raise ValueError(f"--shapes.resolution must be a multiple of {multiple} (--unet.patch_size"
                         f" times 2 per level below the first), got {s.resolution}")
    # the models' own checks (GroupNorm groups, patch sizes, ...), built on the meta device:
    # no memory, no time (a CLIP from --clip_ckpt brings its own settings)
    for section, build in (("unet", unet3d.UNet3D), ("clip", clip_tiny.CLIP)):
        if section == "clip" and cfg.clip_ckpt:
            continue
        try:
            with torch.device("meta"):
                build(configs[section])
        except (ValueError, RuntimeError, IndexError, ZeroDivisionError, AssertionError) as e:
            raise ValueError(f"the --{section}.* settings do not make a model: "
                             f"{str(e).splitlines()[0]}")


# ----------------------------------------------------------------------------------------------
# Data


class BatchStream:
    """Endless shuffled batches from a dataset, resumable: the state is (epoch, position), and the
    order of an epoch depends only on (seed, epoch)."""

    def __init__(self, dataset, batch_size, seed):
        if len(dataset) == 0:
            raise ValueError("empty dataset")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.pos, self._perm = 0, 0, None

    def _order(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(len(self.dataset), generator=g).tolist()
        return self._perm

    def next(self):
        idx = []
        while len(idx) < self.batch_size:
            take = self._order()[self.pos: self.pos + self.batch_size - len(idx)]
            idx += take
            self.pos += len(take)
            if self.pos >= len(self.dataset):
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return fetch_batch(self.dataset, idx)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._perm = state["epoch"], state["pos"], None


def datasets(cfg, shapes_cfg):
    """Branch name -> dataset: the Shapes world, or a user's folders when any folder is given."""
    if not (cfg.images_dir or cfg.videos_dir):
        return {"content": shapes.ShapesDataset("images", shapes_cfg),
                "motion": shapes.ShapesDataset("textfree", shapes_cfg),
                "paired": shapes.ShapesDataset("paired", shapes_cfg)}
    res, frames = shapes_cfg.resolution, shapes_cfg.frames
    out = {}
    if cfg.images_dir:
        out["content"] = ImageTextFolder(cfg.images_dir, cfg.images_captions, resolution=res)
    if cfg.videos_dir:
        out["motion"] = VideoFolder(cfg.videos_dir, frames=frames, resolution=res)
        if cfg.videos_captions:
            out["paired"] = VideoTextFolder(cfg.videos_dir, cfg.videos_captions, frames=frames,
                                            resolution=res)
    return out


def branch_names(cfg):
    """--branches "content,content,motion" -> ["content", "content", "motion"]."""
    return [b.strip() for b in cfg.branches.split(",") if b.strip()]


def branch_at(cfg, step, rank):
    """Which branch trains at this step (on this rank)."""
    names = branch_names(cfg)
    if cfg.branch_mode == "cycle":
        return names[step % len(names)]
    if cfg.branch_mode == "random":  # a pure function of (seed, step), so resuming is exact
        return random.Random(cfg.seed * 1_000_003 + step).choice(names)
    if cfg.branch_mode == "rank":  # official: each GPU keeps a branch
        return names[rank % len(names)]
    raise ValueError(f"unknown branch_mode {cfg.branch_mode!r}: cycle, random or rank")


def lr_at(cfg, step):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file holds every config, the tokenizer's merges, all weights, and (for
# --resume) the optimiser, EMA, RNG and data positions. tft2v.load_checkpoint reads it back.

MODEL_SECTIONS = ("shapes", "clip", "unet", "tft2v", "diffusion")


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rank_state(streams):
    """What differs between DDP ranks: RNG states and data positions (gathered to rank 0)."""
    state = {"streams": {k: s.state_dict() for k, s in streams.items()},
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def load_rank_state(state, streams):
    for k, s in streams.items():
        s.load_state_dict(state["streams"][k])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def save_checkpoint(cfg, configs, model, ema, opt, ranks, step, seconds, fitted=False):
    """`seconds`: wall time the run took to reach this step, summed over its invocations
    (--resume adds to the time stored in the checkpoint it continues). `fitted`: --time_budget
    has fixed cfg.steps (--resume keeps that count)."""
    state = {
        "format": tft2v.CHECKPOINT_FORMAT,
        "configs": {k: asdict(v) for k, v in configs.items()},
        "merges": clip_tiny.merges_of(model.tokenizer),
        "model": model.state_dict(),
        "ema": ema,
        "optimizer": opt.state_dict(),
        "step": step,
        "ranks": ranks,
        "seconds": seconds,
        "fitted_steps": cfg.steps if fitted else None,
    }
    path = os.path.join(cfg.out, f"ckpt_{step:07d}.pt")
    save_atomic(state, path)
    for old in tft2v.checkpoints(cfg.out)[: -cfg.keep_last]:
        os.remove(old)
    return path


def check_same_model(saved, configs, path):
    """--resume rebuilds the model from the checkpoint: its CLIP (stage 1 is done) and configs.
    Model and data flags that disagree with it are an error; the schedule (steps, lr, ...) may
    change."""
    configs["clip"] = clip_tiny.CLIPConfig(**saved["clip"])
    configs["unet"].context_dim = configs["clip"].transformer_width
    runtime_only = {"use_checkpoint"}
    for section in MODEL_SECTIONS:
        now = json.loads(json.dumps(asdict(configs[section])))  # tuples -> lists, as saved
        # a field newer than the checkpoint had its default then (as model_from_checkpoint reads)
        then = json.loads(json.dumps(asdict(type(configs[section])()) | saved[section]))
        diff = sorted(k for k in set(now) | set(then)
                      if now.get(k) != then.get(k) and k not in runtime_only)
        if diff:
            sys.exit(f"error: {path} was trained with other {section} settings "
                     f"({', '.join(diff)}); use the same preset and flags, or another --out")


# ----------------------------------------------------------------------------------------------
# Stage 1: CLIP


def clip_stage(cfg, configs, data, device):
    """data: branch name -> dataset; the CLIP learns from the image-text pairs (the content
    branch's) and, with --clip_trails, from the paired branch's captioned clips."""
    if cfg.clip_ckpt:
        if not os.path.exists(cfg.clip_ckpt):
            sys.exit(f"error: no CLIP checkpoint at {cfg.clip_ckpt}")
        clip, tok = clip_tiny.load_clip(cfg.clip_ckpt, merges=cfg.clip_merges or None)
        return clip.to(device), tok
    if data.get("content") is None:
        sys.exit("error: training a CLIP needs image-text pairs (--images_dir), or give one "
                 "with --clip_ckpt")
    videos = data["paired"] if cfg.clip_trails and "paired" in branch_names(cfg) else None
    clip, tok = clip_tiny.train_clip(data["content"], configs["clip"], steps=cfg.clip_steps,
                                     batch_size=cfg.clip_batch, lr=cfg.clip_lr, device=device,
                                     seed=cfg.seed, videos=videos)
    clip_tiny.save_clip(os.path.join(cfg.out, "clip.pt"), clip, tok)
    return clip, tok


# ----------------------------------------------------------------------------------------------
# Stage 2: joint diffusion training (TF-T2V Fig. 2)


def make_optimizer(params, lr, weight_decay=0.0):
    """AdamW over `params` (a list), torch's fused kernel where it has one (`clip_tiny.adamw`).
    Measured for the `quick` UNet's 1.8 M parameters in 402 tensors on the 2-core CPU: 3.4 ms
    per step fused, 11.4 foreach, 14.6 the per-tensor loop the CPU gets by default, i.e. 10% of a
    `quick` training step."""
    return clip_tiny.adamw(params, lr=lr, weight_decay=weight_decay)


def newton_schulz(g, steps=5):
    """Muon's orthogonalisation (Jordan et al., 2024): for each matrix of g (N, m, n), roughly
    U V^T of its SVD U S V^T, by a quintic Newton-Schulz iteration from g / ||g||_F whose
    coefficients pull every singular value into ~[0.7, 1.2] in five steps (not exactly to 1).
    Each step is x <- p(x x^T) x with p(s) = a + b s + c s^2. For a matrix at least twice as wide
    as tall (kernels: 64 x 576) the steps run on its small Gram matrix alone: with G = x x^T and
    P = p(G), the next Gram matrix is P G P, and x is multiplied once at the end by the product
    of the P's (same result to ~1e-6; 2 m^2 n + 17 m^3 products, not 5 (2 m^2 n + m^3)).
    torch.bmm, not `@`: on the `quick` UNet's matrices 18.4 against 20.2 ms a step (2-core Zen 3
    EPYC), as `@` reshapes its operands on every call."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    m, n = x.shape[-2:]
    if n < 2 * m:
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        gram, prod = torch.bmm(x, x.mT), None
        for i in range(steps):
            p = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            p.diagonal(dim1=-2, dim2=-1).add_(a)
            prod = p if prod is None else torch.bmm(p, prod)
            if i < steps - 1:
                gram = torch.bmm(torch.bmm(p, gram), p)
        x = torch.bmm(prod, x)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024) for weight matrices: Nesterov momentum, the update
    orthogonalised per matrix (`newton_schulz`; a convolution kernel as out x in*k*k), then scaled
    to an AdamW update's size, 0.2 sqrt(max(out, in)) (Liu et al., "Muon is Scalable for LLM
    Training", 2025), so that AdamW's learning rate and schedule apply unchanged. The matrices of
    one shape (a tall one transposed) are orthogonalised as one batch, and the momentum and the
    step are one foreach call over all of them: on the `quick` UNet, 16 batches instead of 21, and
    the step 10-12% faster than per shape (30 against 34 ms on a 2-core Zen 3 EPYC)."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu = group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:  # nothing to step (foreach calls refuse empty lists)
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            nesterov = torch._foreach_add(grads, bufs, alpha=mu)
            by_shape = {}  # (rows, columns) -> [(index, matrix)]: orthogonalised as one batch
            for i, g in enumerate(nesterov):
                w = g.reshape(g.shape[0], -1)  # (out, in*k*k)
                w = w.mT if w.shape[0] > w.shape[1] else w  # tall ones join the wide of one shape
                by_shape.setdefault(tuple(w.shape), []).append((i, w))
            updates = [None] * len(params)
            for matrices in by_shape.values():
                u = newton_schulz(torch.stack([w for _, w in matrices]))  # (N, rows, columns)
                u = u * (0.2 * max(u.shape[-2:]) ** 0.5)
                for (i, _), x in zip(matrices, u.unbind(0)):
                    p = params[i]
                    updates[i] = (x if x.shape[0] == p.shape[0] else x.mT).reshape(p.shape)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])


class MuonAdamW:
    """`--optimizer muon`: Muon for the weight matrices and kernels of the UNet and the
    image-token MLP, except the UNet's first and last convolutions (pixels in and out: `conv_in`
    and `out` of every UNet3D in `model`); AdamW (`make_optimizer`) for those and every vector
    (biases, norm gains). Not in the paper: on the 2-core Emerald Rapids Xeon the `quick` run
    drew the prompted shape far more often with it (docs/experiments.md, section 2). The
    optimiser interface train() uses, over both."""

    def __init__(self, model, lr, weight_decay=0.0):
        edges = {id(p) for m in model.modules() if isinstance(m, unet3d.UNet3D)
                 for p in (*m.conv_in.parameters(), *m.out.parameters())}
        params = [p for p in model.parameters() if p.requires_grad]
        hidden = [p for p in params if p.ndim >= 2 and id(p) not in edges]
        ids = {id(p) for p in hidden}
        self.muon = Muon(hidden, lr, weight_decay=weight_decay)
        self.adamw = make_optimizer([p for p in params if id(p) not in ids], lr, weight_decay)

    @property
    def param_groups(self):  # read each time: load_state_dict replaces the groups' dicts
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def step(self):
        self.muon.step()
        self.adamw.step()

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


@torch.no_grad()
def ema_update(ema_tensors, params, decay):
    """ema <- decay * ema + (1 - decay) * weights, over two matching lists of tensors, in one
    foreach call (a loop over `named_parameters` took ~8 ms of a `quick` step)."""
    torch._foreach_lerp_(ema_tensors, params, 1 - decay)


def budget_ema_decay(decay, planned, fitted):
    """The EMA decay for a run that --time_budget cut from `planned` to `fitted` steps: 1 - decay
    scaled by (planned / fitted)^3, so the average's window, 1 / (1 - decay) steps, keeps its share
    of the run times the square of the share of the plan that is trained. A run cut short is still
    improving fast at its end, and a window of the same share lags behind it: `quick` cut to 2,430
    and 2,818 of its 5,400 steps on a 2-core Xeon (the same two runs, each averaged four ways)
    drew colour / shape on all 48 prompts in 92.7 / 26.0% and 94.8 / 38.5% with that share, in
    99.0 / 31.2% and 92.7 / 42.7% with a quarter of it (this rule gives a fifth and a quarter
    there), and in 100.0 / 30.2% and 93.8 / 44.8% with the raw weights; a third run, cut to 2,379,
    94.8 / 29.2% with this rule and 93.8 / 31.2% with that share (docs/experiments.md). Not cut:
    the configured decay."""
    if fitted >= planned:
        return decay  # not cut: exactly the configured decay
    return max(0.0, 1 - (1 - decay) * (planned / fitted) ** 3)


PREVIEW_STEPS, FINAL_STEPS, FINAL_SEEDS = 20, 50, (0, 1)  # DDIM steps and seeds of the samples
# --time_budget fits the steps again every this many steps, at the pace since its last fit: a
# machine's speed drifts (a `quick` run here fitted 3,036 steps at the warm-up's 6.4 steps/s, then
# ran at 5.5 and ended 54 s past its budget of 9.5 minutes)
REFIT_EVERY = 500
# the first fit times the steps FIT_FROM .. FIT_AT after the run's start (or to the end of the
# warm-up, if later): past the first steps' one-off costs
FIT_FROM, FIT_AT = 10, 30


def fit_steps(cfg, step, elapsed, step_seconds, sample_seconds, most):
    """--time_budget: the step count that ends the run within cfg.time_budget minutes, given
    `elapsed` seconds so far, `step_seconds` per training step and `sample_seconds` per denoising
    step of the preview prompts (0 without previews). Previews and the final samples are counted;
    3% of the time left is kept spare. Never more than `most`, never less than step + 1."""
    previews = PREVIEW_STEPS * sample_seconds / cfg.preview_every  # per training step
    left = cfg.time_budget * 60 - elapsed - FINAL_STEPS * len(FINAL_SEEDS) * sample_seconds
    more = int(0.97 * left / (step_seconds + previews)) if left > 0 else 0
    return max(step + 1, min(most, step + more))


def sample_step_seconds(model, prompts, configs, precision):
    """Wall time of one guided denoising step on the preview prompts (a 3-step DDIM sample)."""
    s = configs["shapes"]
    model.eval()
    t = time.time()
    model.generate(prompts, frames=s.frames, size=s.resolution, steps=3, precision=precision)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    model.train()
    return (time.time() - t) / 3


@torch.no_grad()
def write_samples(model, ema, prompts, configs, folder, precision, steps=PREVIEW_STEPS,
                  seeds=(0,)):
    """Generate `prompts` with the EMA weights; one GIF per prompt and a PNG filmstrip."""
    live = {n: p.detach().clone() for n, p in model.named_parameters() if n in ema}
    model.load_state_dict(ema, strict=False)
    model.eval()
    s = configs["shapes"]
    videos = torch.cat([model.generate(prompts, frames=s.frames, size=s.resolution, steps=steps,
                                       seed=seed, precision=precision) for seed in seeds])
    model.load_state_dict(live, strict=False)
    model.train()
    os.makedirs(folder, exist_ok=True)
    paths = [video.write_video(os.path.join(folder, "filmstrip.png"), videos)]
    for i, prompt in enumerate(prompts):
        name = f"{i:02d}_" + "_".join(prompt.split())[:60] + ".gif"
        paths.append(video.write_video(os.path.join(folder, name), videos[i]))
    return paths


class CtrlC:
    """Ctrl-C in the diffusion stage: the first lets the current step finish, then the loop writes
    a checkpoint at that step and stops, so `--resume` continues exactly from it; a second one
    stops at once. Only in a single process (under DDP a checkpoint is a collective every rank
    must reach) and in the main thread (where Python runs signal handlers)."""

    def __init__(self, active):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step, with a checkpoint (again: stop now)")


def setup_distributed(device):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def train(configs):
    """Runs both stages; returns (model, path of the last checkpoint)."""
    cfg = configs["train"]
    t_start = time.time()
    try:  # bad settings, data folders and run folders fail here, in one line, before any work
        check_configs(configs)
        data = datasets(cfg, configs["shapes"])
        missing = set(branch_names(cfg)) - set(data)
        if missing:
            raise ValueError(f"branch(es) {', '.join(sorted(missing))} need data that was not "
                             f"given (content: --images_dir, motion: --videos_dir, paired: "
                             f"--videos_captions)")
        video.check_writable(cfg.out, "run folder (--out)")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    rank, world, device = setup_distributed(tft2v.pick_device(cfg.device))
    precision = tft2v.pick_precision(cfg.precision, device)
    tft2v.keep_freed_memory()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    existing = tft2v.checkpoints(cfg.out)
    if existing and not cfg.resume:
        sys.exit(f"error: {cfg.out} already holds checkpoints; pass --resume to continue, "
                 f"or choose another --out")
    resume = torch.load(existing[-1], map_location="cpu", weights_only=False) if (
        cfg.resume and existing) else None
    if resume is not None:
        check_same_model(resume["configs"], configs, existing[-1])
    torch.manual_seed(cfg.seed)  # every rank builds the same CLIP and UNet
    random.seed(cfg.seed)

    # stage 1: CLIP, frozen from here on
    if resume is not None:
        model = tft2v.model_from_checkpoint(resume)
    else:
        clip, tok = clip_stage(cfg, configs, data, device)
        configs["clip"] = clip.config
        configs["unet"].context_dim = clip.config.transformer_width
        model = tft2v.TFT2V(clip, tok, configs["unet"], configs["tft2v"], configs["diffusion"])
    model.unet.config.use_checkpoint = cfg.grad_checkpoint
    model.to(device).train()
    if world > 1:  # CLIP is frozen, so DDP would not keep it in sync: start from rank 0's
        for p in model.clip.parameters():
            dist.broadcast(p.data, 0)
    if cfg.compile:  # one graph per branch's shapes (dynamic=False: each specialised, as bench.py)
        model.unet.forward = torch.compile(model.unet.forward, dynamic=False)

    # stage 2: joint training
    params = model.trainable_parameters()
    opt = MuonAdamW(model, cfg.lr, cfg.weight_decay) if cfg.optimizer == "muon" else \
        make_optimizer(params, cfg.lr, cfg.weight_decay)
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    wanted = set(branch_names(cfg))
    batch = {"content": cfg.image_batch, "motion": cfg.video_batch, "paired": cfg.video_batch}
    streams = {b: BatchStream(data[b], batch[b], cfg.seed * 10 + rank * 1000 + i)
               for i, b in enumerate(sorted(wanted))}
    torch.manual_seed(cfg.seed * 7919 + rank)  # from here on each rank draws its own noise
    random.seed(cfg.seed * 7919 + rank)
    start, seconds_before, fitted = 0, 0.0, False
    if resume is not None:
        if len(resume["ranks"]) != world:
            sys.exit(f"error: {existing[-1]} was written by {len(resume['ranks'])} process(es); "
                     f"resume it with the same number, not {world}")
        then = resume["configs"]["train"].get("optimizer", "adamw")
        if then != cfg.optimizer:
            sys.exit(f"error: {existing[-1]} was trained with --optimizer {then}; resume it with "
                     f"the same, not {cfg.optimizer}")
        opt.load_state_dict(resume["optimizer"])
        ema = {k: v.to(device) for k, v in resume["ema"].items()}
        load_rank_state(resume["ranks"][rank], streams)
        start = resume["step"]
        seconds_before = resume.get("seconds", 0.0)  # checkpoints before this field: 0
        if cfg.time_budget and resume.get("fitted_steps"):
            if cfg.steps != resume["fitted_steps"]:
                print(f"--time_budget: keeping the {resume['fitted_steps']} steps it fixed "
                      f"(pass --time_budget 0 to train to --steps {cfg.steps})")
            cfg.steps, fitted = resume["fitted_steps"], True
            cfg.ema_decay = resume["configs"]["train"]["ema_decay"]  # as budget_ema_decay set it
        del resume
    ema_tensors = [ema[n] for n, p in model.named_parameters() if p.requires_grad]  # as params
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # content steps leave the temporal layers unused

    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
    prompts = [p.strip() for p in cfg.preview_prompts.split(";") if p.strip()]
    last_ckpt, running, t_log = (existing[-1] if existing else None), {}, time.time()
    def elapsed():  # the run's wall time so far, over all its invocations
        return seconds_before + time.time() - t_start

    # --time_budget: time steps start+FIT_FROM .. fit_at, then fix cfg.steps (before the cosine
    # starts) and the EMA with it; every REFIT_EVERY steps, fit again at the pace since the last
    # fit (the cosine follows the new count), never past the planned steps or --max_steps,
    # whichever is more. A resumed run keeps its count.
    fit_at = max(cfg.warmup, start + FIT_AT) if cfg.time_budget and not fitted else None
    planned, decay, paused = cfg.steps, cfg.ema_decay, 0.0
    most = max(planned, cfg.max_steps) if fit_at is not None and start < planned else planned
    bar = tqdm(range(start, most), initial=start, total=cfg.steps, disable=rank != 0,
               desc=f"diffusion ({precision})", dynamic_ncols=True)  # ends at cfg.steps (below)
    with CtrlC(active=world == 1) as ctrl_c:
        for step in bar:
            if step == start + FIT_FROM:
                t_fit, fit_from, paused = time.time(), step, 0.0
            if step == fit_at or (fitted and fit_at is not None and step % REFIT_EVERY == 0):
                step_s = (time.time() - t_fit - paused) / (step - fit_from)  # previews apart
                if step == fit_at:
                    sample_s = sample_step_seconds(model, prompts, configs, precision) if (
                        rank == 0 and prompts) else 0.0
                steps = torch.tensor([fit_steps(cfg, step, elapsed(), step_s, sample_s,
                                                most)], device=device)
                if world > 1:  # rank 0's count for all
                    dist.broadcast(steps, 0)
                before, cfg.steps = cfg.steps, int(steps)
                cfg.ema_decay = budget_ema_decay(decay, planned, cfg.steps)
                shorter = (f"; EMA decay {decay:g} -> {cfg.ema_decay:.5g} (a window of "
                           f"~{1 / (1 - cfg.ema_decay):.0f} steps)"  # cut: decay < 1
                           if cfg.ema_decay != decay else "")
                more = f", more than the {planned} planned" if cfg.steps > planned else ""
                if rank == 0 and not fitted and more:
                    tqdm.write(f"time budget {cfg.time_budget:g} min: {cfg.steps} steps fit"
                               f"{more} (--max_steps {most}; {1 / step_s:.1f} steps/s)")
                elif rank == 0 and not fitted:
                    tqdm.write(f"time budget {cfg.time_budget:g} min: {cfg.steps} of "
                               f"{planned} steps fit ({1 / step_s:.1f} steps/s){shorter}")
                elif rank == 0 and cfg.steps != before:
                    tqdm.write(f"time budget: {cfg.steps} steps, not {before} ({1 / step_s:.1f} "
                               f"steps/s since step {fit_from}){shorter}")
                t_fit, fit_from, paused, fitted = time.time(), step, 0.0, True
                bar.total = cfg.steps
                bar.refresh()
            branch = branch_at(cfg, step, rank)
            x, captions = streams[branch].next()
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            with amp:
                loss, parts = net(branch, x.to(device), captions if branch != "motion" else None)
            own = torch.isfinite(loss.detach())
            finite = own.float()
            if world > 1:  # all ranks stop together: one alone would leave the others waiting
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # in DDP's next gradient reduce
            if not finite:
                where = (f"({loss.item()}) at step {step} on the {branch} branch"
                         if not own else f"on another process at step {step}")
                if world > 1:  # every rank is here: close the group as at the end (below)
                    del net
                    dist.destroy_process_group()
                kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else \
                    "no checkpoint was written yet"
                sys.exit(f"error: non-finite loss {where}; {kept}. Try a lower --lr or "
                         f"--precision fp32, then --resume.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            ema_update(ema_tensors, params, cfg.ema_decay)
            running.update(parts)
            done = step + 1
            if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
                rate = cfg.log_every / max(time.time() - t_log, 1e-9)
                t_log = time.time()
                bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}
                                | {"it/s": f"{rate:.1f}"})
                log.write(json.dumps({"step": done, "lr": lr_at(cfg, step), **running}) + "\n")
                log.flush()
            stop = ctrl_c.requested
            if done % cfg.ckpt_every == 0 or done == cfg.steps or stop:
                ranks = rank_state(streams)  # a collective: every rank takes part
                if rank == 0:
                    last_ckpt = save_checkpoint(cfg, configs, model, ema, opt, ranks, done,
                                                elapsed(), fitted)
            if stop:
                bar.close()
                sys.exit(f"interrupted: {last_ckpt} holds step {done}; continue with --resume")
            if rank == 0 and done % cfg.preview_every == 0 and done != cfg.steps and prompts:
                t_preview = time.time()
                write_samples(model, ema, prompts, configs,
                              os.path.join(cfg.out, "previews", f"step_{done:07d}"), precision)
                paused += time.time() - t_preview  # fit_steps counts the previews apart
            if done == cfg.steps:  # --time_budget may have shortened the run
                break
    bar.close()
    if rank == 0 and prompts and start < cfg.steps:
        paths = write_samples(model, ema, prompts, configs, os.path.join(cfg.out, "samples"),
                              precision, steps=FINAL_STEPS, seeds=FINAL_SEEDS)
        print("wrote:\n  " + "\n  ".join(paths))
    if rank == 0:
        print(f"checkpoint: {last_ckpt}\ntotal time: {time.time() - t_start:.0f} s")
        log.close()
    if world > 1:
        # Drop the DDP wrapper first: its reducer holds the process group, and were the group's
        # last reference freed with the wrapper (on return), gloo's destructor would wait for its
        # worker threads while holding the GIL that a worker may need to free a finished
        # collective's tensors: a deadlock (seen here in 2 of 41 runs of the gloo test).
        del net
        dist.destroy_process_group()
    return model, last_ckpt


def set_backend_flags():
    """float32 matmuls may round their inputs to TF32 on CUDA (torch's "high" precision; no
    effect on a CPU), and cuDNN times its convolution algorithms once per new shape and keeps the
    fastest (a run has two or three fixed shapes, one per branch)."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.benchmark = True


def main(argv=None):
    set_backend_flags()
    configs = parse_args(argv)
    try:
        train(configs)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the diffusion stage
        sys.exit(f"interrupted: stopped at once; --resume continues from the last checkpoint "
                 f"in {configs['train'].out}, if any")
    except tft2v.compile_errors(configs["train"].compile) as e:  # e.g. no C++ compiler
        sys.exit(f"error: --compile could not compile the UNet ({tft2v.compile_failure(e)}); "
                 f"run without --compile (--resume continues from the last checkpoint in "
                 f"{configs['train'].out}, if any)")


if __name__ == "__main__":
    main()
