"""Which of Ray's forwarded lines a user sees: the noise (Ray's own notes, internal actors, the tracebacks that
come with them, a lost peer's consequences) is hidden unless --verbose. Plain Python:
pipeline.distributed.ray_runtime puts the filter in front of Ray's printer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Lines of Ray's own processes that tell a user nothing they can act on, hidden unless --verbose (with the
# traceback that follows one, if any): the C++ core worker's complaint about Ray's own PreemptionWatcher actor
# (ray-project/ray#53727) and its kin, each worker's full TrainingReport(...) (the epoch line above it says the
# same, readably), and Train's controller's warning that a resource request to Ray's autoscaling coordinator
# took over 5 s (retried every 20 s; it says itself that it is safe to ignore).
RAY_NOISE = (
    "core_worker.cc",
    "PreemptionWatcher",
    "Reporting training result",
    "Failed to send resource request",
    "worker processes have been started on node",  # the raylet's note on its own worker start-up rate
    "Checkpoint successfully created at",  # Tune, each time a trial hands it a checkpoint (PBT: every report)
    "from checkpoint: Checkpoint(",  # Tune restoring a paused or copied trial: our [pbt] line says which
    # A node lost: the controller's failed shutdown of the dead group, the raylet's and GCS's notes, a surviving
    # worker's broken collective. The run's own "[train] lost worker" line says what happened and what follows.
    "Graceful shutdown of backend failed",
    "has been marked dead because the detector has missed too many heartbeats",
    "bundle(s) for placement group",
    "A worker died or was killed while executing a task by an unexpected system error",
    "class_name: RayTrainWorker",
    "The actor is dead because",  # its worker process has died, or it was killed by `ray.kill`
    "The actor died unexpectedly before finishing this task",
)
# How a worker's training function fails when a peer is lost (its collective broken): that traceback is hidden
# too, as a consequence the "[train] lost worker" line explains. Any other error of a worker shows in full.
TRAINING_ERROR = "Error in training function"
# gloo's own error (its source file in the message), or Ray's when the peer died while this worker's report waited
# on it (Ray Train syncs the checkpoint's folder name across the ranks).
RAY_LOST_PEER = ("gloo/transport", "ray.exceptions.ActorDiedError")
HELD_MOST = 400  # lines of a held error at most
# Ray's internal actors whose every line is for Ray's developers: the placement-group janitor of each Train
# run ("Detected that the Ray Train controller actor ... is dead. Cleaning up placement group").
RAY_NOISY_ACTORS = ("PlacementGroupCleaner",)


class NoiseFilter:
    """Drops the lines containing any of ``patterns``, with the indented lines and the Python traceback right
    after such a line, following each process's output across batches; every line of the actors named in
    ``actors``; and a worker's "Error in training function" traceback that ends in one of ``consequences`` (a
    surviving worker's collective broken by a lost peer), which is held until its end to decide."""

    def __init__(self, patterns: Sequence[str], actors: Sequence[str] = (), consequences: Sequence[str] = ()):
        self.patterns, self.actors, self.consequences = tuple(patterns), tuple(actors), tuple(consequences)
        self.state: dict[Any, str] = {}  # per process: "noise" after a hidden line, "traceback" inside its traceback
        self.held: dict[Any, list[str]] = {}  # per process: a training-function error, until its traceback ends

    def __call__(self, source: Any, lines: Sequence[str], actor: str = "") -> list[str]:
        if actor and any(name in actor for name in self.actors):
            return []
        kept: list[str] = []
        for line in lines:
            if source in self.held:
                self._hold(source, line, kept)
            elif self.consequences and line.startswith(TRAINING_ERROR):
                self.held[source] = [line]
            else:
                self._filter(source, line, kept)
        return kept

    def _hold(self, source: Any, line: str, kept: list[str]) -> None:
        held = self.held[source]
        held.append(line)
        if not (line.startswith(("Traceback", " ")) or not line.strip()) and _ends_traceback(line):
            del self.held[source]
            if any(c in line for c in self.consequences):
                self.state[source] = "noise"  # and the blank line after it
            else:
                kept.extend(held)
        elif len(held) > HELD_MOST:  # not the traceback expected: show it as it came
            kept.extend(self.held.pop(source))

    def _filter(self, source: Any, line: str, kept: list[str]) -> None:
        now = self.state.get(source, "")
        if any(p in line for p in self.patterns):
            self.state[source] = "noise"
        elif now and line.startswith("Traceback (most recent call last)"):
            self.state[source] = "traceback"
        elif now == "traceback" and (line.startswith(" ") or not line.strip()):
            pass
        elif now == "traceback" and _ends_traceback(line):
            self.state[source] = ""
        elif now == "noise" and (line.startswith(("\t", "  ")) or not line.strip()):
            pass  # the hidden message's indented continuation
        else:
            self.state[source] = ""
            kept.append(line)


def _ends_traceback(line: str) -> bool:
    """The last line of a Python traceback: ``module.ExceptionName: message`` (or just the name; Ray's wrappers
    add the cause in brackets, ``ray.exceptions.RayTaskError(ValueError): ...``)."""
    head = line.split(":", 1)[0].split("(", 1)[0]
    return bool(head) and head.replace(".", "").replace("_", "").isalnum() and head.rsplit(".", 1)[-1][:1].isupper()
