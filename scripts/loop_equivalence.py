"""Does a change leave the training loop's numbers alone? Runs the same scenarios with this checkout's pipeline
and another's (a `git worktree` of an earlier commit) and compares every report: its metrics (timings aside) and
its checkpoint (weights, optimizer states, RNG state), bit for bit.

    git worktree add /tmp/before 1d135d6
    python scripts/loop_equivalence.py --other /tmp/before

Scenarios on 256 MNIST images: smoke 2 epochs; every loop switch (dropout, EMA, lr decay, top-k, label
smoothing, reused fakes); reports inside epochs and a resume from one; an elastic pause and its resume; and
configs/local.yaml (spectral norm, EMA, bf16 where the CPU has it) on 1,024. Torch runs on one thread in both, so
only the code differs.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = ("train_s", "epoch_time_s", "images_per_s", "elapsed_s", "eval_time_s")
SWITCHES = [
    "train.epochs=2",
    "model.d_dropout=0.2",
    "train.ema_decay=0.9",
    "optim.lr_final_scale=0.5",
    "train.top_k_final=0.5",
    "train.real_label=0.9",
    "train.g_fresh_noise=false",
]


def loop_under_test():
    """(load_config, load, run) of the pipeline first on sys.path, whichever layout its checkout has: packages
    (pipeline.gan.loop with a list of hooks), flat modules with LoopHooks, or flat modules before the typed reports.
    ``run(cfg, data, resume, resize)`` returns every report as (metrics, checkpoint)."""
    try:
        from pipeline.config.load import load_config
        from pipeline.data.kinds import load
        from pipeline.gan.hooks import On
        from pipeline.gan.loop import train_gan
    except ImportError:
        return flat_loop()

    def run(cfg, data, resume=None, resize=None):
        reports: list = []
        keep = On(report=lambda r: reports.append((dict(r.metrics), copy.deepcopy(r.checkpoint))), resize_to=resize)
        train_gan(cfg, data, hooks=[keep], resume=resume)
        return reports

    return load_config, load, run


def flat_loop():
    """The loop of a checkout before the packages (pipeline.train)."""
    import pipeline.train as loop

    from pipeline.config import load_config
    from pipeline.data import load

    hooked = "hooks" in inspect.signature(loop.train_gan).parameters  # the loop's API since the typed reports

    def run(cfg, data, resume=None, resize=None):
        reports: list = []
        if hooked:
            keep = lambda r: reports.append((dict(r.metrics), copy.deepcopy(r.checkpoint)))  # noqa: E731
            hooks = loop.LoopHooks(report=keep, log=lambda _: None, resize=resize)
            loop.train_gan(cfg, data, hooks=hooks, resume=resume)
        else:
            keep = lambda m, s: reports.append((dict(m), copy.deepcopy(s)))  # noqa: E731
            loop.train_gan(cfg, data, report=keep, log=lambda _: None, resume=resume, resize=resize)
        return reports

    return load_config, load, run


def scenarios(out: str) -> None:
    """Run in a child process, with the pipeline under test first on sys.path: every scenario's reports to ``out``."""
    import torch

    load_config, load, run = loop_under_test()
    torch.set_num_threads(1)
    smoke, local = ROOT / "configs" / "smoke.yaml", ROOT / "configs" / "local.yaml"
    fake = load(load_config(smoke, ["data.limit=256"]).data)  # 256 MNIST images: 4 steps of 64 an epoch
    found = {"plain": run(load_config(smoke, ["train.epochs=2"]), fake)}
    found["switches"] = run(load_config(smoke, SWITCHES), fake)
    inside = load_config(smoke, ["train.epochs=2", "tune.report_every_steps=3"])
    found["inside an epoch"] = run(inside, fake)
    found["resumed inside"] = run(inside, fake, resume=found["inside an epoch"][0][1])
    elastic = load_config(None, ["train.batch_size=64", "train.epochs=3", "model.g_channels=8", "model.d_channels=8"])
    found["elastic pause"] = run(elastic, fake, resize=lambda step, left: 2 if step == 6 else None)
    found["resumed from pause"] = run(elastic, fake, resume=found["elastic pause"][-1][1])
    real = load(load_config(local, ["data.limit=1024"]).data)
    found["local.yaml"] = run(load_config(local, ["data.limit=1024", "train.epochs=2", "eval.every_epochs=0"]), real)
    torch.save(found, out)


def differences(a, b, path: str) -> list[str]:
    """Where ``a`` and ``b`` differ, bit for bit (timings aside)."""
    import torch

    if isinstance(a, torch.Tensor):
        return [] if torch.equal(a, b) else [path]
    if isinstance(a, dict):
        # A config key one checkout does not have yet is a new setting at its default, not a difference.
        found = [] if ".config" in path else [f"{path}.{k} (only one side)" for k in set(a) ^ set(b)]
        return found + [d for k in set(a) & set(b) for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return [f"{path} ({len(a)} vs {len(b)} items)"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b or path.endswith(TIMINGS) else [path]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="a checkout (e.g. a git worktree) of the pipeline to compare")
    parser.add_argument("--scenarios", help=argparse.SUPPRESS)  # the child process's job: write its reports here
    args = parser.parse_args()
    if args.scenarios:
        scenarios(args.scenarios)
        return 0
    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, tree in (("other", Path(args.other).resolve()), ("this", ROOT)):
            out = os.path.join(tmp, f"{label}.pt")
            env = {**os.environ, "PYTHONPATH": str(tree)}
            subprocess.run([sys.executable, __file__, "--other", args.other, "--scenarios", out], env=env, check=True)
            results[label] = torch.load(out, weights_only=True)
    print("| scenario | reports | differences (bit for bit; timings aside) |\n|---|---|---|")
    for name, reports in results["this"].items():
        found = differences(results["other"][name], reports, "")
        print(f"| {name} | {len(reports)} | {', '.join(found) or 'none'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
