"""What one evaluation costs against one epoch, at the shipped settings: for MNIST (configs/mnist.yaml, its
classifier) and a 64 px folder (configs/images64.yaml at one process's batch of 64, its evaluator), the seconds
to generate eval.num_samples images, compute the evaluator's features and each score, and one epoch of the plain
loop on the same data (docs/scores.md). Compare within one run: this VM's speed varies.

    python scripts/eval_cost.py --path ~/data/oxygen-flat --test-fraction 0.3
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.config.load import load_config, with_overrides
from pipeline.data.kinds import source_of
from pipeline.eval.evaluator import get_evaluator
from pipeline.eval.metrics import computed_by
from pipeline.gan.loop import train_gan
from pipeline.gan.sampling import generate_images


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def measure(cfg, label: str) -> None:
    source = source_of(cfg.data)
    source.prepare(lambda line: None)
    evaluator = get_evaluator(cfg.data, lambda line: None)
    data = source.load(True, lambda line: None)
    one = with_overrides(cfg, {"train.epochs": 1, "eval.every_epochs": 0})
    result, epoch_s = timed(lambda: train_gan(one, data))
    n = evaluator.sample_count(cfg.eval.num_samples)
    images, generate_s = timed(
        lambda: generate_images(result.generator, n, cfg.model.latent_dim, 0, torch.device("cpu"))
    )
    features, features_s = timed(lambda: evaluator.features(images))
    parts = {}
    for metric in computed_by(classes=features.probs is not None):
        _, parts[metric.label] = timed(lambda metric=metric: metric.compute(features))
    total = generate_s + features_s + sum(parts.values())
    before = generate_s + features_s + sum(v for k, v in parts.items() if k in ("FID", "IS"))
    cells = "  ".join(f"{k} {v:.2f}s" for k, v in parts.items())
    print(
        f"{label} ({evaluator.kind}, {n} samples): generate {generate_s:.2f}s  features {features_s:.2f}s  {cells}; "
        f"evaluation {total:.1f}s (FID and IS alone {before:.1f}s); one epoch {epoch_s:.1f}s ({len(data)} images): "
        f"eval/epoch {total / epoch_s:.3f} (FID and IS alone {before / epoch_s:.3f})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="a folder of images for the 64 px row")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    measure(load_config("configs/mnist.yaml"), "MNIST")
    # images64.yaml's batch (512 for 4 GPUs) is larger than a small folder: 64, one process's share.
    folder = [f"data.path={args.path}", f"data.test_fraction={args.test_fraction}", "train.batch_size=64"]
    measure(load_config("configs/images64.yaml", folder), "64 px folder")


if __name__ == "__main__":
    main()
