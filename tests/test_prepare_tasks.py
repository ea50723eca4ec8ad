"""A folder prepared as Ray tasks (pipeline.distributed.prepare_tasks) on a real local Ray: the local preparation's
shards and manifest, byte for byte; a file that stays unreadable fails it naming the file, raised as itself; a
bucket listed past its 1,000-key pages. That the tasks spread over two nodes: tests/test_multinode.py."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.data import images
from pipeline.data.images import list_folder, prepare_folder, settings, shard_plans
from pipeline.data.shards import ImageFolderError, Preparation
from pipeline.distributed.prepare_tasks import RayShardMaker, _answer, on_ray
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


def test_a_file_that_stays_unreadable_fails_the_tasks_naming_it(local_ray, tmp_path):
    folder = make_folder(tmp_path / "few", 4, broken=False)
    listing = list_folder(str(folder))
    job = Preparation(str(folder), str(tmp_path / "out"), 32, 3, 0.1)
    gone = listing.files[3][0]
    (folder / gone).unlink()  # listed, then gone: no broken image, a read that fails
    plans = shard_plans(listing, job, settings(listing, 32, 3, 0.1, "white"))
    with pytest.raises(ImageFolderError, match=f"{gone}.*nothing is recorded as skipped") as caught:
        list(RayShardMaker().make(listing, job, plans))
    assert type(caught.value) is ImageFolderError  # as itself, not Ray's wrapper with a remote traceback
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_task_error_other_than_the_users_keeps_rays_report(local_ray):
    import ray

    @ray.remote
    def broken():
        raise KeyError("a bug")

    with pytest.raises(ray.exceptions.RayTaskError, match="a bug"):
        _answer(broken.remote())


def test_auto_prepares_on_ray_inside_ray_or_with_a_cluster_named(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a command on one machine, before Ray starts
    assert on_ray("ray") and not on_ray("local") and not on_ray("auto")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # inside a trial, or a driver that started Ray
    assert on_ray("auto")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert on_ray("auto") and not on_ray("local")
    with pytest.raises(ValueError, match="use one of auto, local, ray"):
        on_ray("cluster")


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
