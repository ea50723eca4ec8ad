"""Does a score track quality? Each kind of evaluator network is trained on a dataset's training split, and the
dataset's held-out images are cut in two: one half is the reference, the other is scored as it is and under known
degradations (light and heavy blur, added noise, a few images repeated). A trustworthy score orders them: real <
light blur < heavy blur, real < noise, real < collapse; precision falls for blur and noise, recall for collapse.

``scripts/score_degradations.py`` prints the table (docs/scores.md); tests/test_unlabelled.py holds a folder of
real digits without classes to the same orderings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF

from pipeline.data.split import Split
from pipeline.eval.classifier import train_classifier
from pipeline.eval.evaluator import CLASSIFIER, Evaluator
from pipeline.eval.extractor import Extractor, train_extractor
from pipeline.eval.metrics import FID, KID, PRECISION, RECALL, computed_by

KINDS = ("classifier", "rotation", "contrastive", "random")  # "random": an untrained extractor, the baseline
DEGRADATIONS = ("real", "blur_light", "blur_heavy", "noise", "collapse")


def degraded(images: torch.Tensor, how: str, seed: int = 0) -> torch.Tensor:
    """uint8 images (N, [C,] H, W) under one of :data:`DEGRADATIONS`; blur radii scale with the side (a sigma
    of side/64 and side/16 pixels), noise is Gaussian with a std of 10% of the range, collapse repeats 8 images."""
    side = images.shape[-1]
    if how == "real":
        return images
    if how.startswith("blur"):
        sigma = side / (64 if how == "blur_light" else 16)
        size = 2 * int(3 * sigma) + 1
        x = images.float() if images.ndim == 4 else images[:, None].float()
        blurred = TF.gaussian_blur(x, [size, size], [sigma, sigma]).round().clamp(0, 255).to(torch.uint8)
        return blurred if images.ndim == 4 else blurred[:, 0]
    gen = torch.Generator().manual_seed(seed)
    if how == "noise":
        noise = torch.randn(images.shape, generator=gen) * 25.5
        return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)
    if how == "collapse":
        few = images[torch.randperm(len(images), generator=gen)[:8]]
        return few.repeat((len(images) + 7) // 8, *([1] * (images.ndim - 1)))[: len(images)]
    raise ValueError(f"unknown degradation {how!r}; one of {', '.join(DEGRADATIONS)}")


def train_evaluator(kind: str, train: Split, test: Split, steps: int, progress: Callable[[str], None]) -> Evaluator:
    """An evaluator of ``kind`` trained on ``train`` (held-out figure on ``test``), its reference not yet set."""
    shape = train.images.shape
    channels, side = (1 if len(shape) == 3 else shape[1]), shape[-1]
    if kind == CLASSIFIER:
        from pipeline.data.specs import DatasetSpec

        classes = int(train.labels.max()) + 1
        spec = DatasetSpec("probe", "", side, channels, classes, len(train), 0.0, evaluator_min_steps=steps)
        model, figure = train_classifier(spec, train, test, progress=progress)
    elif kind == "random":
        torch.manual_seed(0)
        model, figure = Extractor(channels, side), float("nan")
    else:
        model, figure = train_extractor(train, test, kind, steps, 0, progress)
    if kind == CLASSIFIER:
        return Evaluator(model, "probe", figure, np.eye(2, 4, dtype=np.float32), "", CLASSIFIER, classes)
    return Evaluator(model, "probe", figure, np.eye(2, 4, dtype=np.float32), "", model.objective)


@dataclass(frozen=True)
class Row:
    kind: str
    degradation: str
    scores: dict[str, float]


def degradation_rows(evaluator: Evaluator, kind: str, held_out: torch.Tensor, seed: int = 0) -> list[Row]:
    """The scores of each degradation of one half of ``held_out`` against the other half."""
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))
    reference, sample = held_out[order[: len(order) // 2]], held_out[order[len(order) // 2 :]]
    evaluator = evaluator.referenced(reference)
    rows = []
    for how in DEGRADATIONS:
        features = evaluator.features(degraded(sample, how, seed))
        scores = {k: v for m in computed_by(classes=False) for k, v in m.compute(features).items()}
        rows.append(Row(kind, how, scores))
    return rows


def ordering_problems(rows: list[Row]) -> list[str]:
    """What the rows of one evaluator get wrong (empty: every ordering holds)."""
    by = {row.degradation: row.scores for row in rows}
    problems = []
    for metric in (FID, KID):
        chain = [("real", "blur_light"), ("blur_light", "blur_heavy"), ("real", "noise"), ("real", "collapse")]
        problems += [f"{metric.label}: {a} !< {b}" for a, b in chain if not by[a][metric.name] < by[b][metric.name]]
    problems += [
        f"precision: {how} !< real"
        for how in ("blur_heavy", "noise")
        if not by[how][PRECISION.name] < by["real"][PRECISION.name]
    ]
    if not by["collapse"][RECALL.name] < by["real"][RECALL.name]:
        problems.append("recall: collapse !< real")
    return problems


def table(rows: list[Row]) -> str:
    """A Markdown table: one line per evaluator and degradation."""
    lines = ["| extractor | images | FID | KID x1e3 | precision | recall |", "|---|---|---|---|---|---|"]
    for row in rows:
        s = row.scores
        lines.append(
            f"| {row.kind} | {row.degradation} | {s[FID.name]:.2f} | {1e3 * s[KID.name]:.2f} | "
            f"{s[PRECISION.name]:.3f} | {s[RECALL.name]:.3f} |"
        )
    return "\n".join(lines)
