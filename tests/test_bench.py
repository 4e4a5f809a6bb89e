"""bench.py runs end to end on a training preset and reports every figure it promises; the
allocator setting it measures applies."""

import dataclasses
import json
import platform

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

import bench
import tft2v
import train
import unet3d


def test_bench_on_the_quick_preset_reports_steps_sampling_data_and_memory(tmp_path,
                                                                         monkeypatch):
    muon_steps, muon_step = [], train.Muon.step
    monkeypatch.setattr(train.Muon, "step", lambda self: (muon_steps.append(1),
                                                          muon_step(self))[1])
    out = tmp_path / "bench.json"
    results = bench.main(["--preset", "quick", "--steps", "1", "--warmup", "0", "--dtypes",
                          "fp32", "--sample-steps", "2", "--sample-batches", "1",
                          "--matmul-size", "64", "--json", str(out)])
    assert json.loads(out.read_text())["params"] == results["params"] > 0
    assert results["optimizer"] == "muon" and muon_steps  # quick's optimiser, as in train.py
    assert {(r["branch"], r["dtype"]) for r in results["runs"]} == {
        ("motion", "fp32"), ("content", "fp32")}
    assert not any(r["compiled"] for r in results["runs"])
    assert all(r["step_s"] > 0 and r["gflop"] > 0 for r in results["runs"])
    assert results["runs"][0]["batch"] == 4 and results["runs"][1]["batch"] == 32  # quick's
    assert [(r["batch"], r["steps"]) for r in results["sampling"]] == [(1, 2)]
    # sampling's FLOPs: per step one UNet call on the guided batch (the video and its null twin)
    preset = train.presets()["quick"]
    model = unet3d.UNet3D(dataclasses.replace(preset["unet"],
                                              context_dim=preset["clip"].transformer_width))
    counter = FlopCounterMode(display=False, custom_mapping=bench.CPU_ATTENTION_FLOPS)
    with torch.no_grad(), counter:
        model(torch.randn(2, 3, 8, 32, 32), torch.tensor([999, 999]),
              torch.randn(2, preset["clip"].context_length + preset["tft2v"].image_tokens,
                          model.config.context_dim))
    sampling = results["sampling"][0]
    assert sampling["gflop"] == pytest.approx(2 * counter.get_total_flops() / 1e9)
    assert sampling["gflops"] == pytest.approx(sampling["gflop"] / sampling["seconds"])
    assert {r["branch"] for r in results["data"]} == {"content", "motion"}
    assert all(0 < r["of_fastest_step"] < 1 for r in results["data"])
    assert results["peak_memory_mb"] > 0


def test_bench_compile_times_a_compiled_twin_of_every_step_and_of_sampling(monkeypatch):
    """--compile adds, per branch and precision, the step with the UNet under torch.compile, and
    per sampling run the sample with the compiled UNet, as sample.py --compile (the "eager"
    backend here: the same tracing through torch._dynamo, without inductor's minutes of code
    generation), with the same FLOP counts and the first call's time as compile_s. On a
    training preset with a one-level UNet that has every kind of block (tracing the `quick`
    UNet took twice as long), 8x8 and 2 frames."""
    quick = train.presets()["quick"]
    mini = dict(quick, unet=unet3d.UNetConfig(channel_mult=(1,), attention_levels=(0,),
                                              temporal_conv_layers=1, num_groups=8),
                shapes=dataclasses.replace(quick["shapes"], resolution=8, frames=2),
                train=dataclasses.replace(quick["train"], video_batch=1, image_batch=2))
    monkeypatch.setattr(train, "presets", lambda: {"mini": mini})
    counters.clear()
    results = bench.main(["--preset", "mini", "--steps", "1", "--warmup", "0", "--dtypes",
                          "fp32", "--sample-steps", "2", "--sample-batches", "1",
                          "--matmul-size", "64", "--compile", "--compile-backend", "eager"])
    runs = {(r["branch"], r["compiled"]): r for r in results["runs"]}
    assert set(runs) == {("motion", False), ("motion", True), ("content", False),
                         ("content", True)}
    for branch in ("motion", "content"):
        eager, compiled = runs[branch, False], runs[branch, True]
        assert compiled["gflop"] == eager["gflop"] > 0
        assert compiled["step_s"] > 0 and compiled["compile_s"] > 0
        assert eager["compile_s"] is None
    eager, compiled = sorted(results["sampling"], key=lambda r: r["compiled"])
    assert not eager["compiled"] and compiled["compiled"] and eager["compile_s"] is None
    assert compiled["gflop"] == eager["gflop"] > 0 and compiled["seconds"] > 0
    assert compiled["compile_s"] > 0
    # dynamo captured the UNet once per branch and once for sampling
    assert counters["stats"]["unique_graphs"] >= 3
    assert results["optimizer"] == "muon"  # quick's


def test_median_times_alternates_the_timed_calls_so_a_drifting_machine_slows_them_alike():
    calls = []
    fns = [lambda: calls.append("eager"), lambda: calls.append("compiled")]
    times = bench.median_times(fns, 3, 1, torch.device("cpu"))
    assert calls == ["eager", "compiled"] * 4  # one warm-up round, then three timed ones
    assert len(times) == 2 and all(t >= 0 for t in times)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_applies_on_glibc():
    assert tft2v.keep_freed_memory()


@pytest.mark.parametrize("bad,message", [
    (["--steps", "0"], "--steps must be positive, got 0"),
    (["--warmup", "-1"], "--warmup must be at least 0"),
    (["--dtypes", "fp64"], "--dtypes takes a comma list of fp32 and bf16"),
    (["--sample-batches", "1,-2"], "--sample-batches takes a comma list of positive numbers"),
    (["--size", "30"], "--size must be a multiple of 4"),
    (["--json", "/proc/forbidden/bench.json"], "cannot write to the folder of --json"),
])
def test_bench_bad_input_gives_one_line_error_before_any_timing(monkeypatch, bad, message):
    monkeypatch.setattr(bench, "matmul_gflops", lambda *a: pytest.fail("timed"))
    with pytest.raises(SystemExit, match=message):
        bench.main(bad)
