"""Does the extractor's score rank a run's checkpoints as the classifier's FID does? One GAN is trained on a labelled
folder; after every epoch its generator is scored by both evaluators (the folder's classifier, and the extractor a
folder without classes would get, trained on the same images without their labels), and the two FID series are
compared by Spearman's rank correlation (docs/scores.md).

    python scripts/score_agreement.py --path ~/data/oxygen --image-size 32 --channels 3 --epochs 12
    python scripts/score_agreement.py --path ~/data/digits --make-digits 4000 --image-size 32 --channels 1 \
        --test-fraction 0.2 --epochs 10     # first writes MNIST's first 4,000 training digits, a folder a class
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from scipy.stats import spearmanr

from pipeline.config.load import load_config
from pipeline.data.kinds import source_of
from pipeline.eval.evaluator import CLASSIFIER, EXTRACTOR, EXTRACTOR_STEPS
from pipeline.eval.metrics import FID, KID
from pipeline.gan.loop import train_gan
from pipeline.gan.sampling import generate_images
from pipeline.tools.degradations import train_evaluator


class BothScores:
    """A scorer (pipeline.gan.hooks.Scorer) that scores each evaluation with both evaluators and keeps the series."""

    def __init__(self, classifier, extractor, samples: int, latent_dim: int):
        self.classifier, self.extractor = classifier, extractor
        self.samples, self.latent_dim = samples, latent_dim
        self.series: list[dict[str, float]] = []

    def __call__(self, generator, device):
        images = generate_images(generator, self.samples, self.latent_dim, 0, device)
        by_classifier, by_extractor = self.classifier.score(images), self.extractor.score(images)
        row = {f"classifier_{k}": v for k, v in by_classifier.items()} | {
            f"extractor_{k}": v for k, v in by_extractor.items()
        }
        self.series.append(row)
        print(
            f"  epoch {len(self.series)}: classifier FID {row['classifier_fid']:.2f}, extractor FID "
            f"{row['extractor_fid']:.3f}, KID {row['extractor_kid']:.4f}",
            flush=True,
        )
        return by_classifier

    @staticmethod
    def describe(scores):
        return ""


def make_digits(folder: Path, count: int) -> None:
    """MNIST's first ``count`` training digits as PNG files, one subfolder per digit (a new folder only)."""
    from PIL import Image

    from pipeline.config.schema import DataConfig

    if folder.exists():
        raise SystemExit(f"error: {folder} exists; --make-digits writes a new folder")
    mnist = source_of(DataConfig(dataset="mnist"))
    mnist.prepare(print)
    split = mnist.load(True, print, count)
    for i, (image, label) in enumerate(zip(split.images[:count], split.labels[:count], strict=True)):
        (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy()).save(folder / str(int(label)) / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--make-digits", type=int, help="first write this many MNIST digits into --path, by class")
    args = parser.parse_args()
    if args.make_digits:
        make_digits(Path(args.path).expanduser(), args.make_digits)
    cfg = load_config(
        "configs/images64.yaml" if args.image_size == 64 else None,
        [
            "data.dataset=images",
            f"data.path={args.path}",
            f"data.image_size={args.image_size}",
            f"data.channels={args.channels}",
            f"data.test_fraction={args.test_fraction}",
            f"train.epochs={args.epochs}",
            "train.batch_size=32",
        ],
    )
    source = source_of(cfg.data)
    source.prepare(print)
    train, test = source.load(True, print), source.load(False, print)
    # The folder's classifier as runs are scored by it, without its accuracy gate (the icons' classes are hard to
    # tell apart: it reaches about 0.7 held out), and the extractor a folder without classes would get.
    classifier = train_evaluator(CLASSIFIER, train, test, 600, lambda line: None)
    classifier = classifier.referenced(test.images)
    started = time.perf_counter()
    extractor = train_evaluator(EXTRACTOR, train, test, EXTRACTOR_STEPS, lambda line: None)
    extractor = extractor.referenced(test.images)
    print(f"classifier held-out accuracy {classifier.test_accuracy:.3f}")
    print(f"extractor trained in {time.perf_counter() - started:.0f}s; training the GAN for {args.epochs} epochs")
    scorer = BothScores(classifier, copy.deepcopy(extractor), args.samples, cfg.model.latent_dim)
    train_gan(cfg, train, scorer=scorer)
    pairs = [
        (row["classifier_fid"], row[f"extractor_{FID.name}"], row[f"extractor_{KID.name}"]) for row in scorer.series
    ]
    fid_rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    kid_rho = spearmanr([p[0] for p in pairs], [p[2] for p in pairs]).statistic
    print(
        f"Spearman over {len(pairs)} checkpoints: extractor FID vs classifier FID {fid_rho:.3f}; "
        f"extractor KID vs classifier FID {kid_rho:.3f}"
    )


if __name__ == "__main__":
    main()
