"""What the training loop asks when a report is scored: :class:`Scorer` generates ``eval.num_samples`` images (null:
as many as the held-out reference holds) from the run's sampling generator (the same noise at every evaluation)
and scores them with the run's evaluator, and, where the run has the Inception weights, the first
``eval.inception_samples`` of them by the Inception FID."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.eval.evaluator import Evaluator
from pipeline.eval.inception import Inception
from pipeline.eval.metrics import scores_line
from pipeline.gan.sampling import generate_images, sample_classes

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


@dataclass
class Scorer:
    """Scores a generator (pipeline.gan.hooks.Scorer): ``num_samples`` images from noise seeded by ``seed``."""

    evaluator: Evaluator
    num_samples: int
    latent_dim: int
    seed: int
    inception: Inception | None = None  # where the run has the Inception weights: the standard FID too
    inception_samples: int = 0  # of the first this many samples

    @classmethod
    def of(cls, payload: dict[str, Any], cfg: PipelineConfig) -> Scorer:
        """The scorer of a run: its evaluator shipped as ``payload`` (Evaluator.payload, with the Inception
        network's under ``inception`` where the run has one), its config's sample counts, latent size and seed."""
        inception = Inception.of(payload["inception"]) if payload.get("inception") else None
        evaluator = Evaluator.from_payload(payload)
        return cls(
            evaluator,
            evaluator.sample_count(cfg.eval.num_samples),
            cfg.model.latent_dim,
            cfg.train.seed,
            inception,
            cfg.eval.inception_samples,
        )

    def __call__(self, generator: nn.Module, device: torch.device) -> dict[str, float]:
        count = max(self.num_samples, self.inception_samples if self.inception else 0)
        images = generate_images(generator, count, self.latent_dim, self.seed, device)
        asked = sample_classes(generator, count, self.seed, None, None)  # the classes they were drawn as
        scores = self.evaluator.score(
            images[: self.num_samples], asked[: self.num_samples] if asked is not None else None
        )
        if self.inception is not None:
            scores |= self.inception.to(device).score(images[: self.inception_samples])
        return scores

    @staticmethod
    def describe(scores: Mapping[str, float]) -> str:
        return scores_line(scores)
