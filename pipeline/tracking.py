"""Experiment tracking: a Tracker interface, a no-op implementation, and the MLflow backend.

Only rank 0 gets a real tracker; every other worker gets :class:`NullTracker`, so the training loop
calls the same methods everywhere without asking who it is.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_dir: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class NullTracker:
    """Accepts every call and records nothing (non-zero ranks, and runs without tracking)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_dir: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8) -> None:
    """uint8 (N, 28, 28) -> a PNG grid with ``nrow`` images per row."""
    from torchvision.utils import save_image

    save_image(images.unsqueeze(1).float().div(255.0), path, nrow=nrow, padding=2, pad_value=0.5)


class DirectoryTracker(NullTracker):
    """For in-process runs without MLflow: metrics as JSON lines and sample grids under one directory."""

    def __init__(self, directory: str):
        from pathlib import Path

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import json

        with open(self.directory / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_image_grid(self, images: torch.Tensor, artifact_path: str) -> None:
        path = self.directory / artifact_path
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(images, str(path))
