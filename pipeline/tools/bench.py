"""`python -m pipeline bench`: throughput of the training loop without Ray, under Ray Train with 1 and N
workers, against the machine's measured matmul peak; with ``--sweep`` also a small sweep, and where its
hardware's time went (pipeline.sweep.accounting). A script that prints a table, not a test.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import PROJECT_ROOT
from pipeline.config.load import load_config, with_overrides
from pipeline.config.schema import PipelineConfig
from pipeline.data.kinds import source_of
from pipeline.data.split import Split
from pipeline.distributed.prepare import prepare_inputs
from pipeline.distributed.ray_runtime import init_ray
from pipeline.distributed.resources import resolve_scaling
from pipeline.distributed.train_run import build_trainer
from pipeline.distributed.worker import WorkerJob
from pipeline.eval.evaluator import get_evaluator
from pipeline.gan.hooks import Hook, Step
from pipeline.gan.loop import train_gan
from pipeline.gan.sampling import generate_images


def quiet(_: str) -> None:
    return None


class StepClock(Hook):
    """A loop hook: the wall-clock time of every optimizer step; throughput = median over windows after warm-up."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, step: Step) -> None:
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


@dataclass
class StepTiming(Hook):
    """A hook every worker of a run gets (WorkerJob.hooks): it times its own steps and reports ``bench_*`` figures
    with its results."""

    batch_size: int
    warmup: int  # steps left out of the timing
    window: int  # steps per timed window
    clock: StepClock = field(default_factory=StepClock)

    def on_step(self, step: Step) -> None:
        self.clock.on_step(step)

    def figures(self) -> dict[str, float]:
        summary = self.clock.summary(self.batch_size, self.warmup, self.window)
        timed = {"bench_first_step_time": self.clock.times[0], "bench_timed_from": self.clock.times[self.warmup]}
        return {**{f"bench_{k}": v for k, v in summary.items()}, **timed, "bench_timed_to": self.clock.times[-1]}


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

    batch, shape = cfg.train.batch_size, source_of(cfg.data).image_shape
    one_step = with_overrides(cfg, {"data.limit": batch, "train.epochs": 1, "eval.every_epochs": 0})
    fake = Split(torch.zeros(batch, *shape, dtype=torch.uint8), torch.zeros(batch, dtype=torch.long))
    with FlopCounterMode(display=False) as counter:
        train_gan(one_step, fake)
    return counter.get_total_flops() / batch


# rayn_nosync: the N workers again without DDP's gradient all-reduce (no longer data parallel, so only a
# diagnostic): splits the N-worker shortfall into communication and the cost of splitting the batch.
LOOPS = ("plain", "ray1", "rayn", "rayn_nosync")
RATIOS = {
    "ray1_vs_plain": ("ray1", "plain"),
    "rayn_vs_ray1": ("rayn", "ray1"),
    "rayn_nosync_vs_ray1": ("rayn_nosync", "ray1"),
}


@dataclass(frozen=True)
class BenchOptions:
    """What `pipeline bench` measures: the config (default configs/mnist.yaml) and overrides, a shorter ``quick``
    run, N for the N-worker run (default: the CPUs), the interleaved ``rounds`` (default 3, quick 1), a sweep."""

    config: str | None = None
    overrides: tuple[str, ...] = ()
    quick: bool = False
    num_workers: int | None = None
    rounds: int | None = None
    sweep: bool = False


@dataclass(frozen=True)
class Plan:
    """The timed runs: each loop's config, steps and windows, and N."""

    cfg: PipelineConfig
    rounds: int
    workers_n: int
    warmup: int  # steps left out of the timing
    window: int  # steps per timed window
    steps: int


def plan(options: BenchOptions) -> Plan:
    """The runs ``options`` ask for: enough steps of the config's batch for the windows, one epoch, no scoring,
    in throw-away storage (kept apart from real runs unless train.storage_path says where)."""
    rounds = (1 if options.quick else 3) if options.rounds is None else options.rounds
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, not {rounds}")
    default = Path(PROJECT_ROOT) / "configs" / "mnist.yaml"
    base = load_config(options.config or default, options.overrides)
    warmup, window, windows = (5, 10, 3) if options.quick else (10, 20, 5)
    steps = warmup + window * windows + 1
    storage = str(base.train.storage_path or Path.home() / ".cache" / "gan-pipeline" / "bench")
    overrides = {"train.epochs": 1, "eval.every_epochs": 0, "train.storage_path": storage}
    cfg = with_overrides(base, {"data.limit": steps * base.train.batch_size, **overrides})
    return Plan(cfg, rounds, options.num_workers or os.cpu_count() or 1, warmup, window, steps)


def bench(options: BenchOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement; return the results (the JSON that --out writes).

    The loops are timed in ``rounds`` interleaved rounds (Ray 1 worker, Ray N workers, the N workers without
    gradient sync, the plain loop): on a shared VM the same loop measured minutes apart can differ by 15%,
    so each ratio is taken within a round, from stages seconds apart, and the median over rounds reported.
    """
    run = plan(options)
    cpus = os.cpu_count() or 1
    results: dict[str, Any] = {
        "config": run.cfg.to_record(),
        "cpus": cpus,
        "quick": options.quick,
        "rounds": run.rounds,
    }
    # From the command's start to Ray 1's first step (round 1) is what a user of `pipeline train` waits
    # (imports, checks, evaluator, Ray, worker group, data). Each worker times its own steps.
    evaluator = prepare_inputs(run.cfg, progress)
    data = None  # loaded after round 1's Ray stages: start_to_first_step_s must not include it
    per_round: list[dict[str, Any]] = []
    for number in range(1, run.rounds + 1):
        measured = ray_round(run, number, evaluator, progress)
        first_step = measured.pop("first_step_time")
        if number == 1:
            results["start_to_first_step_s"] = first_step
        progress(
            f"[bench] round {number}/{run.rounds}: plain loop, {run.steps} steps of batch "
            f"{run.cfg.train.batch_size}, no Ray"
        )
        torch.set_num_threads(cpus)
        if data is None:
            data = source_of(run.cfg.data).load(progress=progress)
        measured.update(plain_loop(run, data))
        measured.update({ratio: measured[f"{a}_img_s"] / measured[f"{b}_img_s"] for ratio, (a, b) in RATIOS.items()})
        per_round.append(measured)
    results.update(per_round=per_round, num_workers_n=run.workers_n, **medians(per_round))
    results.update(peaks_and_evaluation(run.cfg, data, cpus, progress))
    results.update(derived(results, run.cfg))
    if options.sweep:
        results.update(sweep_stage(run.cfg, options.quick, progress))
    return results


def ray_round(run: Plan, number: int, evaluator: Any, progress: Callable[[str], None]) -> dict[str, Any]:
    """One round of the Ray Train runs (1 worker, N workers, N without gradient sync): each one's images/s, and
    when Ray 1's first step came (since this command began)."""
    import ray

    from pipeline import STARTED_AT

    measured: dict[str, Any] = {}
    init_ray()
    for label, workers, sync in (
        ("ray1", 1, True),
        ("rayn", run.workers_n, True),
        ("rayn_nosync", run.workers_n, False),
    ):
        run_cfg = resolve_scaling(
            with_overrides(run.cfg, {"scaling.num_workers": workers, "scaling.cpus_per_worker": None})
        )
        progress(
            f"[bench] round {number}/{run.rounds}: Ray Train, {workers} worker(s) x {run_cfg.scaling.cpus_per_worker} "
            "CPU" + ("" if sync else ", gradients not synchronised (diagnostic)")
        )
        timing = StepTiming(run.cfg.train.batch_size, warmup=run.warmup, window=run.window)
        name = f"bench-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        job = WorkerJob(run_cfg, source_of(run_cfg.data), evaluator=evaluator, hooks=(timing,), sync_gradients=sync)
        metrics = build_trainer(job, name).fit().metrics
        measured.update({f"{label}_{k}": metrics[f"bench_{k}"] for k in ("img_s", "img_s_min", "img_s_max")})
        if label == "ray1":
            measured["first_step_time"] = metrics["bench_first_step_time"] - STARTED_AT
    ray.shutdown()  # its daemons would share the CPUs with the plain loop
    return measured


def plain_loop(run: Plan, data: Split) -> dict[str, float]:
    """The loop without Ray: images/s over the same windows."""
    clock = StepClock()
    train_gan(run.cfg, data, hooks=[clock])
    return {f"plain_{k}": v for k, v in clock.summary(run.cfg.train.batch_size, run.warmup, run.window).items()}


def peaks_and_evaluation(cfg: PipelineConfig, data: Split, cpus: int, progress: Callable[[str], None]) -> dict:
    """The machine's matmul peak, the model's FLOPs per image and the seconds to score 10,000 samples."""
    progress(f"[bench] matmul peak ({cpus} threads)")
    results: dict[str, Any] = matmul_peak_gflops(cpus)
    results["flops_per_img"] = flops_per_image(cfg)
    progress("[bench] evaluation of 10,000 samples")
    results["eval_s_per_10k"] = evaluation_seconds(cfg, data, cpus, progress)
    return results


def derived(r: dict[str, Any], cfg: PipelineConfig) -> dict[str, float]:
    """What the measurements mean together: an epoch's seconds, achieved GFLOP/s and shares of the peak."""
    source = source_of(cfg.data)
    train_images = source.known_count() or source.prepare(quiet)
    epoch_s = train_images / r["rayn_img_s"]
    achieved = r["plain_img_s"] * r["flops_per_img"] / 1e9
    return {
        "train_images": train_images,
        "epoch_s": epoch_s,
        "achieved_gflops": achieved,
        "fraction_of_peak": achieved / r["peak_gflops"],
        "fraction_of_mm_peak": achieved / r["peak_mm_gflops"],
        "ray1_fraction_of_peak": r["ray1_img_s"] * r["flops_per_img"] / 1e9 / r["peak_gflops"],
        "eval_fraction_of_epoch": r["eval_s_per_10k"] / epoch_s,
    }


def sweep_stage(cfg: PipelineConfig, quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """A sweep as `tune` runs one (one-worker trials, each trained in its own process; MLflow child runs; no
    early stopping), two trials per CPU (one with ``quick``), each one 1-CPU worker for one epoch of the
    bench's images: its
    busy_fraction, trial start-to-first-step, evaluation and checkpoint seconds (``sweep_*`` keys)."""
    import ray

    from pipeline.sweep.tune import run_sweep

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
    generator = train_gan(with_overrides(cfg, {"data.limit": cfg.train.batch_size}), data).generator
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
        (f"epoch of {r['train_images']:,} images (N workers)", f"{r['epoch_s']:.0f} s", ""),
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
