"""Several trainings on one GPU: images/s per process and in total for 1, 2, 4 concurrent runs.

    python scripts/gpu_share.py [--counts 1,2,4] [--epochs 2] [--out gpu_share.json] [-- key=value ...]

What `scaling.gpus_per_worker` below 1 relies on: each trial of a sweep is its own process with its own CUDA
context, and a small, launch-bound model leaves most of the card idle, so several of them can share it. Each
count starts that many processes at once (plain `train_gan`, no Ray, no MLflow, so it runs on a bare GPU
box), each training `configs/tune_mnist.yaml`'s settings (override with `-- key=value`) for ``--epochs`` epochs;
the last epoch is timed. Prints a markdown table; --out writes JSON. `--allow-cpu` runs it on the CPU (to check
the script itself; on a CPU the processes compete for the same cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(args: argparse.Namespace) -> int:
    """The child: train once on the shared device, print one JSON line."""
    import torch

    from pipeline.config.load import load_config
    from pipeline.data.kinds import load
    from pipeline.gan.hooks import On
    from pipeline.gan.loop import train_gan
    from pipeline.gan.steps import Runtime

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "tune_mnist.yaml", [f"train.epochs={args.epochs}", *args.overrides])
    data = load(cfg.data)
    epochs: list[dict] = []
    train_gan(
        cfg,
        data,
        runtime=Runtime(device=device),
        hooks=[On(report=lambda r: epochs.append(dict(r.metrics)))],
    )
    print(json.dumps({"img_s": epochs[-1]["images_per_s"], "batch_size": cfg.train.batch_size}), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,2,4", help="concurrent processes to try, comma-separated")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per process; the last one is timed")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU if there is no GPU")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (after --)")
    args = parser.parse_args()
    if args.child:
        return one(args)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("error: no CUDA device; pass --allow-cpu to dry-run the script on the CPU", file=sys.stderr)
        return 2
    try:
        counts = [int(c) for c in args.counts.split(",")]
    except ValueError:
        print(f"error: --counts {args.counts!r}: expected numbers separated by commas, e.g. 1,2,4", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    report: dict = {"device": device, "torch": torch.__version__, "overrides": args.overrides, "rows": []}
    command = [sys.executable, __file__, "--child", "--epochs", str(args.epochs), "--", *args.overrides]
    for count in counts:
        started = time.perf_counter()
        children = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
            for _ in range(count)
        ]
        outputs = [child.communicate() for child in children]
        failed = [err for child, (_, err) in zip(children, outputs, strict=True) if child.returncode != 0]
        if failed:
            print(f"error: {len(failed)} of {count} processes failed:\n{failed[0][-2000:]}", file=sys.stderr)
            return 1
        each = [json.loads(out.strip().splitlines()[-1])["img_s"] for out, _ in outputs]
        wall = time.perf_counter() - started
        row = {"processes": count, "img_s_each": each, "img_s_total": sum(each), "wall_s": wall}
        report["rows"].append(row)
        spread = f"{min(each):,.0f}-{max(each):,.0f}"
        print(f"{count} process(es): {sum(each):,.0f} img/s in total, {spread} each", flush=True)

    single = report["rows"][0]["img_s_total"] / report["rows"][0]["processes"]
    print(f"\n| processes on one {'GPU' if cuda else 'CPU'} ({device}) | img/s each | img/s total | x one alone |")
    print("|---|---|---|---|")
    for row in report["rows"]:
        mean = row["img_s_total"] / row["processes"]
        print(f"| {row['processes']} | {mean:,.0f} | {row['img_s_total']:,.0f} | {row['img_s_total'] / single:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
