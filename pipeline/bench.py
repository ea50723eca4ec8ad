"""`python -m pipeline bench`: throughput of the training loop without Ray, under Ray Train with 1 and N
workers, against the machine's measured matmul peak; with ``--sweep`` also a small sweep, and where its
hardware's time went (pipeline.accounting). A script that prints a table, not a test.

Images/s are the median of several timed windows of steps after warm-up, on real MNIST batches and the
default model (configs/mnist.yaml unless --config says otherwise).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import PipelineConfig, load_config, with_overrides
from pipeline.data import Split, load
from pipeline.distributed import (
    BenchOptions,
    StepClock,
    WorkerJob,
    build_trainer,
    init_ray,
    prepare_inputs,
    resolve_scaling,
)
from pipeline.metrics import get_evaluator
from pipeline.train import generate_images, train_gan


def _best_rate(fn: Callable[[], Any], flops: float, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return flops / best / 1e9


def matmul_peak_gflops(threads: int, repeats: int = 8) -> dict[str, float]:
    """This machine's fp32 ceiling for the conv FLOPs: the best of torch.mm (MKL sgemm) and large 1x1
    convolutions (oneDNN GEMMs, the kernels the model itself runs on). On AMD CPUs MKL's sgemm stays far
    below the hardware, so torch.mm alone would understate the peak."""
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = _best_rate(lambda: a @ b, 2 * n**3, repeats)
    conv = 0.0
    for channels, side in ((512, 64), (1024, 32), (2048, 32)):
        x, w = torch.randn(1, channels, side, side), torch.randn(channels, channels, 1, 1)
        conv = max(conv, _best_rate(lambda x=x, w=w: F.conv2d(x, w), 2 * channels**2 * side**2, repeats))
    return {"peak_gflops": max(mm, conv), "peak_mm_gflops": mm, "peak_conv1x1_gflops": conv}


def flops_per_image(cfg: PipelineConfig) -> float:
    """Model FLOPs of one training step (D on real and fake, G forward(s), G step), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = cfg.train.batch_size
    one_step = with_overrides(cfg, {"data.limit": batch, "train.epochs": 1, "eval.every_epochs": 0})
    fake = Split(torch.zeros(batch, 28, 28, dtype=torch.uint8), torch.zeros(batch, dtype=torch.long))
    with FlopCounterMode(display=False) as counter:
        train_gan(one_step, fake, log=lambda _: None)
    return counter.get_total_flops() / batch


# rayn_nosync: the N workers again without DDP's gradient all-reduce (no longer data parallel, so only a
# diagnostic): splits the N-worker shortfall into communication and the cost of splitting the batch.
LOOPS = ("plain", "ray1", "rayn", "rayn_nosync")
RATIOS = {
    "ray1_vs_plain": ("ray1", "plain"),
    "rayn_vs_ray1": ("rayn", "ray1"),
    "rayn_nosync_vs_ray1": ("rayn_nosync", "ray1"),
}


def bench(
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    quick: bool = False,
    num_workers: int | None = None,
    rounds: int | None = None,
    progress: Callable[[str], None] = print,
    sweep: bool = False,
) -> dict[str, Any]:
    """Run every measurement; return the results (the JSON that --out writes).

    The loops are timed in ``rounds`` interleaved rounds (Ray 1 worker, Ray N workers, the N workers without
    gradient sync, the plain loop): on a shared VM the same loop measured minutes apart can differ by 15%,
    so each ratio is taken within a round, from stages seconds apart, and the median over rounds reported.
    """
    import ray

    from pipeline import STARTED_AT

    cpus = os.cpu_count() or 1
    workers_n = num_workers or cpus
    rounds = (1 if quick else 3) if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, not {rounds}")
    base = load_config(config or Path(__file__).resolve().parent.parent / "configs" / "mnist.yaml", overrides)
    batch = base.train.batch_size
    warmup, window, windows = (5, 10, 3) if quick else (10, 20, 5)
    steps = warmup + window * windows + 1
    # Bench runs are throw-away: kept apart from real runs unless train.storage_path says where.
    storage = str(base.train.storage_path or Path.home() / ".cache" / "gan-pipeline" / "bench")
    cfg = with_overrides(
        base, {"data.limit": steps * batch, "train.epochs": 1, "eval.every_epochs": 0, "train.storage_path": storage}
    )
    results: dict[str, Any] = {"config": cfg.to_dict(), "cpus": cpus, "quick": quick, "rounds": rounds}

    # From the command's start to Ray 1's first step (round 1) is what a user of `pipeline train` waits
    # (imports, checks, evaluator, Ray, worker group, data). Each worker times its own steps.
    evaluator = prepare_inputs(cfg, progress)
    data = None  # loaded after round 1's Ray stages: start_to_first_step_s must not include it
    per_round: list[dict[str, Any]] = []
    for number in range(1, rounds + 1):
        measured: dict[str, Any] = {}
        init_ray()
        for label, workers, sync in (("ray1", 1, True), ("rayn", workers_n, True), ("rayn_nosync", workers_n, False)):
            run_cfg = resolve_scaling(
                with_overrides(cfg, {"scaling.num_workers": workers, "scaling.cpus_per_worker": None})
            )
            progress(
                f"[bench] round {number}/{rounds}: Ray Train, {workers} worker(s) x {run_cfg.scaling.cpus_per_worker} "
                "CPU" + ("" if sync else ", gradients not synchronised (diagnostic)")
            )
            options = BenchOptions(warmup=warmup, window=window, sync_gradients=sync)
            name = f"bench-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
            metrics = build_trainer(WorkerJob(run_cfg, evaluator=evaluator, bench=options), name).fit().metrics
            measured.update({f"{label}_{k}": metrics[f"bench_{k}"] for k in ("img_s", "img_s_min", "img_s_max")})
            if label == "ray1" and number == 1:
                results["start_to_first_step_s"] = metrics["bench_first_step_time"] - STARTED_AT
        ray.shutdown()  # its daemons would share the CPUs with the plain loop

        progress(f"[bench] round {number}/{rounds}: plain loop, {steps} steps of batch {batch}, no Ray")
        torch.set_num_threads(cpus)
        if data is None:
            data = load(cfg.data, progress=progress)
        clock = StepClock()
        train_gan(cfg, data, on_step=clock, log=lambda _: None)
        measured.update({f"plain_{k}": v for k, v in clock.summary(batch, warmup, window).items()})
        measured.update({ratio: measured[f"{a}_img_s"] / measured[f"{b}_img_s"] for ratio, (a, b) in RATIOS.items()})
        per_round.append(measured)
    results.update(per_round=per_round, num_workers_n=workers_n, **medians(per_round))

    progress(f"[bench] matmul peak ({cpus} threads)")
    results.update(matmul_peak_gflops(cpus))
    results["flops_per_img"] = flops_per_image(cfg)
    progress("[bench] evaluation of 10,000 samples")
    results["eval_s_per_10k"] = evaluation_seconds(cfg, data, cpus, progress)

    results["epoch_s"] = 60_000 / results["rayn_img_s"]
    achieved = results["plain_img_s"] * results["flops_per_img"] / 1e9
    results["achieved_gflops"] = achieved
    results["fraction_of_peak"] = achieved / results["peak_gflops"]
    results["fraction_of_mm_peak"] = achieved / results["peak_mm_gflops"]
    results["ray1_fraction_of_peak"] = results["ray1_img_s"] * results["flops_per_img"] / 1e9 / results["peak_gflops"]
    results["eval_fraction_of_epoch"] = results["eval_s_per_10k"] / results["epoch_s"]
    if sweep:
        results.update(sweep_stage(cfg, quick, progress))
    return results


def sweep_stage(cfg: PipelineConfig, quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """A sweep as `tune` runs one (one-worker trials, each trained in its own process; MLflow child runs; no
    early stopping), two trials per CPU (one with ``quick``), each one 1-CPU worker for one epoch of the
    bench's images: its
    busy_fraction, trial start-to-first-step, evaluation and checkpoint seconds (``sweep_*`` keys)."""
    import ray

    from pipeline.tune import run_sweep

    slots = os.cpu_count() or 1
    trials = slots if quick else 2 * slots
    progress(f"[bench] sweep: {trials} trials of one epoch, {slots} at a time, 1 worker each")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        sweep_cfg = with_overrides(
            cfg,
            {
                "scaling.num_workers": 1,
                "scaling.cpus_per_worker": 1,
                "scaling.use_gpu": "false",
                "tune.num_samples": trials,
                "tune.max_concurrent_trials": slots,
                "tune.scheduler": "none",
                "tune.search_space": {"optim.lr_g": {"loguniform": [1.0e-4, 1.0e-3]}},
                "eval.every_epochs": 1,
                "eval.num_samples": 1000 if quick else 5000,
                "tracking.uri": f"sqlite:///{tmp}/mlflow.db",
                "train.storage_path": f"{tmp}/runs",
                "tracking.registered_model": "",
            },
        )
        outcome = run_sweep(sweep_cfg, "bench-sweep", progress=lambda line: None)
    ray.shutdown()
    if outcome.time is None:
        raise RuntimeError("the bench sweep reported no timing")
    return {"sweep_trials": trials, **{f"sweep_{k}": v for k, v in outcome.time.metrics().items()}}


def medians(per_round: list[dict[str, Any]]) -> dict[str, float]:
    """Each loop's median images/s over the rounds with its slowest and fastest window; each ratio's median."""
    out = {}
    for label in LOOPS:
        out[f"{label}_img_s"] = statistics.median(r[f"{label}_img_s"] for r in per_round)
        out[f"{label}_img_s_min"] = min(r[f"{label}_img_s_min"] for r in per_round)
        out[f"{label}_img_s_max"] = max(r[f"{label}_img_s_max"] for r in per_round)
    out.update({ratio: statistics.median(r[ratio] for r in per_round) for ratio in RATIOS})
    return out


def evaluation_seconds(cfg: PipelineConfig, data: Split, cpus: int, progress: Callable[[str], None]) -> float:
    """Seconds to score 10,000 samples as training does (generate, evaluator features, FID and IS)."""
    torch.set_num_threads(cpus)
    generator = train_gan(with_overrides(cfg, {"data.limit": cfg.train.batch_size}), data, log=lambda _: None).generator
    evaluator = get_evaluator(cfg.data, progress)
    started = time.perf_counter()
    evaluator.score(generate_images(generator, 10_000, cfg.model.latent_dim, 0, torch.device("cpu")))
    return time.perf_counter() - started


def format_table(r: dict[str, Any]) -> str:
    def rate(label: str) -> str:
        return f"{r[f'{label}_img_s']:.0f} img/s ({r[f'{label}_img_s_min']:.0f}-{r[f'{label}_img_s_max']:.0f})"

    rows = [
        ("plain loop, no Ray", rate("plain"), f"{r['fraction_of_peak']:.0%} of peak"),
        (
            "Ray Train, 1 worker",
            rate("ray1"),
            f"{r['ray1_vs_plain']:.2f}x plain; {r['ray1_fraction_of_peak']:.0%} of peak",
        ),
        (f"Ray Train, {r['num_workers_n']} workers", rate("rayn"), f"{r['rayn_vs_ray1']:.2f}x 1 worker"),
        (
            f"{r['num_workers_n']} workers, no gradient all-reduce (diagnostic)",
            rate("rayn_nosync"),
            f"{r['rayn_nosync_vs_ray1']:.2f}x 1 worker; the {r['num_workers_n']}-worker row's gap to this one is "
            "communication",
        ),
        ("model FLOPs per image (train step)", f"{r['flops_per_img'] / 1e6:.0f} MFLOP", ""),
        (
            "fp32 peak (best of torch.mm, 1x1 conv GEMMs)",
            f"{r['peak_gflops']:.0f} GFLOP/s",
            f"mm alone {r['peak_mm_gflops']:.0f} (plain loop {r['fraction_of_mm_peak']:.0%} of it); "
            f"achieved {r['achieved_gflops']:.0f}",
        ),
        (
            "evaluation, 10,000 samples",
            f"{r['eval_s_per_10k']:.1f} s",
            f"{r['eval_fraction_of_epoch']:.0%} of an epoch",
        ),
        ("epoch of 60,000 images (N workers)", f"{r['epoch_s']:.0f} s", ""),
        ("command start to first step (Ray, 1 worker)", f"{r['start_to_first_step_s']:.1f} s", ""),
    ]
    if "sweep_busy_fraction" in r:
        rows += [
            (
                f"sweep of {r['sweep_trials']} one-epoch trials: busy_fraction",
                f"{r['sweep_busy_fraction']:.2f}",
                f"of {r['sweep_wall_s']:.0f} s x {r['sweep_capacity']:g} CPU/GPU; evaluation "
                f"{r['sweep_eval_s']:.0f} s, checkpoints {r['sweep_checkpoint_s']:.0f} s (trial-seconds)",
            ),
            (
                "sweep: trial start to first step",
                f"median {r['sweep_start_median_s']:.1f} s, max {r['sweep_start_max_s']:.1f} s",
                f"median phases: driver {r['sweep_start_driver_median_s']:.1f} s, workers "
                f"{r['sweep_start_workers_median_s']:.1f} s, data "
                f"{r['sweep_start_data_median_s']:.1f} s, setup {r['sweep_start_setup_median_s']:.1f} s",
            ),
        ]
    lines = [
        f"| measurement | value (median of {r['rounds']} round(s); slowest-fastest window) | relation (median of "
        "the rounds' own ratios) |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(results, indent=2, default=str))
