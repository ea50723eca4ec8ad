"""Where a worker's training batches come from, epoch by epoch: the whole set in memory, or an image folder's
shards streamed.

Both give each worker ``num_steps`` batches of ``local_batch`` uint8 images per epoch (with ``Plan.labels``, pairs of
images and their int64 class labels), in an order that depends only on (seed, epoch, worker count, rank), so a run
resumed inside an epoch continues with the batches it would have had (``first``: the epoch's first step to train).

- :class:`InMemory`: the images on the device; one shuffled order of all of them per epoch, of which each worker
  takes its share (torch's ``DistributedSampler``): N workers' batches together are one process's batch.
- :class:`Streamed`: the prepared shards' row groups, never the whole set. Each epoch the row groups of the
  training split are put in a seeded order; worker r reads the r-th of N equal runs of rows of it (so the N
  workers read disjoint parts, ~1/N of the data each), a window of row groups at a time, shuffled within the
  window; a background thread reads the next window while this one trains. Memory per worker: a few windows
  (:data:`WINDOW_BYTES`), whatever the set's size. Every row group's pixels are checked against the SHA-256
  the manifest records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

WINDOW_BYTES = 32 << 20  # pixels a streamed window holds (shuffled within); two more are in flight at most
OPEN_SHARDS = 8  # shard files a reader keeps open at once


class Batches(Protocol):
    """A training set as a worker sees it: its size, and an epoch's batches for one worker."""

    def __len__(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def epoch(self, epoch: int, first: int, plan: Plan, worlds: Worlds = ()) -> Iterator[Any]: ...

    def class_counts(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Plan:
    """What an epoch's batches depend on besides the epoch: the seed, the workers and the batch sizes, and whether
    each batch comes with its class labels (a conditional GAN's)."""

    seed: int
    rank: int
    world: int
    local_batch: int
    num_steps: int
    device: torch.device
    labels: bool = False


class InMemory:
    """A :class:`~pipeline.data.split.Split`'s images (and labels, where given) on the device, taken in one shuffled
    order per epoch."""

    def __init__(self, images: torch.Tensor, device: torch.device, labels: torch.Tensor | None = None):
        self.images = images.to(device)
        self.labels = labels.to(device) if labels is not None else None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width): grey images kept as (N, H, W) have one channel."""
        shape = tuple(self.images.shape[1:])
        return (1, *shape) if len(shape) == 2 else shape

    def class_counts(self) -> torch.Tensor:
        """Images per class (int64 on the CPU; empty for images without labels or classes, labelled -1)."""
        if self.labels is None or not len(self.labels) or int(self.labels.min()) < 0:
            return torch.zeros(0, dtype=torch.int64)
        return torch.bincount(self.labels.cpu())

    def epoch(self, epoch: int, first: int, plan: Plan, worlds: Worlds = ()) -> Iterator[Any]:
        """This worker's batches of ``epoch`` from step ``first`` on. Step i's global batch is rows i*B:(i+1)*B of
        the epoch's one order whatever the worker count (``DistributedSampler`` deals them out by rank), so a resume
        or a resize inside the epoch (``worlds``) trains exactly the rows it has left."""
        from torch.utils.data import DistributedSampler

        if plan.labels and self.labels is None:
            raise ValueError("batches with labels asked of images held without them")

        sampler = DistributedSampler(
            range(len(self.images)),
            num_replicas=plan.world,
            rank=plan.rank,
            shuffle=True,
            seed=plan.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=plan.device)
        batch = plan.local_batch
        for i in range(first, plan.num_steps):
            rows = order[i * batch : (i + 1) * batch]
            yield (self.images[rows], self.labels[rows]) if plan.labels else self.images[rows]


@dataclass(frozen=True)
class Slice:
    """Rows ``lo:hi`` of row group ``group`` of shard ``shard`` (indices into the manifest)."""

    shard: int
    group: int
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo


@dataclass
class Streamed:
    """An image folder's prepared training split, read in row groups (see the module's doc)."""

    location: str
    manifest: dict[str, Any]
    limit: int | None = None
    slices: list[Slice] = field(init=False)

    def __post_init__(self) -> None:
        slices, left = [], self.limit if self.limit is not None else float("inf")
        for s, shard in enumerate(self.manifest["shards"]["train"]):
            for g, rows in enumerate(shard["groups"]):
                take = int(min(rows, left))
                if take <= 0:
                    break
                slices.append(Slice(s, g, 0, take))
                left -= take
        self.slices = slices

    def __len__(self) -> int:
        return sum(len(s) for s in self.slices)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.manifest["channels"], self.manifest["image_size"], self.manifest["image_size"]

    def class_counts(self) -> torch.Tensor:
        """Images per class of the (limited) training split, from its label columns (int64 on the CPU; empty for a
        folder without classes)."""
        import pyarrow.parquet as pq

        from pipeline.data.shards import filesystem

        if not self.manifest.get("classes"):
            return torch.zeros(0, dtype=torch.int64)
        fs, base = filesystem(self.location)
        counts = np.zeros(len(self.manifest["classes"]), dtype=np.int64)
        for number in sorted({piece.shard for piece in self.slices}):
            shard = self.manifest["shards"]["train"][number]
            with fs.open_input_file(f"{base}/{shard['file']}") as handle:
                parquet = pq.ParquetFile(handle)
                for piece in (p for p in self.slices if p.shard == number):
                    labels = parquet.read_row_group(piece.group, columns=["label"]).column("label").to_numpy()
                    counts += np.bincount(labels[piece.lo : piece.hi], minlength=len(counts))
        return torch.from_numpy(counts)

    def share(self, epoch: int, plan: Plan) -> list[Slice]:
        """This worker's rows of the epoch: the row groups in the epoch's seeded order, cut into ``world`` runs of
        ``num_steps * local_batch`` rows (the rest, under one global batch, is not trained this epoch)."""
        order = np.random.default_rng([plan.seed, epoch]).permutation(len(self.slices))
        each = plan.num_steps * plan.local_batch
        lo, hi = plan.rank * each, (plan.rank + 1) * each
        mine, at = [], 0
        for i in order:
            piece = self.slices[i]
            start, end = max(lo, at), min(hi, at + len(piece))
            if start < end:
                mine.append(Slice(piece.shard, piece.group, piece.lo + start - at, piece.lo + end - at))
            at += len(piece)
            if at >= hi:
                break
        return mine

    def windows(self, mine: list[Slice]) -> list[list[Slice]]:
        """``mine`` in consecutive windows of about :data:`WINDOW_BYTES` of pixels."""
        per_row = int(np.prod(self.image_shape))
        out, current, size = [], [], 0
        for piece in mine:
            current.append(piece)
            size += len(piece) * per_row
            if size >= WINDOW_BYTES:
                out.append(current)
                current, size = [], 0
        return [*out, current] if current else out

    def epoch(self, epoch: int, first: int, plan: Plan, worlds: Worlds = ()) -> Iterator[Any]:
        """This worker's batches of ``epoch`` from step ``first`` on. ``worlds``: the epoch's worker counts so far,
        (count, first step) each (none: ``plan.world`` from its start), so that after a resume or a resize inside
        the epoch the workers train exactly the rows it has left (:func:`remaining_runs`)."""
        history = list(worlds) or [(plan.world, 0)]
        origin = history[0][0]
        lane_plan = dataclasses.replace(plan, world=origin, local_batch=plan.local_batch * plan.world // origin)
        todo = []  # (window's index in its lane, its row groups, the lane's shuffle seed, rows lo:hi of it)
        for lane, lo, hi in remaining_runs(history, first, plan)[plan.rank]:
            at = 0
            for index, window in enumerate(self.windows(self.share(epoch, dataclasses.replace(lane_plan, rank=lane)))):
                rows = sum(len(piece) for piece in window)
                if max(lo, at) < min(hi, at + rows):
                    todo.append((index, window, [plan.seed, epoch, lane], max(lo, at) - at, min(hi, at + rows) - at))
                at += rows
        reader = WindowReader(self, todo)
        try:
            carry = torch.zeros((0, *self.image_shape), dtype=torch.uint8)
            carried = torch.zeros(0, dtype=torch.int64)  # their labels
            for rows, labels in reader:
                carry, carried = (
                    (torch.cat([carry, rows]), torch.cat([carried, labels])) if len(carry) else (rows, labels)
                )
                while len(carry) >= plan.local_batch:
                    images = carry[: plan.local_batch].to(plan.device, non_blocking=True)
                    labels = carried[: plan.local_batch].to(plan.device, non_blocking=True)
                    yield (images, labels) if plan.labels else images
                    carry, carried = carry[plan.local_batch :], carried[plan.local_batch :]
        finally:
            reader.stop()


Worlds = Sequence[tuple[int, int]]  # an epoch's worker counts so far: (count, the step it began at), the first at 0
Run = tuple[int, int, int]  # rows lo:hi of lane k: the k-th worker's share of the epoch as its first world cut it


def remaining_runs(worlds: Worlds, first: int, plan: Plan) -> list[list[Run]]:
    """What each of ``plan.world`` workers trains of an epoch from step ``first`` on, when the epoch began with
    ``worlds[0][0]`` workers and changed its count at each later entry of ``worlds``: lists of :data:`Run`.

    The epoch's rows are the first world's lanes (its workers' shares, each in its windows' shuffled order). At
    each change, what every worker had left (its runs, less the rows it trained since) is laid end to end, worker
    by worker, and cut into as many equal runs as there are workers now. So every row of the epoch is trained
    exactly once whatever the counts and wherever they change (at a global batch that stays the same), and each
    worker still reads a few consecutive windows of row groups, not all of them."""
    history = [*worlds, (plan.world, first)]
    batch = plan.local_batch * plan.world  # the global batch: the same at every count
    origin = history[0][0]
    runs = [[(lane, 0, plan.num_steps * batch // origin)] for lane in range(origin)]
    for (world, start), (new_world, new_start) in itertools.pairwise(history):
        trained = (new_start - start) * batch // world
        left = [piece for worker in runs for piece in _after(worker, trained)]
        runs = _cut(left, new_world, (plan.num_steps - new_start) * batch // new_world)
    return runs


def _after(runs: list[Run], rows: int) -> list[Run]:
    """``runs`` without their first ``rows`` rows."""
    kept = []
    for lane, lo, hi in runs:
        drop = min(rows, hi - lo)
        rows -= drop
        if lo + drop < hi:
            kept.append((lane, lo + drop, hi))
    return kept


def _cut(runs: list[Run], parts: int, each: int) -> list[list[Run]]:
    """``runs`` laid end to end, cut into ``parts`` consecutive parts of ``each`` rows."""
    out: list[list[Run]] = [[] for _ in range(parts)]
    part, room = 0, each
    for lane, lo, hi in runs:
        while lo < hi and part < parts:
            take = min(room, hi - lo)
            out[part].append((lane, lo, lo + take))
            lo, room = lo + take, room - take
            if room == 0:
                part, room = part + 1, each
    return out


class WindowReader:
    """Reads windows of row groups on a background thread, one ahead (a bounded queue), each shuffled by a
    generator seeded with (``seed``..., its index): what the loop iterates."""

    def __init__(self, stream: Streamed, todo: list[tuple[int, list[Slice], list[int], int, int]]):
        self.stream, self.todo = stream, todo
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.stopping = threading.Event()
        self.files: dict[int, tuple[Any, Any]] = {}  # shard -> (its ParquetFile, its open file), oldest first
        self.thread = threading.Thread(target=self._run, name="shard-reader", daemon=True)
        self.thread.start()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self) -> None:
        try:
            for index, window, seed, lo, hi in self.todo:
                pieces = [self._read(piece) for piece in window]
                pixels = np.concatenate([p for p, _ in pieces])
                labels = np.concatenate([lab for _, lab in pieces])
                order = np.random.default_rng([*seed, index]).permutation(len(pixels))[lo:hi]
                if not self._put((torch.from_numpy(pixels[order]), torch.from_numpy(labels[order]))):
                    return
            self._put(None)
        except BaseException as exc:  # handed to the loop's thread, which raises it
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, piece: Slice) -> tuple[np.ndarray, np.ndarray]:
        """The slice's pixels (checked against the manifest's SHA-256 of its row group) and int64 labels."""
        import pyarrow as pa

        from pipeline.core.retry import Unavailable, retried
        from pipeline.data.shards import ImageFolderError, pixels_of

        shard = self.stream.manifest["shards"]["train"][piece.shard]

        def read() -> Any:
            try:
                return self._open(piece.shard).read_row_group(piece.group, columns=["image", "label"])
            except OSError:
                self._close(piece.shard)  # a connection broken mid-read: the next try opens the file again
                raise

        where = f"{self.stream.location}/{shard['file']} row group {piece.group}"
        try:
            # A passing fault (S3 throttling, a reset) is retried, and one that lasts is Unavailable: neither is a
            # reason to prepare the folder again.
            table = retried(read, where, final=(FileNotFoundError,))
            pixels = pixels_of(table.column("image").combine_chunks(), self.stream.image_shape)
            labels = table.column("label").to_numpy().astype(np.int64)
        except Unavailable:
            raise
        except (OSError, ValueError, pa.ArrowException) as exc:  # a shard removed, cut or changed since
            raise ImageFolderError(
                f"{self.stream.location}/{shard['file']} row group {piece.group} cannot be read ({exc}); prepare "
                "the folder again: python -m pipeline data prepare --dataset images ..."
            ) from None
        if hashlib.sha256(pixels.tobytes()).hexdigest() != shard["group_sha256"][piece.group]:
            raise ImageFolderError(
                f"{self.stream.location}/{shard['file']} row group {piece.group} fails its SHA-256 check (changed "
                "or corrupted); prepare the folder again: python -m pipeline data prepare --dataset images ..."
            )
        return pixels[piece.lo : piece.hi], labels[piece.lo : piece.hi]

    def _open(self, number: int) -> Any:
        """Shard ``number`` as a ParquetFile, opened once; the least recently opened closes past
        :data:`OPEN_SHARDS`: a few files open, however many shards."""
        import pyarrow.parquet as pq

        from pipeline.data.shards import filesystem

        if number not in self.files:
            fs, base = filesystem(self.stream.location)
            handle = fs.open_input_file(f"{base}/{self.stream.manifest['shards']['train'][number]['file']}")
            try:
                self.files[number] = (pq.ParquetFile(handle), handle)
            except BaseException:
                handle.close()
                raise
            if len(self.files) > OPEN_SHARDS:
                self.files.pop(next(iter(self.files)))[1].close()
        return self.files[number][0]

    def _close(self, number: int) -> None:
        opened = self.files.pop(number, None)
        if opened is not None:
            opened[1].close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        for _, handle in self.files.values():
            handle.close()
        self.files.clear()
