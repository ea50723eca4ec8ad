"""A folder's preparation as Ray tasks across the cluster: the same shards as a local preparation, byte for byte.

Each shard's images are decoded in chunks by tasks on any node (their pixels go through Ray's object store), and one
task per shard writes it straight to its destination (a shared disk or S3) and answers with its manifest entry;
the driver writes the manifest last, as a local preparation does (pipeline.data.images). A few shards are in
flight at once, enough to keep every CPU of the cluster busy, so the object store holds a few shards' pixels, never
the folder's (:data:`MAX_IN_FLIGHT` at most). A task lost with its node is run again by Ray (``max_retries``); a
write that fails on a passing fault is tried again; a file that stays unreadable fails the preparation naming it.
A local path is another folder on each node: ``auto`` takes tasks only where both paths are in an object store, and
a preparation whose shards the driver does not see stops before its manifest.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

from pipeline.core.errors import UserError
from pipeline.data.shard_making import Folder, ShardMaker, ShardPlan, decode_chunk, shard_from_chunks
from pipeline.data.shards import Preparation

PREPARE_ON = ("auto", "local", "ray")
TASK_RETRIES = 3  # a task lost with its worker or node runs again up to this often
MAX_IN_FLIGHT = 8  # shards decoded at once, at most: what the object store holds is a few shards' pixels


def shard_maker(source: Any, choice: str = "auto", verbose: bool = False) -> RayShardMaker | None:
    """How ``source`` (a DataSource) makes a folder's shards: as Ray tasks (a :class:`RayShardMaker`) or, None, in
    local processes. ``ray`` asks for tasks, ``local`` for processes; ``auto`` takes tasks when RAY_ADDRESS names a
    cluster and both the folder and the destination are in an object store (every node reads and writes them
    there; a local path is another folder on each node). Data that is not a folder is prepared as it is: None."""
    if choice not in PREPARE_ON:
        raise ValueError(f"prepare on {choice!r}: use one of {', '.join(PREPARE_ON)}")
    job = getattr(source, "preparation", None)
    if job is None or choice == "local":
        return None
    remote = "://" in job.path and "://" in job.location
    if choice == "auto" and not (os.environ.get("RAY_ADDRESS") and remote):
        return None
    return RayShardMaker(verbose, shared=remote)


def _decode(root: str, rels: list[str], job: Preparation) -> tuple[list[int], bytes, list[str], dict[str, Any]]:
    """A decoding task: :func:`decode_chunk`'s answer and where it ran (:func:`_where`)."""
    return (*decode_chunk(root, rels, job), _where())


def _write(
    job: Preparation, classes: list[str], plan: ShardPlan, *decoded: tuple[list[int], bytes, list[str], dict]
) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    """A shard-writing task (Ray hands it its chunks' answers): the manifest entry, the files skipped, and where
    each of its tasks ran."""
    entry, skipped = shard_from_chunks(job, classes, plan, [answer[:3] for answer in decoded])
    return entry, skipped, [answer[3] for answer in decoded] + [_where()]


def _where() -> dict[str, Any]:
    """The node a task ran on and its process's peak resident memory so far (bytes)."""
    import resource

    import ray

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts it in KiB
    return {"node": ray.get_runtime_context().get_node_id(), "peak_rss": peak}


class RayShardMaker(ShardMaker):
    """Shards made as Ray tasks (see the module); progress as a bar over the images decoded."""

    def __init__(self, verbose: bool = False, shared: bool = True):
        self.verbose = verbose
        self.shared = shared  # both paths in an object store: False warns that local ones must be one shared folder
        self.nodes: set[str] = set()
        self.peak_rss = 0  # the largest a task's process grew to (bytes)

    def make(
        self, listing: Folder, job: Preparation, plans: list[ShardPlan]
    ) -> Iterator[tuple[dict[str, Any], list[str]]]:
        import ray
        from ray.experimental.tqdm_ray import tqdm

        from pipeline.distributed.ray_runtime import init_ray

        init_ray(self.verbose)
        if not self.shared and len(ray.nodes()) > 1:
            print(
                f"[data] {job.path} -> {job.location}: tasks on every node read and write these local paths; they "
                "must be one shared folder (NFS) on each node, or the preparation stops before its manifest",
                flush=True,
            )
        # Decoding spread over the nodes (their disks and links read the files); each shard's writer anywhere.
        decode = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")(_decode)
        write = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_write)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        chunks = max(1, max((len(plan.chunks) for plan in plans), default=1))
        window = min(MAX_IN_FLIGHT, max(2, -(-cpus // chunks) + 1))  # every CPU busy, one more queued
        decoding: dict[Any, int] = {}
        bar = tqdm(total=sum(len(plan.rels) for plan in plans), desc="[data] decoding", unit="img")

        def submit(plan: ShardPlan) -> Any:
            refs = [decode.remote(listing.root, chunk, job) for chunk in plan.chunks]
            decoding.update({ref: len(chunk) for ref, chunk in zip(refs, plan.chunks, strict=True)})
            return write.remote(job, listing.classes, plan, *refs)

        waiting, pending = deque(plans), deque()
        try:
            while waiting or pending:
                while waiting and len(pending) < window:
                    pending.append(submit(waiting.popleft()))
                ready: list[Any] = []
                while not ready:
                    ready, _ = ray.wait([pending[0]], timeout=0.5)
                    done, _ = ray.wait(list(decoding), num_returns=len(decoding), timeout=0, fetch_local=False)
                    for ref in done:
                        bar.update(decoding.pop(ref))
                entry, skipped, where = _answer(pending.popleft())
                self.nodes |= {w["node"] for w in where}
                self.peak_rss = max([self.peak_rss] + [w["peak_rss"] for w in where])
                yield entry, skipped
        finally:
            bar.close()
            _cancel([*pending, *decoding])

    def finished(self) -> str:
        return f"Ray tasks on {len(self.nodes)} node(s), a task's process at most {self.peak_rss / 2**20:.0f} MiB"


def _cancel(refs: list[Any]) -> None:
    """A failed or abandoned preparation leaves no task running: each is cancelled and waited for (up to a
    minute), so the place's claim is given back only once no writer of this preparation is left."""
    import ray

    with contextlib.suppress(Exception):  # Ray gone too: the error that brought us here is the one to say
        for ref in refs:
            ray.cancel(ref, force=True)
        ray.wait(refs, num_returns=len(refs), timeout=60, fetch_local=False)


def _answer(ref: Any) -> Any:
    """A task's answer; a task's UserError (a file that stays unreadable) raised as itself, not wrapped by Ray."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):
            raise exc.cause from None
        raise
