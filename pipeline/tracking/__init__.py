"""Owns everything MLflow: the store (client, experiments, runs, system metrics, its private APIs), a run's
tracker and its no-op twin (the one factory, tracker_for), what a training run keeps while its store does not answer
(outage), the Model Registry and its champion, and the evaluators a store shares. The only package that imports mlflow.

Imports: core, data, config, gan, eval
"""

from pipeline.tracking.store import find_run
from pipeline.tracking.tracker import MLflowTracker

__all__ = ["MLflowTracker", "find_run"]  # sweeps saved before the split call these by this package's name
