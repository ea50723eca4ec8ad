"""A folder prepared as Ray tasks (pipeline.distributed.prepare_tasks) on a real local Ray: the local preparation's
shards and manifest, byte for byte; a file that stays unreadable fails it naming the file, raised as itself; a
bucket listed past its 1,000-key pages. That the tasks spread over two nodes: tests/test_multinode.py."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.data import images
from pipeline.data.images import list_folder, prepare_folder
from pipeline.data.shard_making import ShardMaker, decode_chunk, shard_from_chunks
from pipeline.data.shards import ImageFolderError, Preparation
from pipeline.distributed.prepare_tasks import RayShardMaker, _answer, shard_maker
from tests.image_folders import make_folder


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folders") / "shapes", 40)  # 120 images and two broken files


def test_shards_made_as_ray_tasks_are_the_local_ones_byte_for_byte(local_ray, shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "SHARD_BYTES", 3 * 32 * 32 * 40)  # 40 images a shard: several shards at once
    monkeypatch.setattr(images, "DECODE_CHUNK", 8)  # 5 decoding tasks a shard
    said: list[str] = []
    local = prepare_folder(Preparation(str(shapes), str(tmp_path / "local"), 32, 3, 0.1), said.append, workers=2)
    maker = RayShardMaker()
    tasks = prepare_folder(Preparation(str(shapes), str(tmp_path / "tasks"), 32, 3, 0.1), said.append, maker=maker)
    assert len(local.manifest["shards"]["train"]) >= 3 and local.manifest["skipped"] == 2
    assert {k: v for k, v in tasks.manifest.items() if k != "prepare_s"} == {
        k: v for k, v in local.manifest.items() if k != "prepare_s"
    }
    for shard in [s for split in local.manifest["shards"].values() for s in split]:
        assert (tmp_path / "tasks" / shard["file"]).read_bytes() == (tmp_path / "local" / shard["file"]).read_bytes()
    written = json.loads((tmp_path / "tasks" / "manifest.json").read_text())
    assert written["digest"] == local.manifest["digest"]
    assert any(line.endswith("on 2 local process(es))") for line in said)
    assert "Ray tasks on 1 node(s)" in said[-1] and 0 < maker.peak_rss < 4 << 30


def test_a_file_that_stays_unreadable_fails_the_tasks_naming_it(local_ray, tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "few", 4, broken=False)
    job = Preparation(str(folder), str(tmp_path / "out"), 32, 3, 0.1)
    listing = list_folder(str(folder))
    gone = listing.files[3][0]
    monkeypatch.setattr(images, "list_folder", lambda path: listing)  # listed, then gone: a read that fails
    (folder / gone).unlink()
    with pytest.raises(ImageFolderError, match=f"{gone}.*nothing is recorded as skipped") as caught:
        prepare_folder(job, lambda _: None, maker=RayShardMaker())
    assert type(caught.value) is ImageFolderError  # as itself, not Ray's wrapper with a remote traceback
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / images.PREPARING).exists()


def test_shards_the_driver_does_not_see_stop_the_preparation_before_its_manifest(shapes, tmp_path):
    """Tasks on another node writing to a local path write another node's folder: no manifest says done."""

    class Elsewhere(ShardMaker):  # writes each shard where this process does not look
        def make(self, listing, job, plans):
            other = Preparation(job.path, str(tmp_path / "other-node"), job.image_size, job.channels, 0.1)
            for plan in plans:
                yield shard_from_chunks(
                    other, listing.classes, plan, [decode_chunk(listing.root, c, job) for c in plan.chunks]
                )

    with pytest.raises(ImageFolderError, match="not one shared folder; prepare into s3://"):
        prepare_folder(Preparation(str(shapes), str(tmp_path / "out"), 32, 3, 0.1), lambda _: None, maker=Elsewhere())
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_task_error_other_than_the_users_keeps_rays_report(local_ray):
    import ray

    @ray.remote
    def broken():
        raise KeyError("a bug")

    with pytest.raises(ray.exceptions.RayTaskError, match="a bug"):
        _answer(broken.remote())


def test_auto_prepares_on_ray_only_with_a_cluster_and_both_paths_in_an_object_store(monkeypatch, tmp_path):
    from pipeline.config.schema import DataConfig
    from pipeline.data.kinds import source_of

    def folder(path: str, prepared: str | None = None):
        return source_of(DataConfig(dataset="images", path=path, prepared=prepared))

    on_s3, on_disk = folder("s3://b/faces"), folder(str(tmp_path / "faces"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert shard_maker(on_s3) is None and isinstance(shard_maker(on_disk, "ray"), RayShardMaker)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert isinstance(shard_maker(on_s3), RayShardMaker) and shard_maker(on_s3).shared
    assert shard_maker(on_disk) is None  # a local path is another folder on each node
    assert shard_maker(folder("s3://b/faces", str(tmp_path / "out"))) is None
    assert not shard_maker(on_disk, "ray").shared  # asked for: said to need one shared folder
    assert shard_maker(on_s3, "local") is None and shard_maker(source_of(DataConfig(dataset="mnist")), "ray") is None
    with pytest.raises(ValueError, match="use one of auto, local, ray"):
        shard_maker(on_s3, "cluster")


def test_a_bucket_is_listed_past_its_1000_key_pages(tmp_path):
    from tests.servers import S3Server

    server = S3Server(tmp_path)
    try:
        server.make_bucket("many")
        client = server.client()
        names = [f"photos/img-{i:05d}.png" for i in range(2500)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda key: client.put_object(Bucket="many", Key=key, Body=b"x"), names))
        with pytest.MonkeyPatch.context() as env:
            for key, value in server.env.items():
                env.setenv(key, value)
            listing = list_folder("s3://many/photos")
    finally:
        server.stop()
    assert [rel for rel, _ in listing.files] == [name.split("/", 1)[1] for name in names]


def test_on_ray_is_refused_for_data_prepared_as_it_is():
    from tests.conftest import run_cli

    result = run_cli("data", "prepare", "--dataset", "mnist", "--on", "ray", env={"RAY_ADDRESS": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--on ray: not for --dataset mnist, which is prepared as it is; drop it" in result.stderr
