"""Elastic trials: how many workers each running trial of a sweep should have, and the worker-side poll that
asks for it.

A sweep with ``scaling.num_workers: [min, max]`` keeps one :class:`Allotment` (a Ray actor the sweep's driver
creates; plain Python here). Tune's side tells it, after every controller step, which trials run (oldest
first) and how many still wait for a start; :func:`shares` turns that into each trial's worker count. Each
trial's rank 0 asks for its own count every few seconds (:class:`ResizePoll`, between training steps); when it
differs from the worker group's size, the run checkpoints at that step and ends, and the trial's driver starts
the next Train run from that checkpoint with the new size (the same MLflow run, its steps continuing).

A one-worker trial that trains in its trial's own process (``scaling.cpus_per_worker: [min, max]`` on CPUs)
grows differently: the same allotment, counted in CPUs of the trial's node, gives it a thread count, and
:class:`ThreadShare` sets torch's threads to it between steps: no checkpoint, no restart, a few seconds after
the CPUs free up.

Why not Ray's own pieces alone: Train V2's ``ElasticScalingPolicy`` asks Ray's autoscaling
coordinator, which reserves the cluster for requests in the order they came, so with two elastic trials the
first takes every CPU up to its maximum, the second waits for it to end, and nothing ever shrinks; Tune's
``ResourceChangingScheduler`` decides only when a trial reports (here at epoch ends), so a trial left alone for
its last epoch would grow only after it. Both are used where they fit: a single ``pipeline train`` run with a
range hands it to Ray's ``ElasticScalingPolicy``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.core.errors import first_line
from pipeline.gan.hooks import Hook

POLL_EVERY_STEPS = 10  # every rank stops at these steps to learn rank 0's answer (one tiny broadcast)
ASK_EVERY_S = 3.0  # rank 0 asks the allotment at most this often


def shares(running: Sequence[str], capacity: int, low: int, high: int, waiting: int) -> dict[str, int]:
    """Workers per running trial: each has ``low``; while trials wait to start, the rest is kept for them;
    otherwise the free workers of ``capacity`` go one at a time to the running trials, oldest first, up to
    ``high`` each."""
    counts = {trial: low for trial in running}
    free = capacity - low * len(counts)
    while not waiting and free > 0:
        growing = [trial for trial in running if counts[trial] < high]
        if not growing:
            break
        for trial in growing[:free]:
            counts[trial] += 1
        free -= min(free, len(growing))
    return counts


class Allotment:
    """The sweep's worker counts (a Ray actor in a sweep: one per sweep, named after it). Counted in threads
    (``node_cpus``: each node's CPUs), a trial's share comes from its own node's CPUs and the trials there."""

    def __init__(self, capacity: int, low: int, high: int, node_cpus: dict[str, int] | None = None):
        self.capacity, self.low, self.high = capacity, low, high
        self.node_cpus = node_cpus
        self.running: list[str] = []
        self.waiting = 0
        self.nodes: dict[str, str] = {}  # trial -> the node it said it trains on

    def update(self, running: list[str], waiting: int) -> None:
        self.running, self.waiting = list(running), waiting

    def want(self, trial_id: str, node: str | None = None) -> int:
        """How many workers (threads) ``trial_id`` should train with now (``low`` for a trial Tune has not listed
        yet, or on a node the allotment does not know)."""
        if self.node_cpus is None:
            return shares(self.running, self.capacity, self.low, self.high, self.waiting).get(trial_id, self.low)
        if node is None or node not in self.node_cpus:
            return self.low
        self.nodes[trial_id] = node
        # Trials not heard from yet count on every node: they may be here.
        here = [t for t in self.running if self.nodes.get(t, node) == node]
        return shares(here, self.node_cpus[node], self.low, self.high, self.waiting).get(trial_id, self.low)


class ThreadShare:
    """A one-worker trial's torch threads, told after every step: every POLL_EVERY_STEPS steps (at most every
    ASK_EVERY_S) it asks the allotment and sets the count it gets. It also counts the CPU-seconds the trial
    trained on beyond its reservation (``low``), for the sweep's accounting; :meth:`pause` at each report (the
    seconds until the next step are not training) and :meth:`take` the seconds counted since the last."""

    def __init__(
        self,
        ask: Callable[[], int],
        low: int,
        set_threads: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ask, self.low, self.set_threads, self.clock = ask, low, set_threads, clock
        self.threads = low
        self.steps = 0
        self.asked_at = float("-inf")
        self.last: float | None = None
        self.grown_s = 0.0

    def __call__(self) -> tuple[int, int] | None:
        """After a step: (old, new) when the thread count changed, else None."""
        now = self.clock()
        if self.last is not None:
            self.grown_s += (now - self.last) * (self.threads - self.low)
        self.last = now
        self.steps += 1
        if self.steps % POLL_EVERY_STEPS or now - self.asked_at < ASK_EVERY_S:
            return None
        self.asked_at = now
        wanted = self.ask()
        if wanted == self.threads:
            return None
        old, self.threads = self.threads, wanted
        self.set_threads(wanted)
        return old, wanted

    def pause(self) -> None:
        self.last = None

    def take(self) -> float:
        grown, self.grown_s = self.grown_s, 0.0
        return grown


class ResizePoll(Hook):
    """A loop hook: asked by every rank after each training step with (step, steps left), it returns the new worker
    count when the run should checkpoint here and restart with it, else None.

    Every rank stops at the same steps (every POLL_EVERY_STEPS) to receive rank 0's answer through
    ``broadcast`` (an int from rank 0 to all). A trial grows only when the steps it has left would take at least
    ``grow_min_s`` at its current pace (a restart costs a trial start); it shrinks whenever others need it."""

    def __init__(
        self,
        ask: Callable[[], int] | None,
        world: int,
        broadcast: Callable[[int], int],
        grow_min_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ask, self.world, self.broadcast, self.grow_min_s, self.clock = ask, world, broadcast, grow_min_s, clock
        self.started = clock()
        self.steps = 0
        self.asked_at = float("-inf")
        self.answer = world

    def resize(self, step: int, steps_left: int) -> int | None:
        self.steps += 1
        if step % POLL_EVERY_STEPS:
            return None
        target = self.world
        if self.ask is not None:  # rank 0
            now = self.clock()
            if now - self.asked_at >= ASK_EVERY_S:
                self.asked_at, self.answer = now, self.ask()
            target = self.answer
            if target > self.world and steps_left * (now - self.started) / self.steps < self.grow_min_s:
                target = self.world  # too little left to pay for a restart
        if self.world > 1:
            target = self.broadcast(target)
        return None if target == self.world else target


def ask_allotment(
    actor: Any, trial_id: str, fallback: int, node: str | None = None, say: Callable[[str], None] = print
) -> Callable[[], int]:
    """Rank 0's question to the sweep's allotment actor (``node``: where a thread-counted trial trains). An
    unreachable actor (its node lost, the driver gone) means the trial goes on with ``fallback`` (what it holds):
    said once, then asked again quietly (an actor Ray restarts answers again)."""
    told = False

    def ask() -> int:
        import ray

        nonlocal told
        try:
            return int(ray.get(actor.want.remote(trial_id, node), timeout=5))
        except Exception as exc:  # noqa: BLE001 - resizing is an optimisation: training goes on at its size
            if not told:
                told = True
                reason = first_line(exc)
                say(
                    f"[elastic] trial {trial_id}: the sweep's allotment cannot be reached ({type(exc).__name__}: "
                    f"{reason[:160]}); it goes on with {fallback}, as reserved"
                )
            return fallback

    return ask
