"""A worker's batches (pipeline.data.batches): an image folder's shards streamed in row groups, each worker its own
disjoint part, reshuffled per epoch and deterministic by seed, resumable inside an epoch, checked by SHA-256;
a run trained on the stream resumes inside an epoch exactly."""

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import batches, images, shard_making
from pipeline.data.batches import Plan, Streamed
from pipeline.data.images import prepare_folder
from pipeline.data.shards import ImageFolderError, Preparation
from tests.image_folders import make_folder

ONE = 3 * 32 * 32  # bytes of one 32x32 RGB image


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """150 images of 32x32 RGB in row groups of 8 (small groups and windows: many of both)."""
    base = tmp_path_factory.mktemp("stream")
    source = make_folder(base / "shapes", 50, broken=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard_making, "GROUP_BYTES", 8 * ONE)
        patch.setattr(images, "SHARD_BYTES", 40 * ONE)  # several shards too
        return prepare_folder(Preparation(str(source), str(base / "out"), 32, 3, 0.1), lambda _: None, workers=2)


@pytest.fixture(autouse=True)
def small_windows(monkeypatch):
    monkeypatch.setattr(batches, "WINDOW_BYTES", 20 * ONE)  # windows of 3 row groups


def folder_overrides(prepared) -> list[str]:
    """Config overrides that train on the prepared folder of the fixture."""
    return [
        "data.dataset=images",
        f"data.path={prepared.manifest['source']}",
        "data.image_size=32",
        "data.channels=3",
        f"data.prepared={prepared.location}",
        "data.limit=null",
    ]


def digests(batch: torch.Tensor) -> list[str]:
    return [hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in batch]


def epoch_of(stream: Streamed, epoch: int, rank: int, world: int, first: int = 0, seed: int = 0) -> list[torch.Tensor]:
    local = 12 // world
    steps = len(stream) // 12
    return list(stream.epoch(epoch, first, Plan(seed, rank, world, local, steps, torch.device("cpu"))))


def test_workers_stream_disjoint_parts_reshuffled_each_epoch_and_the_same_for_the_same_seed(prepared):
    stream = Streamed(prepared.location, prepared.manifest)
    assert len(stream) == prepared.count("train") and len(prepared.manifest["shards"]["train"]) > 1
    steps = len(stream) // 12
    one = epoch_of(stream, 0, 0, 1)
    assert len(one) == steps and all(b.shape == (12, 3, 32, 32) for b in one)
    # Two workers: each its own rows, none shared, together as many as one process trains.
    parts = [sum((digests(b) for b in epoch_of(stream, 0, rank, 2)), []) for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == steps * 6
    assert not set(parts[0]) & set(parts[1]) and len(set(parts[0] + parts[1])) == steps * 12
    # Deterministic by seed; another epoch or seed, another order.
    flat = sum((digests(b) for b in one), [])
    assert flat == sum((digests(b) for b in epoch_of(stream, 0, 0, 1)), [])
    assert flat != sum((digests(b) for b in epoch_of(stream, 1, 0, 1)), [])
    assert flat != sum((digests(b) for b in epoch_of(stream, 0, 0, 1, seed=1)), [])
    # Inside an epoch: from step 5 on, the batches it would have had.
    later = epoch_of(stream, 3, 1, 2, first=5)
    assert [digests(b) for b in later] == [digests(b) for b in epoch_of(stream, 3, 1, 2)[5:]]
    # data.limit: the first rows of the split only.
    assert len(Streamed(prepared.location, prepared.manifest, limit=30)) == 30


def rows_trained(data, epoch: int, segments: list[tuple[int, int]], steps: int, batch: int = 12) -> Counter:
    """Digests of every row the workers train in ``epoch`` when its worker counts are ``segments`` ((count, first
    step) each, as the loop records them) and each count trains until the next one begins (the last to the end)."""
    trained: Counter = Counter()
    for k, (world, first) in enumerate(segments):
        last = segments[k + 1][1] if k + 1 < len(segments) else steps
        for rank in range(world):
            plan = Plan(0, rank, world, batch // world, steps, torch.device("cpu"))
            for i, b in enumerate(data.epoch(epoch, first, plan, segments[:k] or [(world, 0)])):
                if first + i >= last:
                    break
                trained.update(digests(b[0] if isinstance(b, tuple) else b))
    return trained


@pytest.mark.parametrize(
    "segments",
    [
        [(4, 0), (2, 5)],  # 4 -> 2 workers at step 5
        [(2, 0), (4, 3)],
        [(1, 0), (3, 2)],  # 3 divides the batch of 12, not the lanes' rows
        [(3, 0), (2, 1), (4, 6)],  # two resizes in one epoch
        [(2, 0), (6, 7)],
    ],
)
def test_after_a_resize_inside_an_epoch_every_row_is_trained_once(prepared, segments):
    """The rows of the first f steps at N workers and those after the resume at M form one permutation of the
    epoch's rows: none twice, none left out (streamed, and in memory)."""
    stream = Streamed(prepared.location, prepared.manifest)
    steps = len(stream) // 12
    whole = rows_trained(stream, 2, [(1, 0)], steps)
    assert sum(whole.values()) == steps * 12
    assert rows_trained(stream, 2, segments, steps) == whole
    memory = batches.InMemory(torch.from_numpy(np.stack([np.full((3, 4, 4), i % 251) for i in range(150)])), "cpu")
    memory.images[:, 0, 0, 0] = torch.arange(150) // 251  # every image its own
    memory.images[:, 1, 0, 0] = torch.arange(150) % 251
    assert rows_trained(memory, 2, segments, 12) == rows_trained(memory, 2, [(1, 0)], 12)


def test_a_changed_row_group_is_refused(prepared, tmp_path):
    manifest = json.loads(json.dumps(prepared.manifest))
    manifest["shards"]["train"][0]["group_sha256"][1] = "0" * 64  # as if the pixels changed
    stream = Streamed(prepared.location, manifest)
    with pytest.raises(ImageFolderError, match="row group 1 fails its SHA-256 check"):
        for world_rank in range(2):
            epoch_of(stream, 0, world_rank, 2)


def test_a_streamed_run_resumed_inside_an_epoch_ends_where_the_straight_one_does(prepared, tmp_path):
    from pipeline.config.load import load_config
    from pipeline.data.kinds import source_of
    from pipeline.gan.hooks import On
    from pipeline.gan.loop import train_gan
    from pipeline.gan.state import weights_digest
    from tests.conftest import CONFIGS

    overrides = [
        *folder_overrides(prepared),
        "data.stream=true",
        "eval.every_epochs=0",
        "train.batch_size=12",  # resumed at step 3: 36 rows in, inside the second window of 24
        "train.epochs=2",
        "tune.report_every_steps=3",
    ]
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    data = source_of(cfg.data).batches(torch.device("cpu"), lambda _: None)
    assert isinstance(data, Streamed)
    checkpoints = []

    def keep(report):  # copies: a report's state_dict holds the live tensors, which training changes
        checkpoints.append(copy.deepcopy(report.checkpoint))

    straight = train_gan(cfg, data, hooks=[On(report=keep)])
    inside = next(c for c in checkpoints if c and c["step"] % (len(data) // 12))  # taken inside an epoch
    resumed = train_gan(cfg, data, resume=inside)
    assert resumed.step == straight.step
    runs = (straight, resumed)
    digest = [weights_digest(r.state.generator.state_dict(), r.state.discriminator.state_dict()) for r in runs]
    assert digest[0] == digest[1]
    # The checkpoint keeps the epoch's worker counts; resumed by another count, the loop hands them on, its own added.
    assert inside["epoch_partial"]["worlds"] == [(1, 0)]
    asked = []
    real_epoch = Streamed.epoch

    def spy(self, epoch, first, plan, worlds=()):
        asked.append((epoch, first, list(worlds)))
        return real_epoch(self, epoch, first, plan, worlds)

    as_if_two = copy.deepcopy(inside)
    as_if_two["epoch_partial"]["worlds"] = [(2, 0)]  # as if two workers had trained its first steps
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Streamed, "epoch", spy)
        train_gan(cfg, data, resume=as_if_two)
    first = inside["step"] % (len(data) // 12)
    assert asked[0] == (inside["epoch"], first, [(2, 0), (1, first)])


def test_the_reader_thread_stops_when_the_epoch_is_closed_early(prepared):
    import threading

    stream = Streamed(prepared.location, prepared.manifest)
    batches = stream.epoch(0, 0, Plan(0, 0, 1, 12, len(stream) // 12, torch.device("cpu")))
    next(batches)
    assert any(t.name == "shard-reader" for t in threading.enumerate())
    batches.close()
    assert not any(t.name == "shard-reader" and t.is_alive() for t in threading.enumerate())


def test_a_folder_s_split_read_in_part_is_its_first_images(prepared, monkeypatch):
    """`most` (the evaluator's cap on a large folder) reads only the shards that hold the first images."""
    from pipeline.config.schema import DataConfig
    from pipeline.data import shards
    from pipeline.data.kinds import load

    data = DataConfig(
        dataset="images", path=prepared.manifest["source"], image_size=32, channels=3, prepared=prepared.location
    )
    whole = load(data)
    read = []
    original = shards.read_shard
    monkeypatch.setattr(shards, "read_shard", lambda *a: read.append(a[1]["file"]) or original(*a))
    part = load(data, most=10)
    assert torch.equal(part.images, whole.images[:10]) and torch.equal(part.labels, whole.labels[:10])
    assert read == [prepared.manifest["shards"]["train"][0]["file"]]  # 10 fit in the first shard


def test_a_cut_shard_is_refused_in_one_line(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared.location, copy)
    first = copy / prepared.manifest["shards"]["train"][0]["file"]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # cut: its footer is gone
    stream = Streamed(str(copy), prepared.manifest)
    with pytest.raises(ImageFolderError, match="cannot be read"):
        epoch_of(stream, 0, 0, 1)


def test_a_resume_on_images_that_changed_since_the_run_began_is_refused(prepared, tmp_path):
    """The run records its prepared content; a resume finds the folder's files or its preparation changed and
    says so before anything is prepared again."""
    from pipeline.config.load import load_config
    from pipeline.core.errors import ConfigError
    from pipeline.data.kinds import source_of
    from pipeline.data.source import DATA_TAG
    from tests.conftest import CONFIGS

    source = prepared.manifest["source"]
    cfg = load_config(CONFIGS / "smoke.yaml", folder_overrides(prepared))
    tags = {DATA_TAG: prepared.manifest["digest"]}  # what the run recorded when it began
    folder = source_of(cfg.data)
    folder.check_resume(tags, "r")  # the same images: on it goes
    extra = Path(source) / "circle" / "late.png"
    extra.write_bytes((Path(source) / "circle" / "circle-0000.png").read_bytes())
    try:
        with pytest.raises(ConfigError, match="no longer holds the images run 'r' began with"):
            folder.check_resume(tags, "r")
    finally:
        extra.unlink()
    black = source_of(load_config(CONFIGS / "smoke.yaml", [*folder_overrides(prepared), "data.background=black"]).data)
    with pytest.raises(ConfigError, match=r"other settings \(background: '#ffffff' then, '#000000' now\)"):
        black.check_resume(tags, "r")  # before preparing again would replace the run's images
    tags[DATA_TAG] = "0" * 64  # another preparation since
    with pytest.raises(ConfigError, match="began with"):
        folder.check_resume(tags, "r")


def test_a_worker_refuses_a_preparation_other_than_the_one_its_run_began_with(prepared, tmp_path):
    """The driver pins the source to the manifest's digest; a worker that starts (or restarts) after the folder was
    prepared again stops, saying so, instead of training on other images."""
    import pickle
    import shutil

    from pipeline.config.load import load_config
    from pipeline.data.kinds import source_of
    from tests.conftest import CONFIGS

    copy_of = tmp_path / "prepared"
    shutil.copytree(prepared.location, copy_of)
    overrides = [*folder_overrides(prepared), f"data.prepared={copy_of}"]
    pinned = source_of(load_config(CONFIGS / "smoke.yaml", overrides).data).pinned()
    worker = pickle.loads(pickle.dumps(pinned))  # as Ray hands the job to a worker
    assert len(worker.batches(torch.device("cpu"), lambda _: None)) == prepared.count("train")
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["digest"] = "f" * 64  # prepared again, other images
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImageFolderError, match="was prepared again since the run began .*start a new run"):
        worker.batches(torch.device("cpu"), lambda _: None)


def test_batches_with_labels_pair_each_image_with_its_own_class(prepared):
    """Plan.labels (a conditional GAN's batches): streamed, from the start and resumed inside an epoch, and in
    memory, every image comes with the label its shard row holds."""
    from pipeline.data.batches import InMemory
    from pipeline.data.shards import iter_shards

    shards = list(iter_shards(prepared, "train"))
    images_all = torch.from_numpy(np.concatenate([p for p, _ in shards]))
    labels_all = torch.from_numpy(np.concatenate([lab for _, lab in shards]))
    label_of = dict(zip(digests(images_all), labels_all.tolist(), strict=True))
    assert len(set(label_of.values())) == 3  # the fixture's three shapes
    stream = Streamed(prepared.location, prepared.manifest)
    steps = len(stream) // 12
    for rank, world, first in ((0, 1, 0), (1, 2, 0), (0, 2, 3)):
        plan = Plan(0, rank, world, 12 // world, steps, torch.device("cpu"), labels=True)
        pairs = list(stream.epoch(0, first, plan))
        plain = epoch_of(stream, 0, rank, world, first)
        assert len(pairs) == steps - first
        for (pictures, labels), alone in zip(pairs, plain, strict=True):
            assert torch.equal(pictures, alone)  # the same images as without labels
            assert labels.tolist() == [label_of[d] for d in digests(pictures)]
    memory = InMemory(images_all, torch.device("cpu"), labels_all)
    for pictures, labels in memory.epoch(1, 0, Plan(0, 1, 2, 6, 10, torch.device("cpu"), labels=True)):
        assert labels.tolist() == [label_of[d] for d in digests(pictures)]
    with pytest.raises(ValueError, match="labels asked of images held without them"):
        next(InMemory(images_all, torch.device("cpu")).epoch(0, 0, Plan(0, 0, 1, 6, 10, torch.device("cpu"), True)))


def test_a_conditional_gan_trains_on_a_streamed_folder_of_classes(prepared):
    """The labels streamed with their images drive a conditional GAN: its class frequencies are the folder's, its
    grid a row per class, and its end-of-run memorisation grid reads the stream's images alone."""
    from pipeline.config.load import load_config
    from pipeline.gan.hooks import Hook
    from pipeline.gan.loop import train_gan
    from pipeline.gan.views import NEAREST_NEIGHBOURS, NEAREST_SAMPLES
    from tests.conftest import CONFIGS

    grids: dict = {}

    class Grids(Hook):
        def on_samples(self, images, name):
            grids[name] = images

    cfg = load_config(
        CONFIGS / "smoke.yaml",
        [*folder_overrides(prepared), "model.conditional=true", "train.epochs=1", "train.batch_size=12"],
    )
    stream = Streamed(prepared.location, prepared.manifest)
    result = train_gan(cfg, stream, hooks=[Grids()])
    counts = stream.class_counts()
    assert len(counts) == 3 and int(counts.sum()) == len(stream)
    assert torch.equal(result.state.generator.class_weights, counts.double() / counts.sum())
    assert grids["samples/epoch_001.png"].shape == (3 * 8, 3, 32, 32)
    assert grids["samples/nearest_training.png"].shape == (NEAREST_SAMPLES * (NEAREST_NEIGHBOURS + 1), 3, 32, 32)


def test_a_passing_read_fault_mid_epoch_is_retried_and_a_lasting_one_is_unavailable(prepared, monkeypatch):
    """Row-group reads that fail (S3 throttling, a reset) are retried with the shard opened again: the epoch is the
    same as a clean one. A fault that lasts says "unavailable, retry", never "prepare the folder again"."""
    from pipeline.core import retry
    from pipeline.core.retry import Unavailable

    monkeypatch.setattr(retry, "FIRST_WAIT_S", 0.001)
    stream = Streamed(prepared.location, prepared.manifest)
    clean = epoch_of(stream, 0, 0, 1)
    faults, opened = {"left": 3}, []
    real_open = batches.WindowReader._open

    def flaky_open(self, number):
        parquet = real_open(self, number)
        opened.append(number)

        class Flaky:
            def read_row_group(self, *args, **kwargs):
                if faults["left"] > 0:
                    faults["left"] -= 1
                    raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset")
                return parquet.read_row_group(*args, **kwargs)

        return Flaky()

    monkeypatch.setattr(batches.WindowReader, "_open", flaky_open)
    again = epoch_of(stream, 0, 0, 1)
    assert faults["left"] == 0 and len(opened) >= 3  # every fault was hit, the shard opened again after each
    assert all(torch.equal(a, b) for a, b in zip(clean, again, strict=True))
    faults["left"] = 10**6
    with pytest.raises(Unavailable, match=r"row group \d+ is unavailable: 4 reads failed .* retry when it is reach"):
        epoch_of(stream, 0, 0, 1)
