"""`python -m pipeline bench`: throughput of the training loop without Ray, under Ray Train with 1 and N
workers, against the machine's measured matmul peak. A script that prints a table, not a test.

Images/s are the median of several timed windows of steps after warm-up, on real MNIST batches and the
default model (configs/mnist.yaml unless --config says otherwise).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import PipelineConfig, load_config


class StepClock:
    """Wall-clock time of every optimizer step; throughput = median over windows after warm-up."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.times.append(time.time())

    def window_rates(self, images_per_step: int, warmup: int, window: int) -> list[float]:
        """Images/s of each window of ``window`` steps after the first ``warmup`` steps."""
        times = self.times[warmup:]
        rates = [
            images_per_step * window / (times[i + window] - times[i]) for i in range(0, len(times) - window, window)
        ]
        if not rates:
            raise ValueError(f"too few steps ({len(self.times)}) for warm-up {warmup} and windows of {window}")
        return rates

    def summary(self, images_per_step: int, warmup: int, window: int) -> dict[str, float]:
        """Median images/s over the windows, and the slowest and fastest window (how noisy the machine is)."""
        rates = self.window_rates(images_per_step, warmup, window)
        return {"img_s": statistics.median(rates), "img_s_min": min(rates), "img_s_max": max(rates)}


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

    from pipeline.data import Split
    from pipeline.train import train_gan

    batch = cfg.train.batch_size
    one_step = load_config_from(cfg, [f"data.limit={batch}", "train.epochs=1", "eval.every_epochs=0"])
    fake = Split(torch.zeros(batch, 28, 28, dtype=torch.uint8), torch.zeros(batch, dtype=torch.long))
    with FlopCounterMode(display=False) as counter:
        train_gan(one_step, fake, log=lambda _: None)
    return counter.get_total_flops() / batch


def load_config_from(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    from pipeline.config import build_config, parse_override

    raw = cfg.to_dict()
    for text in overrides:
        (section, key), value = parse_override(text)
        raw[section][key] = value
    return build_config(raw)


def bench(
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    quick: bool = False,
    num_workers: int | None = None,
    rounds: int | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every measurement; return the results (the JSON that --out writes).

    The loops are timed in ``rounds`` interleaved rounds (Ray 1 worker, Ray N workers, the N workers without
    gradient sync, the plain loop): on a shared VM the same loop measured minutes apart can differ by 15%,
    so each ratio is taken within a round, from stages seconds apart, and the median over rounds reported.
    """
    import ray

    from pipeline import STARTED_AT
    from pipeline.data import load
    from pipeline.distributed import build_trainer, init_ray, prepare_inputs
    from pipeline.metrics import get_evaluator
    from pipeline.train import generate_images, train_gan

    command_started = STARTED_AT
    cpus = os.cpu_count() or 1
    workers_n = num_workers or cpus
    rounds = (1 if quick else 3) if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, not {rounds}")
    base = load_config(config or Path(__file__).resolve().parent.parent / "configs" / "mnist.yaml", overrides)
    batch = base.train.batch_size
    warmup, window, windows = (5, 10, 3) if quick else (10, 20, 5)
    steps = warmup + window * windows + 1
    cfg = load_config_from(base, [f"data.limit={steps * batch}", "train.epochs=1", "eval.every_epochs=0"])
    results: dict[str, Any] = {"config": cfg.to_dict(), "cpus": cpus, "quick": quick, "rounds": rounds}

    # From the command's start to Ray 1's first step (round 1) is what a user of `pipeline train` waits
    # (imports, checks, evaluator, Ray, worker group, data). Each worker times its own steps.
    evaluator = prepare_inputs(cfg, progress)
    # Bench runs are throw-away: kept apart from real runs unless train.storage_path says where.
    storage = base.train.storage_path or Path.home() / ".cache" / "gan-pipeline" / "bench"
    data = None  # loaded after round 1's Ray stages: start_to_first_step_s must not include it
    # rayn_nosync: the N workers again without DDP's gradient all-reduce (no longer data parallel, so only a
    # diagnostic): splits the N-worker shortfall into communication and the cost of splitting the batch.
    stages = (("ray1", 1, True), ("rayn", workers_n, True), ("rayn_nosync", workers_n, False))
    per_round: list[dict[str, Any]] = []
    for number in range(1, rounds + 1):
        measured: dict[str, Any] = {}
        init_ray()
        for label, workers, sync in stages:
            progress(
                f"[bench] round {number}/{rounds}: Ray Train, {workers} worker(s) x {max(1, cpus // workers)} CPU"
                + ("" if sync else ", gradients not synchronised (diagnostic)")
            )
            run_cfg = load_config_from(
                cfg,
                [
                    f"scaling.num_workers={workers}",
                    f"scaling.cpus_per_worker={max(1, cpus // workers)}",
                    f"train.storage_path={storage}",
                ],
            )
            name = f"bench-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
            trainer = build_trainer(
                run_cfg, name, evaluator=evaluator, bench={"warmup": warmup, "window": window, "no_sync": not sync}
            )
            metrics = trainer.fit().metrics
            measured.update({f"{label}_{k}": metrics[f"bench_{k}"] for k in ("img_s", "img_s_min", "img_s_max")})
            if label == "ray1" and number == 1:
                results["start_to_first_step_s"] = metrics["bench_first_step_time"] - command_started
        ray.shutdown()  # its daemons would share the CPUs with the plain loop

        progress(f"[bench] round {number}/{rounds}: plain loop, {steps} steps of batch {batch}, no Ray")
        torch.set_num_threads(cpus)
        if data is None:
            data = load(cfg.data, progress=progress)
        clock = StepClock()
        train_gan(cfg, data, on_step=clock, log=lambda _: None)
        measured.update({f"plain_{k}": v for k, v in clock.summary(batch, warmup, window).items()})
        measured["ray1_vs_plain"] = measured["ray1_img_s"] / measured["plain_img_s"]
        measured["rayn_vs_ray1"] = measured["rayn_img_s"] / measured["ray1_img_s"]
        measured["rayn_nosync_vs_ray1"] = measured["rayn_nosync_img_s"] / measured["ray1_img_s"]
        per_round.append(measured)
    results["per_round"] = per_round
    for label in ("plain", "ray1", "rayn", "rayn_nosync"):
        results[f"{label}_img_s"] = statistics.median(r[f"{label}_img_s"] for r in per_round)
        results[f"{label}_img_s_min"] = min(r[f"{label}_img_s_min"] for r in per_round)
        results[f"{label}_img_s_max"] = max(r[f"{label}_img_s_max"] for r in per_round)
    for ratio in ("ray1_vs_plain", "rayn_vs_ray1", "rayn_nosync_vs_ray1"):
        results[ratio] = statistics.median(r[ratio] for r in per_round)
    results["num_workers_n"] = workers_n

    progress(f"[bench] matmul peak ({cpus} threads)")
    results.update(matmul_peak_gflops(cpus))
    results["flops_per_img"] = flops_per_image(cfg)

    # evaluation of 10,000 samples, as training does it (generate + evaluator features + FID/IS)
    progress("[bench] evaluation of 10,000 samples")
    torch.set_num_threads(cpus)
    generator = train_gan(load_config_from(cfg, [f"data.limit={batch}"]), data, log=lambda _: None).generator
    evaluator_model = get_evaluator(cfg.data, progress)
    started = time.perf_counter()
    evaluator_model.score(generate_images(generator, 10_000, cfg.model.latent_dim, 0, torch.device("cpu")))
    results["eval_s_per_10k"] = time.perf_counter() - started

    results["epoch_s"] = 60_000 / results["rayn_img_s"]
    achieved = results["plain_img_s"] * results["flops_per_img"] / 1e9
    results["achieved_gflops"] = achieved
    results["fraction_of_peak"] = achieved / results["peak_gflops"]
    results["fraction_of_mm_peak"] = achieved / results["peak_mm_gflops"]
    results["ray1_fraction_of_peak"] = results["ray1_img_s"] * results["flops_per_img"] / 1e9 / results["peak_gflops"]
    results["eval_fraction_of_epoch"] = results["eval_s_per_10k"] / results["epoch_s"]
    return results


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
    lines = [
        f"| measurement | value (median of {r['rounds']} round(s); slowest-fastest window) | relation (median of "
        "the rounds' own ratios) |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(results, indent=2, default=str))
