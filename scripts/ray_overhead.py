"""Ray Train's overhead on one worker, measured so that drift cannot pass for it: the plain loop and Ray Train with
one worker holding every CPU, each in a fresh process, in K rounds whose order alternates (Ray first, then plain
first, ...), each round's ratio taken from stages seconds apart; the median and the spread of the ratios. And where
Ray's share went: the CPUs Ray's own processes (GCS, dashboard, agents, the Train controller and its helper
actors) and this driver kept busy while the worker's timed windows ran, each process apart. Prints tables.

    python scripts/ray_overhead.py                   # 6 rounds of configs/mnist.yaml
    python scripts/ray_overhead.py --rounds 8 --set train.batch_size=64

The timed windows are `pipeline bench`'s (pipeline.tools.bench): images/s is the median of 5 windows of 20 steps
after 10 steps of warm-up, on real MNIST batches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def ray_processes() -> dict[int, tuple[str, Any]]:
    """Ray's processes of this session other than the training worker, and this driver: pid -> (a name: the
    process title's first word or its script, the same however Ray retitles it, psutil.Process)."""
    import psutil

    me = psutil.Process()
    found = {me.pid: ("this driver", me)}
    for child in me.children(recursive=True):
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "RayTrainWorker" in line or "RayTrainWorker" in child.name():
            continue
        parts = line.split()
        script = [part.rsplit("/", 1)[-1] for part in parts if part.endswith(".py")]
        title = parts[0].split(".")[0] if parts and parts[0].startswith("ray::") else None
        found[child.pid] = (title or (script[0] if script else child.name()), child)
    return found


class Sampler:
    """Every ``every`` seconds, the CPU-seconds so far of each of Ray's other processes, by pid (a thread). Its
    own CPU time is kept apart, and taken off the driver's: sampling is this script's cost, not Ray's."""

    def __init__(self, every: float = 1.0):
        import threading

        self.samples: list[tuple[float, dict[int, float], float]] = []
        self.names: dict[int, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(every,), daemon=True)
        self.thread.start()

    def run(self, every: float) -> None:
        import psutil

        while not self.stop.is_set():
            now, seconds = time.time(), {}
            for pid, (name, process) in ray_processes().items():
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                seconds[pid] = times.user + times.system
                self.names.setdefault(pid, name)
            self.samples.append((now, seconds, time.thread_time()))
            self.stop.wait(every)

    def busy(self, start: float, end: float) -> dict[str, float]:
        """The CPUs each of Ray's processes kept busy between the samples nearest ``start`` and ``end`` (a process
        that started in between counts from 0; one that ended in between is missed), summed by name."""
        self.stop.set()
        self.thread.join()
        first = min(self.samples, key=lambda s: abs(s[0] - start))
        last = min(self.samples, key=lambda s: abs(s[0] - end))
        span = max(last[0] - first[0], 1e-9)
        by_name: dict[str, float] = {}
        for pid, seconds in last[1].items():
            used = seconds - first[1].get(pid, 0.0)
            if pid == os.getpid():
                used -= last[2] - first[2]  # the sampler's own thread
            by_name[self.names[pid]] = by_name.get(self.names[pid], 0.0) + used / span
        return by_name


def ray_stage(run: Any) -> dict[str, Any]:
    """Ray Train with one worker: its images/s (the windows), and the CPUs Ray's other processes kept busy while
    the worker's timed windows ran."""
    import ray

    from pipeline.config.load import with_overrides
    from pipeline.data.kinds import source_of
    from pipeline.distributed.ray_runtime import init_ray
    from pipeline.distributed.resources import resolve_scaling
    from pipeline.distributed.train_run import build_trainer
    from pipeline.distributed.worker import WorkerJob
    from pipeline.tools.bench import StepTiming

    init_ray()
    cfg = resolve_scaling(with_overrides(run.cfg, {"scaling.num_workers": 1, "scaling.cpus_per_worker": None}))
    timing = StepTiming(cfg.train.batch_size, warmup=run.warmup, window=run.window)
    job = WorkerJob(cfg, source_of(cfg.data), hooks=(timing,))
    trainer = build_trainer(job, f"overhead-{time.strftime('%Y%m%d-%H%M%S')}")
    sampler = Sampler()
    metrics = trainer.fit().metrics
    busy = sampler.busy(metrics["bench_timed_from"], metrics["bench_timed_to"])
    ray.shutdown()  # its daemons would share the CPUs with the plain loop
    return {"ray1_img_s": metrics["bench_img_s"], "ray_others_cpu": sum(busy.values()), "busy": busy}


def plain_stage(overrides: list[str]) -> dict[str, float]:
    """The plain loop in a fresh process of its own (as a user runs it without Ray; not in this driver, which has
    held a Ray session): its images/s over the same windows."""
    import json
    import subprocess

    code = (
        "import json, os, sys, torch; sys.path.insert(0, sys.argv[1]);"
        "from pipeline.data.kinds import source_of; from pipeline.tools.bench import BenchOptions, plain_loop, plan;"
        "run = plan(BenchOptions(overrides=tuple(json.loads(sys.argv[2]))));"
        "torch.set_num_threads(os.cpu_count() or 1);"
        "data = source_of(run.cfg.data).load(progress=lambda _: None);"
        "print(json.dumps(plain_loop(run, data)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(REPO), json.dumps(overrides)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds, each both loops (default 6)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a config override")
    args = parser.parse_args()

    from pipeline.tools.bench import BenchOptions, plan

    if args.rounds < 2 or args.rounds % 2:
        raise SystemExit(f"--rounds {args.rounds}: give an even number, so that each order runs as often")
    os.environ["RAY_ADDRESS"] = ""  # a local Ray of this machine's CPUs, as the plain loop has
    run = plan(BenchOptions(overrides=tuple(args.overrides), rounds=args.rounds))
    cpus = os.cpu_count() or 1
    rows = []
    for number in range(1, args.rounds + 1):
        order = ("ray", "plain") if number % 2 else ("plain", "ray")
        measured: dict[str, Any] = {}
        for stage in order:
            print(f"[overhead] round {number}/{args.rounds}: {stage}", flush=True)
            if stage == "plain":
                measured.update(plain_stage(args.overrides))
            else:
                measured.update(ray_stage(run))
        measured["ratio"] = measured["ray1_img_s"] / measured["plain_img_s"]
        rows.append((order[0], measured))
    print(f"\nbatch {run.cfg.train.batch_size}, {cpus} CPUs\n")
    print("| round | first | plain img/s | Ray 1 worker img/s | Ray/plain | Ray's other processes, CPUs busy |")
    print("|---|---|---|---|---|---|")
    for number, (first, m) in enumerate(rows, 1):
        print(
            f"| {number} | {first} | {m['plain_img_s']:.0f} | {m['ray1_img_s']:.0f} | {m['ratio']:.3f} | "
            f"{m['ray_others_cpu']:.3f} |"
        )
    names: dict[str, list[float]] = {}
    for _, m in rows:
        for name, cpus_busy in m["busy"].items():
            names.setdefault(name, []).append(cpus_busy)
    print("\n| Ray's process (while the worker's windows ran) | CPUs busy, median over rounds |\n|---|---|")
    for name, values in sorted(names.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"| {name} | {statistics.median(values):.3f} |")
    ratios = [m["ratio"] for _, m in rows]
    others = [m["ray_others_cpu"] for _, m in rows]
    print(
        f"\nRay/plain: median {statistics.median(ratios):.3f}, spread {min(ratios):.3f}-{max(ratios):.3f} over "
        f"{len(ratios)} rounds; Ray's other processes kept a median {statistics.median(others):.3f} CPUs busy "
        f"({statistics.median(others) / cpus:.1%} of the machine)"
    )


if __name__ == "__main__":
    main()
