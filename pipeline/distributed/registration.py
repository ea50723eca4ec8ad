"""A finished run's generator in the Model Registry: a new version with its scores and what they were measured
by, the ``champion`` alias moved only on evidence (pipeline.tracking.registry), and how a champion scored otherwise
is scored again the way this run's were."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from pipeline.data.kinds import source_of
from pipeline.distributed.lifecycle import config_digest
from pipeline.eval.metrics import METRICS, champion_metric
from pipeline.tracking.registry import Registration, Rescore, load_generator, register_generator, registered_model_name
from pipeline.tracking.tracker import tracker_for

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


def register_best(
    cfg: PipelineConfig, uri: str, run_id: str, model_uri: str | None, progress: Callable[[str], None] = print
) -> Registration | None:
    """Register the run's logged generator in the Model Registry (``tracking.registered_model``) with its scores,
    run id, config digest, evaluator checksum and sample count; the alias ``champion`` moves only on a better score
    of the champion metric by the same evaluator at the same sample count (a champion scored otherwise is re-scored
    first)."""
    name = registered_model_name(cfg)
    if not name or model_uri is None:
        return None
    tracker = tracker_for(uri, run_id)
    scores = {key: max(tracker.metric_history(key), default=None) for key in METRICS}
    ranked = champion_metric(cfg)
    if scores[ranked.name] is None:
        why = source_of(cfg.data).scores_unavailable() or f"eval.every_epochs={cfg.eval.every_epochs}"
        progress(f"[registry] run {run_id} not registered in {name!r}: it has no {ranked.label} ({why})")
        return None
    tags = tracker.tags()
    version_tags = {
        **{key: repr(last[1]) if last else "nan" for key, last in scores.items()},
        "run_id": run_id,
        # Data named by its content (an image folder): a champion is compared (or re-scored) only on the same data.
        "dataset": source_of(cfg.data).spec().key,
        "config_digest": tags.get("config_digest") or config_digest(cfg),
        "evaluator_sha256": tags.get("evaluator_sha256", "unknown"),
        "eval_num_samples": tags.get("eval_num_samples") or str(cfg.eval.num_samples or "unknown"),
    }
    registration = register_generator(uri, name, model_uri, version_tags, rescorer(cfg, uri, progress), ranked)
    progress(f"[registry] {registration.message}")
    return registration


def rescorer(cfg: PipelineConfig, uri: str, progress: Callable[[str], None]) -> Rescore:
    """How a registered generator is scored again as ``cfg``'s runs are: by the store's shared evaluator of
    ``cfg.data``, ``cfg.eval.num_samples`` images (null: as many as its reference) from the noise of
    ``cfg.train.seed``."""

    def rescore(model_uri: str) -> dict[str, str]:
        from pipeline.gan.sampling import generate_images, sample_classes
        from pipeline.tracking.evaluators import shared_evaluator

        evaluator = shared_evaluator(cfg.data, uri, progress)
        generator, facts = load_generator(uri, model_uri)
        count = evaluator.sample_count(cfg.eval.num_samples)
        weights = facts.get("class_weights")
        images = generate_images(
            generator, count, facts["latent_dim"], cfg.train.seed, torch.device("cpu"), 1.0, weights
        )
        scores = evaluator.score(images, sample_classes(generator, count, cfg.train.seed, weights, None))
        return {
            **{key: repr(scores[key]) for key in METRICS if key in scores},  # what this evaluator computes
            "evaluator_sha256": evaluator.checksum,
            "eval_num_samples": str(count),
        }

    return rescore
