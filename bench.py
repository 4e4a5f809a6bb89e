"""Speed figures for the UNet of unet3d.py: one training step (forward, backward, AdamW) of the
motion branch (video, temporal layers on) and of the content branch (images, F = 1, temporal
layers off), in float32 and in bfloat16 autocast, with the parameter count, the step's FLOPs
(torch.utils.flop_counter) and the achieved rate against a plain matmul measured in the same run.

    python bench.py                       # the tiny preset on this machine's default device
    python bench.py --json out/bench.json --steps 10

On a shared CPU run it under `flock /tmp/tft2v_cpu.lock` so timings do not overlap other jobs.

Tensor legend: B batch, C channels, F frames, H W height width, L context tokens, D context width.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import (FlopCounterMode, sdpa_backward_flop_count,
                                     sdpa_flop_count)

import unet3d


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


def median_time(fn, steps, warmup, device):
    """Median wall time of fn() over `steps` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(dtype, n, steps, device):
    """Rate of an n x n x n matmul in GFLOP/s: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device,
                                                                      dtype=dtype)
    seconds = median_time(lambda: a @ b, steps, 2, device)
    return 2 * n**3 / seconds / 1e9


def make_step(model, optimiser, batch, frames, size, use_temporal, dtype, device, context_len):
    """A closure running one training step on fixed random data, and a forward+backward closure
    (for the FLOP count)."""
    c = model.config
    x = torch.randn(batch, c.in_channels, frames, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, context_len, c.context_dim, device=device)
    target = torch.randn(batch, c.out_channels, frames, size, size, device=device)

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            pred = model(x, t, context, use_temporal=use_temporal)
        F.mse_loss(pred.float(), target).backward()

    def step():
        forward_backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return step, forward_backward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(unet3d.PRESETS))
    parser.add_argument("--batch", type=int, default=4, help="videos per motion-branch step")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="frame height and width")
    parser.add_argument("--image-batch", type=int, default=16, help="images per content step")
    parser.add_argument("--context-len", type=int, default=77, help="context tokens L")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--checkpoint", action="store_true", help="gradient checkpointing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", default="", help="also write the results to this path")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = dataclasses.replace(unet3d.PRESETS[args.preset], use_checkpoint=args.checkpoint)
    model = unet3d.UNet3D(config).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = sum(p.numel() for p in model.parameters())

    results = dict(device=str(device), threads=torch.get_num_threads(), preset=args.preset,
                   config=dataclasses.asdict(config), params=params, matmul_size=args.matmul_size,
                   matmul_gflops={}, runs=[])
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        results["matmul_gflops"][dtype] = matmul_gflops(torch_dtype, args.matmul_size,
                                                        args.steps, device)

    branches = [("motion", args.batch, args.frames, True),
                ("content", args.image_batch, 1, False)]
    for name, batch, frames, use_temporal in branches:
        for dtype in dtypes:
            step, forward_backward = make_step(model, optimiser, batch, frames, args.size,
                                               use_temporal, dtype, device, args.context_len)
            counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
            with counter:
                forward_backward()
            optimiser.zero_grad(set_to_none=True)
            seconds = median_time(step, args.steps, args.warmup, device)
            flops = counter.get_total_flops()
            results["runs"].append(dict(
                branch=name, dtype=dtype, batch=batch, frames=frames, size=args.size,
                step_s=seconds, gflop=flops / 1e9, gflops=flops / seconds / 1e9,
                of_matmul=flops / seconds / 1e9 / results["matmul_gflops"][dtype]))

    print(f"UNet3D preset {args.preset}: {params / 1e6:.2f} M parameters, device {device}, "
          f"{results['threads']} threads")
    print("matmul " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in
                                results["matmul_gflops"].items()) + f" (n = {args.matmul_size})")
    print(f"{'branch':8} {'dtype':5} {'B':>3} {'F':>3} {'HxW':>7} {'step s':>8} {'GFLOP':>7} "
          f"{'GFLOP/s':>8} {'of matmul':>9}")
    for r in results["runs"]:
        print(f"{r['branch']:8} {r['dtype']:5} {r['batch']:>3} {r['frames']:>3} "
              f"{r['size']:>3}x{r['size']:<3} {r['step_s']:8.3f} {r['gflop']:7.1f} "
              f"{r['gflops']:8.1f} {r['of_matmul']:9.0%}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
