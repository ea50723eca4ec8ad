"""Training checkpoints: G, D, both optimizers, epoch, step, RNG states and the config.

Written atomically (temp file, then rename) so an interrupted save never replaces a good checkpoint,
and read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import UserError, first_line
from pipeline.core.retry import retried

FILENAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated, corrupted or from an incompatible version."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint read whole that does not load (truncated, corrupted): not a passing fault."""


class MissingCheckpoint(CheckpointError):
    """No checkpoint file where one was named (deleted, or never written whole)."""


def save(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (see train.TrainState.to_checkpoint) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, source: str | None = None
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any damage becomes a CheckpointError naming the file (or
    ``source``, where a remote file was copied to ``path``)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    shown = source or str(path)
    if not path.is_file():
        raise MissingCheckpoint(f"checkpoint {shown!r} not found")
    blob = retried(path.read_bytes, f"checkpoint {shown!r}")  # a read error is no damage: Unavailable, retry
    stream = io.BytesIO(blob)
    try:
        state = torch.load(stream, map_location=map_location, weights_only=True)
    except Exception as exc:  # bytes in memory: whatever torch.load raises on them is damage (garbage: IndexError)
        raise DamagedCheckpoint(
            f"checkpoint {shown!r} is damaged: corrupted or truncated ({first_line(exc)}); it was left as it is: "
            "resume from an earlier checkpoint, or start a new run (another --name)"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {shown!r} is not a gan-pipeline v{FORMAT_VERSION} checkpoint")
    return state
