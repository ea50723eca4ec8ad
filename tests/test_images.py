"""A folder of your own images (pipeline.data.images): prepared into Parquet shards and a manifest, reused while it
matches, bad folders refused before anything is written; the networks and the loop on 64x64 RGB."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.images import list_folder, prepare_folder
from pipeline.data.pixels import decode
from pipeline.data.shards import ImageFolderError, Preparation, iter_shards
from tests.conftest import run_cli
from tests.image_folders import SHAPES, draw, make_folder

PER_CLASS = 40


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folders") / "shapes", PER_CLASS)


def prepare(source: Path, out: Path, size: int = 64, channels: int = 3, said: list | None = None):
    say = said.append if said is not None else (lambda _: None)
    return prepare_folder(Preparation(str(source), str(out), size, channels, 0.1), say, workers=2)


def test_a_labelled_folder_becomes_checked_shards_with_a_stable_held_out_split(shapes, tmp_path):
    said: list[str] = []
    out = tmp_path / "prepared"
    prepared = prepare(shapes, out, said=said)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == sorted(SHAPES) and manifest["image_size"] == 64 and manifest["channels"] == 3
    # Two broken files skipped and named; every good image in exactly one split.
    assert manifest["skipped"] == 2
    assert sorted(f.split(":")[0] for f in manifest["skipped_files"]) == ["circle/cut.png", "circle/notes.png"]
    train, test = prepared.count("train"), prepared.count("test")
    assert train + test == 3 * PER_CLASS and 0 < test < train
    for split in ("train", "test"):
        for shard in manifest["shards"][split]:
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    images, labels = (np.concatenate(parts) for parts in zip(*iter_shards(prepared, "train"), strict=True))
    assert images.shape == (train, 3, 64, 64) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    # Classes are mixed within a shard (a shuffled order), not one class after another.
    assert len(set(labels[:20].tolist())) > 1

    # Preparing again: nothing written.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(shapes, out, said=said)
    assert "nothing to do" in said[-1] and again.manifest == prepared.manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # One more image: prepared again, the old shards removed, every image kept in the split it had.
    def splits(p):
        return {split: p.count(split) for split in ("train", "test")}

    before = splits(prepared)
    draw("square", np.random.default_rng(9), 70, 50).save(shapes / "square" / "extra.png")
    try:
        third = prepare(shapes, out)
    finally:
        (shapes / "square" / "extra.png").unlink()
    after = splits(third)
    assert sum(after.values()) == sum(before.values()) + 1 and all(after[s] >= before[s] for s in before)
    files = {p.name for p in out.iterdir()}
    assert files == {"manifest.json", *(s["file"] for split in third.manifest["shards"].values() for s in split)}


def test_an_image_is_centre_cropped_and_resized_in_grey_or_colour():
    from PIL import Image

    # 120x60: a red left margin and a blue right one (30 px each) around a green square, the crop.
    pixels = np.zeros((60, 120, 3), np.uint8)
    pixels[:, :30, 0] = 255
    pixels[:, 30:90, 1] = 255
    pixels[:, 90:, 2] = 255
    blob = _png(Image.fromarray(pixels))
    colour = decode(blob, "a.png", 32, 3)
    assert colour.shape == (3, 32, 32)
    assert (colour[1] == 255).all() and (colour[0] == 0).all() and (colour[2] == 0).all()  # only the square
    grey = decode(blob, "a.png", 32, 1)
    assert grey.shape == (1, 32, 32) and (grey == round(0.587 * 255)).all()  # ITU-R 601-2 luma of green
    with pytest.raises(Exception):  # noqa: B017 - whatever Pillow raises: the preparer counts it as skipped
        decode(blob[: len(blob) // 2], "a.png", 32, 3)


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_unlabelled_folder_has_no_classes(tmp_path):
    source = make_folder(tmp_path / "flat", 10, labelled=False, broken=False)
    prepared = prepare(source, tmp_path / "out", size=32, channels=1)
    assert prepared.manifest["classes"] == []
    labels = np.concatenate([labels for _, labels in iter_shards(prepared, "train")])
    assert (labels == -1).all() and prepared.image_shape == (1, 32, 32)


def test_folders_that_cannot_be_prepared_are_refused_before_anything_is_written(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    mixed = make_folder(tmp_path / "mixed", 2, broken=False)
    draw("circle", np.random.default_rng(0), 50, 50).save(mixed / "loose.png")
    with pytest.raises(ImageFolderError, match="holds no images"):
        list_folder(str(empty))
    with pytest.raises(ImageFolderError, match="has images at its top .* and in subfolders"):
        list_folder(str(mixed))
    cases = [
        (["--path", str(tmp_path / "missing"), "--image-size", "64"], "is not a folder"),
        (["--path", str(empty), "--image-size", "64"], "holds no images"),
        (["--path", str(mixed), "--image-size", "48"], "--image-size: 48; images are prepared at one of 32, 64, 128"),
        (["--path", str(mixed), "--image-size", "64", "--channels", "2"], "--channels: 2; use 1 (grey) or 3"),
        (["--path", "s3:/bucket/photos", "--image-size", "64"], "use s3://bucket/photos"),
        (["--image-size", "64"], "--path: not set"),
    ]
    for args, message in cases:
        done = run_cli("data", "prepare", "--dataset", "images", *args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mixed"]  # nothing prepared beside them


def test_a_64px_rgb_run_trains_and_samples_in_colour(shapes, tmp_path):
    """The loop, the networks and the sample grid on 64x64 RGB images read back from the shards."""
    from pipeline.config.load import load_config
    from pipeline.data.kinds import load, source_of
    from pipeline.gan.loop import train_gan
    from pipeline.gan.sampling import fixed_noise, sample_images
    from tests.conftest import CONFIGS

    overrides = [
        "data.dataset=images",
        f"data.path={shapes}",
        "data.image_size=64",
        "data.channels=3",
        f"data.prepared={tmp_path / 'prepared'}",
        "data.limit=null",
        "eval.every_epochs=0",
        "train.epochs=1",
    ]
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    assert source_of(cfg.data).prepare(lambda _: None) > 64
    data = load(cfg.data)
    assert data.images.shape[1:] == (3, 64, 64)
    result = train_gan(cfg, data)
    assert result.state.step == len(data) // cfg.train.batch_size
    grid = sample_images(result.generator, fixed_noise(cfg.model.latent_dim, 0, torch.device("cpu")))
    assert grid.shape == (64, 3, 64, 64) and grid.dtype == torch.uint8


def test_the_held_out_share_travels_from_prepare_to_training(shapes, tmp_path):
    """data.test_fraction is what `data prepare --test-fraction` wrote: training finds the preparation it made."""
    from pipeline.config.schema import DataConfig
    from pipeline.data.kinds import source_of

    said: list[str] = []
    data = DataConfig(
        dataset="images", path=str(shapes), image_size=32, channels=3, prepared=str(tmp_path / "p"), test_fraction=0.3
    )
    done = run_cli(
        "data",
        "prepare",
        "--dataset",
        "images",
        "--path",
        str(shapes),
        "--image-size",
        "32",
        "--channels",
        "3",
        "--out",
        str(tmp_path / "p"),
        "--test-fraction",
        "0.3",
    )
    assert done.returncode == 0 and "--set data.test_fraction=0.3" in done.stdout, done.stderr
    train = source_of(data).prepare(said.append)
    assert "nothing to do" in said[-1] and 0.6 < train / (3 * PER_CLASS) < 0.8
    # None held out: no evaluator can be tested, so FID/IS are not available, and the reason says so.
    nothing = DataConfig(
        dataset="images", path=str(shapes), image_size=32, channels=3, prepared=str(tmp_path / "q"), test_fraction=0.0
    )
    source_of(nothing).prepare(said.append)
    from pipeline.config.load import load_config
    from tests.conftest import CONFIGS

    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.{k}={v}" for k, v in vars(nothing).items() if v is not None])
    assert "holds out 0 image(s) for 3 classes" in source_of(cfg.data).scores_unavailable()


def test_a_small_folder_s_evaluator_trains_its_minimum_steps(monkeypatch):
    """Fewer training images than a batch: every step takes them all, and there are at least 600 steps."""
    from pipeline.data.specs import DatasetSpec
    from pipeline.data.split import Split
    from pipeline.eval.classifier import train_classifier

    steps = []
    original = torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    spec = DatasetSpec("images", "", 32, 3, 2, 0, 0.8, evaluator_min_steps=40)
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.arange(50) % 2)
    train_classifier(spec, split, split, progress=lambda _: None)
    assert len(steps) == 40


def test_preparing_never_deletes_or_overwrites_what_it_did_not_write(shapes, tmp_path):
    from pipeline.data.images import SHARD_NAME

    # A manifest.json that is not a preparation's: refused, nothing touched.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"project": "mine"}')
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ImageFolderError, match="not a prepared image folder's"):
        prepare(shapes, foreign, size=32)
    assert (foreign / "manifest.json").read_text() == '{"project": "mine"}' and (foreign / "notes.txt").exists()
    # An earlier preparation's manifest that (edited by hand) lists a file of the user's: only shards go.
    out = tmp_path / "ours"
    first = prepare(shapes, out, size=32)
    manifest = dict(first.manifest)
    manifest["shards"] = {"train": [*manifest["shards"]["train"], {"file": "important.doc"}], "test": []}
    manifest["image_size"] = 64  # so the next preparation does not reuse it
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "important.doc").write_text("mine")
    prepare(shapes, out, size=32)
    assert (out / "important.doc").read_text() == "mine"
    left = sorted(p.name for p in out.iterdir() if not SHARD_NAME.fullmatch(p.name))
    assert left == ["important.doc", "manifest.json"]


def test_a_folder_of_broken_files_is_refused_with_the_reasons_and_nothing_left_behind(tmp_path):
    broken = tmp_path / "broken" / "cats"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not an image")
    (broken / "b.jpg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(ImageFolderError, match=r"none of its 2 images decoded \(e\.g\. cats/a\.png: "):
        prepare(tmp_path / "broken", tmp_path / "out", size=32)
    assert not (tmp_path / "out").exists()
