"""A sweep under faults, on this machine with nothing faked: a local 2-node Ray cluster (a head and a worker node of
1 CPU each, token authentication on), checkpoints on an S3 endpoint (moto's server), a team MLflow server proxying
its artifacts into the bucket; a sweep of N trials of 2 workers each (one trial at a time: 2 CPUs). While it runs,
every 30-60 s a fault: a Train worker killed, the worker node killed (a fresh one joins), the MLflow server restarted
(once), the S3 endpoint paused for 15 s (once). It ends with a table: faults injected, trials finished, MLflow runs
complete, steps missing or duplicated (both must be 0), champion registered; exit 0 only if all hold.

    python scripts/chaos.py                 # 4 trials, faults every 30-60 s (about 10 minutes here)
    python scripts/chaos.py --short         # 2 trials, faults every 15-25 s (CI: tests/test_chaos.py)

Everything it starts runs on 127.0.0.1 in process groups of its own, stopped by their ids at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.servers import MLflowServer, RayCluster, S3Server  # noqa: E402
from tests.test_multinode import Driver, node_data_root  # noqa: E402

BUCKET = "gan-chaos"
NO_IMDS = {"AWS_EC2_METADATA_DISABLED": "true"}
LEARNING_RATES = ["1.0e-4", "2.0e-4", "4.0e-4", "8.0e-4"]


@dataclass
class Chaos:
    """The cluster and its servers, and the faults done to them."""

    cluster: RayCluster
    mlflow: MLflowServer
    s3: S3Server
    node_env: dict[str, str]
    rng: random.Random
    injected: list[tuple[float, str, str]] = field(default_factory=list)  # (when, kind, what)
    started: float = field(default_factory=time.monotonic)

    def note(self, kind: str, what: str) -> None:
        self.injected.append((time.monotonic() - self.started, kind, what))
        print(f"[chaos] {time.monotonic() - self.started:6.0f} s  {kind}: {what}", flush=True)

    def kill_worker(self, wait_s: float = 60) -> bool:
        """SIGKILL one of the cluster's Ray Train workers (any rank), as an OOM kill would; waits up to ``wait_s`` for
        one to be running (a trial starting)."""
        import psutil

        deadline = time.monotonic() + wait_s
        while True:
            workers = [
                proc
                for node in self.cluster.nodes
                if psutil.pid_exists(node.pid)
                for proc in psutil.Process(node.pid).children(recursive=True)
                if "RayTrainWorker" in " ".join(_title(proc))
            ]
            if workers or time.monotonic() > deadline:
                break
            time.sleep(1)
        if not workers:
            return False
        victim = self.rng.choice(workers)
        with contextlib.suppress(psutil.Error):
            victim.kill()
        self.note("worker", f"SIGKILL to Train worker pid {victim.pid}")
        return True

    def kill_node(self) -> None:
        """The worker node's raylet and every process under it, gone at once; a fresh node joins."""
        node = self.cluster.nodes[-1]
        self.cluster.kill_node(node)
        self.cluster.nodes.remove(node)
        self.note("node", f"worker node (process group {node.pid}) killed")
        self.cluster.wait_for_nodes(1, 120)
        self.cluster.add_node(num_cpus=1, env=self.node_env)
        self.cluster.wait_for_nodes(2, 120)
        self.note("node", "a fresh worker node joined")

    def restart_mlflow(self) -> None:
        self.mlflow.stop()
        self.note("mlflow", "server stopped")
        time.sleep(5)
        self.mlflow.start()
        self.note("mlflow", "server started again")

    def pause_s3(self, seconds: float = 15) -> None:
        os.killpg(self.s3.proc.pid, signal.SIGSTOP)
        self.note("s3", f"endpoint paused for {seconds:.0f} s")
        try:
            time.sleep(seconds)
        finally:
            os.killpg(self.s3.proc.pid, signal.SIGCONT)

    def run(self, every: tuple[float, float], done: threading.Event) -> None:
        """Faults until ``done``, one every ``every`` seconds: a worker killed, the MLflow restart, a node killed and
        the S3 pause first (each once), then worker and node kills at random."""
        plan = ["worker", "mlflow", "node", "s3"]
        while not done.wait(self.rng.uniform(*every)):
            kind = plan.pop(0) if plan else self.rng.choice(["worker", "worker", "node"])
            try:
                if kind == "worker" and not self.kill_worker():
                    self.note("skipped", "no Train worker running at this moment")
                elif kind == "node":
                    self.kill_node()
                elif kind == "mlflow":
                    self.restart_mlflow()
                elif kind == "s3":
                    self.pause_s3()
            except Exception as exc:  # noqa: BLE001 - a fault that could not be made is reported, not fatal
                self.note("error", f"{kind} fault failed: {exc}")


def _title(proc) -> list[str]:
    import psutil

    try:
        return [proc.name(), *proc.cmdline()]
    except psutil.Error:
        return []


def sweep_args(trials: int, epochs: int, limit: int) -> list[str]:
    grid = ", ".join(LEARNING_RATES[:trials])
    return [
        "tune",
        "-c",
        "configs/smoke.yaml",
        "--name",
        "chaos",
        "--set",
        f"data.limit={limit}",
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "eval.num_samples=1000",
        "--set",
        "scaling.num_workers=2",
        "--set",
        "scaling.cpus_per_worker=1",
        "--set",
        "train.max_failures=20",
        "--set",
        "scaling.resource_wait_s=300",
        "--set",
        f"train.storage_path=s3://{BUCKET}/runs",
        "--set",
        f"tune.search_space={{optim.lr_g: {{grid: [{grid}]}}}}",
        "--set",
        "tune.num_samples=1",
        "--set",
        f"tune.grace_period={epochs}",  # no early stop: every trial trains every epoch
    ]


def tally(uri: str, epochs: int, log_every: int, steps_per_epoch: int) -> dict[str, object]:
    """What the sweep left in MLflow: its trials' runs, their steps, the champion."""
    from pipeline.eval.metrics import FID
    from pipeline.tracking.registry import load_generator
    from pipeline.tracking.store import find_run
    from pipeline.tracking.tracker import tracker_for

    parent = tracker_for(uri, find_run(uri, "gan-pipeline", {"sweep": "chaos", "kind": "sweep"}))
    children = parent.children()
    expected = set(range(log_every, epochs * steps_per_epoch + 1, log_every))
    finished = complete = missing = duplicated = 0
    for child in children:
        run = tracker_for(uri, child.run_id)
        steps = [step for step, _ in run.metric_history("loss_d")]
        missing += len(expected - set(steps))
        duplicated += len(steps) - len(set(steps))
        finished += child.status == "FINISHED"
        scored = run.metric_history(FID.name)
        complete += child.status == "FINISHED" and len(scored) == epochs and "generator_model" in child.tags
    try:
        load_generator(uri, "models:/gan-mnist@champion")
        champion = True
    except Exception:  # noqa: BLE001 - no model or no alias: no champion
        champion = False
    return {
        "trials": len(children),
        "finished": finished,
        "complete": complete,
        "missing": missing,
        "duplicated": duplicated,
        "champion": champion or None,
    }


def report(chaos: Chaos, figures: dict[str, object], trials: int, code: int, took: float) -> bool:
    kinds: dict[str, int] = {}
    for _, kind, what in chaos.injected:
        if kind in ("worker", "s3") or what.endswith(("killed", "stopped")):
            kinds[kind] = kinds.get(kind, 0) + 1
    ok = (
        code == 0
        and figures["finished"] == trials
        and figures["complete"] == trials
        and figures["missing"] == 0
        and figures["duplicated"] == 0
        and figures["champion"] is not None
    )
    rows = [
        ("faults injected", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"),
        ("sweep exit code", code),
        ("trials finished", f"{figures['finished']} of {trials} (MLflow runs: {figures['trials']})"),
        ("MLflow runs complete", f"{figures['complete']} of {trials} (every epoch scored, generator logged)"),
        ("steps missing", figures["missing"]),
        ("steps duplicated", figures["duplicated"]),
        ("champion registered", "yes" if figures["champion"] else "no"),
        ("wall time", f"{took:.0f} s"),
        ("verdict", "PASS" if ok else "FAIL"),
    ]
    print("\n| | |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="2 trials, faults every 15-25 s (CI)")
    parser.add_argument("--trials", type=int, default=None, help="trials of the sweep (4; --short: 2)")
    parser.add_argument("--seed", type=int, default=0, help="the faults' random order and times")
    parser.add_argument("--out", default=None, help="where logs go (default: a new temporary directory)")
    args = parser.parse_args()
    trials = args.trials or (2 if args.short else 4)
    every = (15.0, 25.0) if args.short else (30.0, 60.0)
    epochs, limit, log_every, batch = 3, 4096, 2, 64
    out = Path(args.out or tempfile.mkdtemp(prefix="chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"[chaos] {trials} trial(s) of 2 workers, faults every {every[0]:.0f}-{every[1]:.0f} s; logs in {out}")

    s3 = S3Server(out)
    s3.make_bucket(BUCKET)
    tracking = cluster = None
    try:
        tracking = MLflowServer(out, f"s3://{BUCKET}/mlflow", env={**s3.env, **NO_IMDS})
        cluster = RayCluster(head_cpus=1, env={**s3.env, **NO_IMDS})
        node_env = {"PIPELINE_DATA_ROOT": str(node_data_root(out / "node-data"))}
        cluster.add_node(num_cpus=1, env=node_env)
        cluster.wait_for_nodes(2, 120)
        chaos = Chaos(cluster, tracking, s3, node_env, random.Random(args.seed))
        env = {**cluster.env, "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": tracking.uri}
        started = time.monotonic()
        driver = Driver(sweep_args(trials, epochs, limit), env)
        done = threading.Event()
        faults = threading.Thread(target=chaos.run, args=(every, done), daemon=True)
        faults.start()
        try:
            code, output = driver.finish(3600)
        finally:
            done.set()
            faults.join(timeout=300)
        took = time.monotonic() - started
        (out / "sweep.log").write_text(output)
        print(f"[chaos] sweep ended with exit code {code}; its output: {out / 'sweep.log'}")
        figures = tally(tracking.uri, epochs, log_every, limit // batch)
        return 0 if report(chaos, figures, trials, code, took) else 1
    finally:
        for server in (cluster, tracking, s3):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()


if __name__ == "__main__":
    sys.exit(main())
