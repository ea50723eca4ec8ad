"""What the training loop asks when a report is scored: :class:`Scorer` generates ``eval.num_samples`` images from
the run's sampling generator (the same noise at every evaluation) and scores them with the run's evaluator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.eval.evaluator import Evaluator
from pipeline.eval.metrics import scores_line
from pipeline.gan.sampling import generate_images

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


@dataclass
class Scorer:
    """Scores a generator (pipeline.gan.hooks.Scorer): ``num_samples`` images from noise seeded by ``seed``."""

    evaluator: Evaluator
    num_samples: int
    latent_dim: int
    seed: int

    @classmethod
    def of(cls, payload: dict[str, Any], cfg: PipelineConfig) -> Scorer:
        """The scorer of a run: its evaluator shipped as ``payload`` (Evaluator.payload), its config's sample count,
        latent size and seed."""
        return cls(Evaluator.from_payload(payload), cfg.eval.num_samples, cfg.model.latent_dim, cfg.train.seed)

    def __call__(self, generator: nn.Module, device: torch.device) -> dict[str, float]:
        images = generate_images(generator, self.num_samples, self.latent_dim, self.seed, device)
        return self.evaluator.score(images)

    @staticmethod
    def describe(scores: Mapping[str, float]) -> str:
        return scores_line(scores)
