"""A preemption notice (a spot node's reclaim) costs a run the steps since its last log, not the epoch: every worker
asks, every ``tracking.log_every`` steps, whether a notice has come, and the run checkpoints at once when one has.

Two notices are heard:
- **Ray's**: a node being drained for preemption (the autoscaler on a cloud's spot notice, KubeRay, or
  ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``), through ``ray.train.get_preemption_info()``. The run
  checkpoints and trains on; at the drain's deadline Ray Train restarts it from that checkpoint, counted against
  ``FailureConfig.max_preemption_failures`` (unlimited), not ``train.max_failures``.
- **SIGTERM to a worker** (a node or pod shutting down, a spot-notice script): the worker's handler notes it; at the
  next check every worker learns it (one all-reduce), the run checkpoints, and the signalled worker exits once Ray
  Train has had time to take the checkpoint (:data:`TAKE_S`), or at :data:`GRACE_S` at the latest. Ray Train restarts
  the group from that checkpoint (counted against ``train.max_failures``: Ray cannot tell this exit from a crash).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.gan.hooks import Hook, Step

if TYPE_CHECKING:
    import torch

    from pipeline.gan.reports import Report

GRACE_S = 90.0  # a SIGTERM'd worker's most time to checkpoint before it exits anyway (a spot notice gives 120 s)
# How long a signalled worker waits after its checkpoint's report before it exits: Ray Train's controller takes a
# report when it next polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), twice over.
TAKE_S = 2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 1

# How long a signalled worker may go without a step before it exits anyway: a group that no longer steps (a peer
# gone, Ray tearing the group down, which also sends SIGTERM) has nothing to checkpoint.
STALL_S = 10.0

_received = threading.Event()  # this process got SIGTERM while a run listened
_checkpointing = threading.Event()  # its run heard the notice: scoring and saving are no stall, only the grace counts
_training = threading.Event()  # a run trains in this process: SIGTERM is a notice, not an order to exit
_last_step = [0.0]  # when this process last finished a step (monotonic)


def install_sigterm_notice(grace_s: float = GRACE_S) -> None:
    """Make SIGTERM a notice in this Ray Train worker while it trains: noted for the run, and the process ends
    ``grace_s`` later at the latest (sooner if it stops stepping). Outside training (before, after) Ray's own handler
    answers, as before. Signal handlers belong to a process's main thread, which a Train worker's training thread is
    not: the handler is installed there, through the worker actor's ``__ray_call__``."""
    import ray

    actor = ray.get_runtime_context().current_actor
    ray.get(actor.__ray_call__.remote(_install, grace_s))


def _install(_actor: Any, grace_s: float) -> None:
    ray_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if not _training.is_set() or _received.is_set():  # not training, or told twice: exit as Ray would
            if callable(ray_handler):
                ray_handler(signum, frame)
            os._exit(1)
        _received.set()
        print(f"[preempt] SIGTERM: this worker checkpoints the run and exits within {grace_s:.0f} s", flush=True)
        threading.Thread(target=_exit_when_due, args=(time.monotonic() + grace_s,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def _exit_when_due(deadline: float) -> None:
    """The process's end after a SIGTERM: at ``deadline``, or once it has not stepped for :data:`STALL_S` before its
    run heard the notice (a group that no longer steps has nothing to checkpoint)."""
    while time.monotonic() < deadline and (_checkpointing.is_set() or time.monotonic() - _last_step[0] < STALL_S):
        time.sleep(0.5)
    print("[preempt] exits: SIGTERM's grace is over or training stopped stepping", flush=True)
    os._exit(1)


def training(on: bool) -> None:
    """Whether a run trains in this process (SIGTERM a notice) or not (SIGTERM ends it)."""
    _last_step[0] = time.monotonic()
    (_training.set if on else _training.clear)()


def sigterm_received() -> bool:
    return _received.is_set()


@dataclass
class PreemptionWatch(Hook):
    """Every ``every`` steps, on every worker at the same steps: a notice from ``ray_notice`` (Ray's preemption info, a
    barrier over the workers) or from a worker's SIGTERM (``any_worker``: True on every worker if it is True on one);
    each notice is said once. After the report that checkpoints for a SIGTERM, the signalled worker exits."""

    every: int
    ray_notice: Any  # () -> PreemptionInfo | None, or None where the run is no Ray Train run
    any_worker: Any  # (bool) -> bool, a collective
    is_main: bool
    say: Any
    received: Any = sigterm_received
    take_s: float = TAKE_S
    exit: Any = os._exit
    heard: set[str] = field(default_factory=set)
    leaving: bool = False

    def on_step(self, step: Step) -> None:
        _last_step[0] = time.monotonic()

    def preempted(self, step: int) -> str | None:
        if step % self.every:
            return None
        notice = None
        info = self.ray_notice() if self.ray_notice is not None else None
        if info is not None and "ray" not in self.heard:
            self.heard.add("ray")
            deadline = f", deadline in {info.deadline_ms / 1000 - time.time():.0f} s" if info.deadline_ms else ""
            notice = f"Ray drains node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} for preemption{deadline}"
        signalled = self.received()
        if self.any_worker(signalled) and "sigterm" not in self.heard:
            self.heard.add("sigterm")
            self.leaving = signalled
            if signalled:
                _checkpointing.set()
            notice = "a worker got SIGTERM"
        if notice and self.is_main:
            self.say(f"[preempt] {notice}: checkpoint at step {step}")
        return notice

    def on_report(self, report: Report) -> None:
        if self.leaving:  # the report after the notice: the one that checkpoints the run
            time.sleep(self.take_s)  # Ray Train takes the report (and its checkpoint) from this worker first
            print("[preempt] checkpoint reported; this worker exits (SIGTERM)", flush=True)
            self.exit(1)


def any_worker(device: torch.device) -> Any:
    """(flag) -> whether any worker's flag is set: an all-reduce every worker calls at the same steps."""
    import torch
    import torch.distributed as dist

    def ask(flag: bool) -> bool:
        carrier = torch.tensor([int(flag)], device=device)
        dist.all_reduce(carrier, op=dist.ReduceOp.MAX)
        return bool(carrier.item())

    return ask
