"""Speed figures for the UNet of unet3d.py: one training step (forward, backward, and the
optimiser of train.py: a train.py preset's, else AdamW) of the motion branch (video, temporal
layers on) and of the content branch (images, F = 1, temporal layers off), in float32 and in
bfloat16 autocast, with the parameter count, the step's FLOPs (torch.utils.flop_counter) and the
achieved rate against a plain matmul measured in the same run; with --compile, each step again
with the UNet under torch.compile, and each sampling run too (as sample.py --compile), the eager
and compiled calls timed in alternating rounds.
With a train.py preset (quick, toy, gpu) it also times DDIM sampling with classifier-free
guidance (one video and a batch; its FLOPs and rate too), the Shapes data pipeline's share of a
step, and peak memory.

    python bench.py                       # the UNet's tiny preset on this machine's default device
    python bench.py --preset quick        # the quick training preset: steps, sampling, data
    python bench.py --json out/bench.json --steps 10
    python bench.py --compile             # eager and torch.compile'd steps side by side

On a shared CPU run it under `flock /tmp/tft2v_cpu.lock` so timings do not overlap other jobs.

Tensor legend: B batch, C channels, F frames, H W height width, L context tokens, D context width.
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import (FlopCounterMode, sdpa_backward_flop_count,
                                     sdpa_flop_count)

import tft2v
import train
import unet3d
from data import fetch_batch, shapes, video


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel: count it too.
aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_times(fns, steps, warmup, device):
    """Median wall time of each fn() over `steps` rounds that call every fn once in turn, after
    `warmup` untimed rounds: where the machine's speed drifts (a shared CPU), the fns share its
    slow and fast moments, so that eager and compiled compare fairly within one run."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, fn_times in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(fn_times) for fn_times in times]


def median_time(fn, steps, warmup, device):
    """Median wall time of fn() over `steps` calls after `warmup` untimed calls."""
    return median_times([fn], steps, warmup, device)[0]


def matmul_gflops(dtype, n, steps, device):
    """Rate of an n x n x n matmul in GFLOP/s: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device,
                                                                      dtype=dtype)
    seconds = median_time(lambda: a @ b, steps, 2, device)
    return 2 * n**3 / seconds / 1e9


def make_step(model, optimiser, batch, frames, size, use_temporal, dtype, device, context_len,
              net=None):
    """A closure running one training step on fixed random data, and a forward+backward closure
    (for the FLOP count). `net` runs the forward in place of `model` (its compiled form)."""
    c = model.config
    net = model if net is None else net
    x = torch.randn(batch, c.in_channels, frames, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, context_len, c.context_dim, device=device)
    target = torch.randn(batch, c.out_channels, frames, size, size, device=device)

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            pred = net(x, t, context, use_temporal=use_temporal)
        F.mse_loss(pred.float(), target).backward()

    def step():
        forward_backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return step, forward_backward


def peak_memory_mb(device):
    """Peak memory so far: CUDA's allocator peak, or the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def sampling_seconds(model, batch, frames, size, steps, dtype, device, context_len, repeats,
                     nets=(None,)):
    """Median times of DDIM sampling with classifier-free guidance (2 x batch per network call),
    through the same Diffusion.ddim_sample and guidance code as TFT2V.generate, with each of
    `nets` (None: `model`; else a compiled twin of it, run in its place) in alternating rounds;
    the time of each one's first sample (a twin's includes compiling); and the FLOPs of the
    whole sample (one step's network call of `model` counted, times the steps):
    ([seconds], [first_seconds], flops)."""
    diffusion = tft2v.Diffusion(tft2v.DiffusionConfig())
    context = torch.randn(batch, context_len, model.config.context_dim, device=device)

    def guided(unet):
        def call(x, t, c):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                return unet(x, t, c, use_temporal=frames > 1).float()
        return tft2v.classifier_free_guidance(call, context, torch.zeros_like(context), 9.0)

    shape = (batch, model.config.out_channels, frames, size, size)
    samples = [lambda fn=guided(model if net is None else net):
               diffusion.ddim_sample(fn, shape, steps, device=device) for net in nets]
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with torch.no_grad(), unet3d.channels_last_convs(
            model, tft2v.sampling_channels_last(device, dtype)):  # as generate() does
        with counter:
            diffusion.ddim_sample(guided(model), shape, 1, device=device)  # one network call
        first = [median_time(sample, 1, 0, device) for sample in samples]
        seconds = median_times(samples, repeats, 0, device)
    return seconds, first, counter.get_total_flops() * steps


def data_seconds(kind, batch, shapes_config, steps):
    """Median time to fetch one training batch of the Shapes world (rendered on the fly, nothing
    cached, so the same indices cost what any others do)."""
    data = shapes.ShapesDataset(kind, shapes_config)
    return median_time(lambda: fetch_batch(data, list(range(batch))), steps, 1,
                       torch.device("cpu"))


def check_args(args, config):
    """One line for settings that cannot run, before any timing."""
    for name in ("batch", "frames", "size", "image_batch", "context_len", "steps",
                 "sample_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, "
                             f"got {getattr(args, name)}")
    for name in ("warmup", "threads", "matmul_size"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 0, "
                             f"got {getattr(args, name)}")
    if not args.dtypes or set(args.dtypes.split(",")) - {"fp32", "bf16"}:
        raise ValueError(f"--dtypes takes a comma list of fp32 and bf16, got {args.dtypes!r}")
    batches = args.sample_batches.split(",")
    if not all(b.isdigit() and int(b) > 0 for b in batches):
        raise ValueError(f"--sample-batches takes a comma list of positive numbers, "
                         f"got {args.sample_batches!r}")
    if args.size % config.size_multiple():
        raise ValueError(f"--size must be a multiple of {config.size_multiple()} for this "
                         f"UNet, got {args.size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available")
    if args.json:
        video.check_writable(os.path.dirname(os.path.abspath(args.json)), "folder of --json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny",
                        choices=sorted(unet3d.PRESETS) + sorted(train.presets()),
                        help="a UNet preset, or a train.py preset (its UNet, sizes and batches)")
    parser.add_argument("--batch", type=int, default=4, help="videos per motion-branch step")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="frame height and width")
    parser.add_argument("--image-batch", type=int, default=16, help="images per content step")
    parser.add_argument("--context-len", type=int, default=77, help="context tokens L")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=0,
                        help="n of the n x n x n matmul that measures the peak (0: 8192 on CUDA, "
                             "where 2048 reached 42%% of it on an H100, else 2048)")
    parser.add_argument("--checkpoint", action="store_true", help="gradient checkpointing")
    parser.add_argument("--compile", action="store_true",
                        help="also time every step with the UNet under torch.compile (as train.py "
                             "--compile), and sampling as sample.py --compile; the first compiled "
                             "call's time, compilation included, is reported as compile_s")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (see torch._dynamo.list_backends())")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps when sampling")
    parser.add_argument("--sample-batches", default="1,16", help="videos per sampling call")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc as it is (train.py, sample.py and eval.py "
                             "call tft2v.keep_freed_memory; this measures without it)")
    parser.add_argument("--optimizer", choices=("adamw", "muon"),
                        help="the optimiser of each step (default: a train.py preset's, else "
                             "adamw)")
    parser.add_argument("--json", default="", help="also write the results to this path")
    args = parser.parse_args(argv)
    preset = train.presets().get(args.preset)
    if preset is not None:  # a training preset fixes the UNet, the sizes and the batches
        s, c = preset["shapes"], preset["clip"]
        args.size, args.frames = s.resolution, s.frames
        args.batch, args.image_batch = preset["train"].video_batch, preset["train"].image_batch
        args.context_len = c.context_length + preset["tft2v"].image_tokens
    try:
        check_args(args, preset["unet"] if preset is not None else unet3d.PRESETS[args.preset])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

    if args.threads:
        torch.set_num_threads(args.threads)
    train.set_backend_flags()  # as train.py: TF32 matmuls for float32 on CUDA, cuDNN autotuning
    torch.manual_seed(0)
    device = torch.device(args.device)
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    kept = False if args.system_malloc else tft2v.keep_freed_memory()
    if preset is not None:
        config = dataclasses.replace(preset["unet"], context_dim=preset["clip"].transformer_width)
    else:
        config = unet3d.PRESETS[args.preset]
    config = dataclasses.replace(config, use_checkpoint=args.checkpoint)
    model = unet3d.UNet3D(config).to(device).train()
    args.optimizer = args.optimizer or (preset["train"].optimizer if preset else "adamw")
    if args.optimizer == "muon":
        optimiser = train.MuonAdamW(model, lr=1e-4)
    else:
        optimiser = train.make_optimizer(list(model.parameters()), lr=1e-4)
    params = sum(p.numel() for p in model.parameters())

    results = dict(device=str(device), threads=torch.get_num_threads(), malloc_kept=kept,
                   preset=args.preset, config=dataclasses.asdict(config), params=params,
                   optimizer=args.optimizer,
                   matmul_size=args.matmul_size, matmul_gflops={}, runs=[])
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        results["matmul_gflops"][dtype] = matmul_gflops(torch_dtype, args.matmul_size,
                                                        args.steps, device)

    branches = [("motion", args.batch, args.frames, True),
                ("content", args.image_batch, 1, False)]
    # one compiled module for all runs; each branch and precision compiles its own graph
    # (dynamic=False: specialise on every shape rather than trace a shape-generic graph)
    compiled = (torch.compile(model, backend=args.compile_backend, dynamic=False)
                if args.compile else None)
    for name, batch, frames, use_temporal in branches:
        for dtype in dtypes:
            step, forward_backward = make_step(model, optimiser, batch, frames, args.size,
                                               use_temporal, dtype, device, args.context_len)
            counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
            with counter:
                forward_backward()
            optimiser.zero_grad(set_to_none=True)
            flops = counter.get_total_flops()  # a compiled step does the same arithmetic
            twins = [step]  # eager, and compiled with --compile
            if compiled is not None:
                twins.append(make_step(model, optimiser, batch, frames, args.size, use_temporal,
                                       dtype, device, args.context_len, net=compiled)[0])
            # the first compiled call traces and compiles: its time, once, is compile_s
            compile_s = median_time(twins[1], 1, 0, device) if compiled is not None else None
            seconds = median_times(twins, args.steps, args.warmup, device)
            for is_compiled, run, step_s in zip((False, True), twins, seconds):
                peak_mb = None
                if device.type == "cuda":  # one more call alone, for its own peak
                    torch.cuda.reset_peak_memory_stats(device)
                    run()
                    peak_mb = peak_memory_mb(device)
                results["runs"].append(dict(
                    branch=name, dtype=dtype, compiled=is_compiled,
                    compile_s=compile_s if is_compiled else None, peak_mb=peak_mb,
                    batch=batch, frames=frames, size=args.size, step_s=step_s,
                    gflop=flops / 1e9, gflops=flops / step_s / 1e9,
                    of_matmul=flops / step_s / 1e9 / results["matmul_gflops"][dtype]))

    if preset is not None:
        model.eval()
        results["sampling"] = []
        nets = [None] + ([compiled] if compiled is not None else [])
        for batch in map(int, args.sample_batches.split(",")):
            for dtype in dtypes:
                all_seconds, all_first, flops = sampling_seconds(
                    model, batch, args.frames, args.size, args.sample_steps, dtype, device,
                    args.context_len, max(1, args.steps // 2), nets=nets)
                for net, seconds, first in zip(nets, all_seconds, all_first):
                    results["sampling"].append(dict(
                        batch=batch, dtype=dtype, steps=args.sample_steps,
                        compiled=net is not None, compile_s=None if net is None else first,
                        seconds=seconds, gflop=flops / 1e9, gflops=flops / seconds / 1e9,
                        of_matmul=flops / seconds / 1e9 / results["matmul_gflops"][dtype]))
        fastest = {b: min(r["step_s"] for r in results["runs"] if r["branch"] == b)
                   for b in ("motion", "content")}
        results["data"] = []
        for branch, kind, batch in (("content", "images", args.image_batch),
                                    ("motion", "textfree", args.batch)):
            seconds = data_seconds(kind, batch, preset["shapes"], args.steps)
            results["data"].append(dict(branch=branch, batch=batch, seconds=seconds,
                                        of_fastest_step=seconds / (seconds + fastest[branch])))
    # on CUDA the allocator's peak was reset before each timed run: the largest of them all
    results["peak_memory_mb"] = max([peak_memory_mb(device)] + [r["peak_mb"] or 0
                                                                 for r in results["runs"]])

    print(f"UNet3D preset {args.preset}: {params / 1e6:.2f} M parameters, device {device}, "
          f"{results['threads']} threads, malloc keeps freed memory: {'yes' if kept else 'no'}, "
          f"optimiser {args.optimizer}")
    print("matmul " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in
                                results["matmul_gflops"].items()) + f" (n = {args.matmul_size})")
    print(f"{'branch':8} {'dtype':5} {'mode':7} {'B':>3} {'F':>3} {'HxW':>7} {'step s':>8} "
          f"{'GFLOP':>7} {'GFLOP/s':>8} {'of matmul':>9}"
          + (f" {'peak MB':>8}" if device.type == "cuda" else ""))
    for r in results["runs"]:
        print(f"{r['branch']:8} {r['dtype']:5} {'compile' if r['compiled'] else 'eager':7} "
              f"{r['batch']:>3} {r['frames']:>3} {r['size']:>3}x{r['size']:<3} "
              f"{r['step_s']:8.3f} {r['gflop']:7.1f} {r['gflops']:8.1f} {r['of_matmul']:9.0%}"
              + (f" {r['peak_mb']:8.0f}" if r["peak_mb"] is not None else "")
              + (f"  (first step, compiling: {r['compile_s']:.1f} s)" if r["compiled"] else ""))
    for r in results.get("sampling", []):
        print(f"sampling {r['batch']:>2} video(s), DDIM {r['steps']} steps with guidance, "
              f"{r['dtype']}{', compiled' if r['compiled'] else ''}: {r['seconds']:.2f} s "
              f"({r['gflop']:.0f} GFLOP, {r['gflops']:.1f} GFLOP/s, {r['of_matmul']:.0%} of "
              f"matmul)" + (f" (first sample, compiling: {r['compile_s']:.1f} s)"
                            if r["compiled"] else ""))
    for r in results.get("data", []):
        print(f"data: a {r['branch']} batch of {r['batch']} renders in {r['seconds'] * 1e3:.1f} ms"
              f", {r['of_fastest_step']:.1%} of a step (the fastest step)")
    print(f"peak memory: {results['peak_memory_mb']:.0f} MB "
          f"({'CUDA allocator' if device.type == 'cuda' else 'process resident set'})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
