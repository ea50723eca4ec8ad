"""Equal-compute comparison of sweep methods (docs/sweeps.md, "Population based training"): random search + ASHA,
Optuna + ASHA and PBT on the same config, one after another on this machine, each in its own MLflow store.

    python scripts/compare_schedulers.py [--config configs/pbt_local.yaml] [--seeds 0 1] [--out results/compare]
                                         [--asha-samples N] [--methods pbt random+asha ...] [-- key=value ...]

PBT runs the config's population for all its epochs. ASHA stops weak trials early, so at the same number of
trials it trains far fewer images; `--asha-samples` (default: chosen so that ASHA's expected images trained
equal PBT's, from its rungs) gives it more trials instead. Prints one markdown row per run as it ends, then
the table: images actually trained (the sum over each trial's own steps), wall time, best FID and IS,
exploits. Each run's console is kept in <out>/<method>-s<seed>/tune.log; `mlflow ui --backend-store-uri
sqlite:///<out>/<method>-s<seed>/mlflow.db` shows it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config.load import load_config  # noqa: E402
from pipeline.eval.metrics import FID, INCEPTION_SCORE  # noqa: E402
from pipeline.tracking.store import find_run  # noqa: E402
from pipeline.tracking.tracker import MLflowTracker, tracker_for  # noqa: E402

METHODS = {
    "random+asha": ["tune.scheduler=asha", "tune.search_alg=random"],
    "optuna+asha": ["tune.scheduler=asha", "tune.search_alg=optuna"],
    "pbt": ["tune.scheduler=pbt", "tune.search_alg=random"],
}


def asha_epochs_per_trial(epochs: int, grace: int, factor: int) -> float:
    """Expected epochs an ASHA trial trains: all reach the grace period, 1/factor of those each next rung."""
    rungs = []
    rung = grace
    while rung < epochs:
        rungs.append(rung)
        rung *= factor
    total, survivors, previous = 0.0, 1.0, 0
    for rung in [*rungs, epochs]:
        total += survivors * (rung - previous)
        survivors /= factor
        previous = rung
    return total


def equal_compute_samples(cfg) -> int:
    per_trial = asha_epochs_per_trial(cfg.train.epochs, cfg.tune.grace_period, cfg.tune.reduction_factor)
    return max(cfg.tune.num_samples, math.ceil(cfg.tune.num_samples * cfg.train.epochs / per_trial))


def summary(cfg, row: dict, name: str, uri: str) -> dict:
    """``row`` (method, seed, exit code, wall seconds) with what the sweep ``name`` recorded in MLflow."""
    parent_id = find_run(uri, cfg.tracking.experiment, {"kind": "sweep", "sweep": name})
    if parent_id is None:
        return {**row, "trials": 0, "images_trained": 0, "best_fid": None, "best_is": None, "exploits": None}
    parent = tracker_for(uri, parent_id)

    def last(run: MLflowTracker, key: str) -> float | None:
        history = run.metric_history(key)
        return max(history)[1] if history else None

    # A trial's steps are continuous in its one child run, also across PBT copies (a copy continues the donor's
    # step count, which synchronous PBT keeps equal to its own): its last reported step is what it trained.
    children = [tracker_for(uri, child.run_id) for child in parent.children()]
    steps = [max((step for step, _ in child.metric_history(FID.name)), default=0) for child in children]
    return {
        **row,
        "trials": len(steps),
        "images_trained": sum(steps) * cfg.train.batch_size,
        "best_fid": last(parent, f"best_{FID.name}"),
        "best_is": last(parent, f"best_{INCEPTION_SCORE.name}"),
        "exploits": last(parent, "pbt_exploits"),
    }


def markdown(rows: list[dict]) -> str:
    def num(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| method | seed | trials | images trained | wall | best FID | best IS | exploits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        failed = "" if r["exit"] == 0 else f" (exit {r['exit']})"
        lines.append(
            f"| {r['method']}{failed} | {r['seed']} | {r['trials']} | {r['images_trained']:,} | {r['wall_s']} s | "
            f"{num(r['best_fid'], 2)} | {num(r['best_is'], 3)} | {num(r['exploits'], 0)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/pbt_local.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--asha-samples", type=int, help="trials for the ASHA methods (default: equal compute)")
    parser.add_argument("--out", default="results/compare")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for every method (after --)")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)  # bad keys fail here, before any sweep starts
    asha_samples = args.asha_samples or equal_compute_samples(cfg)
    out_root = Path(args.out)
    runs = [(seed, method) for seed in args.seeds for method in args.methods]
    for seed, method in runs:
        if (out_root / f"{method}-s{seed}").exists():
            raise SystemExit(f"error: {out_root / f'{method}-s{seed}'} exists; remove it or pass another --out")
    print(
        f"[compare] {args.config}: PBT {cfg.tune.num_samples} trials, ASHA {asha_samples} trials, "
        f"{cfg.train.epochs} epochs at most each; {len(runs)} sweeps, one after another",
        flush=True,
    )

    rows = []
    for seed, method in runs:
        name = f"{method.replace('+', '-')}-s{seed}"
        out = (out_root / f"{method}-s{seed}").resolve()
        out.mkdir(parents=True)
        uri = f"sqlite:///{out / 'mlflow.db'}"
        sets = [
            *METHODS[method],
            *args.overrides,
            f"train.seed={seed}",
            f"train.storage_path={out / 'runs'}",
            f"tracking.uri={uri}",
        ]
        if method.endswith("asha"):
            sets.append(f"tune.num_samples={asha_samples}")
        cmd = [sys.executable, "-m", "pipeline", "tune", "-c", args.config, "--name", name]
        for item in sets:
            cmd += ["--set", item]
        print(f"[compare] {name}: {' '.join(cmd[1:])}  (console: {out / 'tune.log'})", flush=True)
        started = time.monotonic()
        with open(out / "tune.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        row = {"method": method, "seed": seed, "exit": code, "wall_s": round(time.monotonic() - started)}
        rows.append(summary(load_config(args.config, sets), row, name, uri))
        print(f"[compare] {json.dumps(rows[-1])}", flush=True)
    print(markdown(rows))
    (out_root / "table.md").write_text(markdown(rows) + "\n")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
