"""Quality curve of one config on one device: FID and IS per epoch with wall time, no Ray or MLflow.

    python scripts/gpu_curve.py -c configs/mnist_fast.yaml [--set train.epochs=32 ...] [--out curve.json]

What `python -m pipeline train` logs per epoch, from the same `train_gan` and the same cached evaluator
(`PIPELINE_DATA_ROOT` must hold MNIST and, to skip training one, `evaluators/mnist`), on a GPU when there
is one. It answers "how far does this config get with more compute than the 2-core CPU gives in 30
minutes" on a borrowed GPU machine, which has neither Ray nor MLflow. `--out` is rewritten after every
epoch, so a run stopped by a time limit still leaves its curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config.load import load_config  # noqa: E402
from pipeline.data.kinds import load  # noqa: E402
from pipeline.eval.evaluator import get_evaluator  # noqa: E402
from pipeline.eval.metrics import CHAMPION_METRIC, METRICS, scores_line  # noqa: E402
from pipeline.eval.scoring import Scorer  # noqa: E402
from pipeline.gan.hooks import On  # noqa: E402
from pipeline.gan.loop import train_gan  # noqa: E402
from pipeline.gan.reports import Report  # noqa: E402
from pipeline.gan.steps import Runtime  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="YAML config, e.g. configs/mnist_fast.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--out", help="write the curve as JSON here (rewritten every epoch)")
    args = parser.parse_args()

    started = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    data = load(cfg.data)
    evaluator = get_evaluator(cfg.data)
    curve: dict = {
        "config": args.config,
        "overrides": args.overrides,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "epochs": [],
    }

    def report(given: Report) -> None:
        metrics = given.metrics
        row = {k: metrics[k] for k in ("epoch", *METRICS, "loss_d", "loss_g") if k in metrics}
        row["wall_s"] = round(time.perf_counter() - started, 1)
        curve["epochs"].append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(curve, indent=2))

    scorer = Scorer(evaluator, evaluator.sample_count(cfg.eval.num_samples), cfg.model.latent_dim, cfg.train.seed)
    train_gan(cfg, data, Runtime(device=device), [On(report=report, line=print)], scorer=scorer)
    ranked = CHAMPION_METRIC.name
    scored = [r for r in curve["epochs"] if ranked in r]
    if scored:
        best = min(scored, key=lambda r: CHAMPION_METRIC.sort_key(r[ranked]))
        print(f"best {scores_line(best)} at epoch {best['epoch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
