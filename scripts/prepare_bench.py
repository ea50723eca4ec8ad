"""How fast a folder is prepared: images/s and images/s per CPU for small PNGs and for large JPEGs, in local
processes and as Ray tasks (pipeline.distributed.prepare_tasks), with the peak memory of a task's process; and, to
choose between plain Ray tasks and Ray Data, the decoding alone both ways. With --listing N, instead: how long an
S3 listing of N keys takes (moto's server on this machine), paged 1,000 keys at a time. Prints tables.

    python scripts/prepare_bench.py                        # 3,000 small PNGs and 120 large JPEGs, at 64x64 RGB
    python scripts/prepare_bench.py --pngs 6000 --jpegs 300 --cpus 2
    python scripts/prepare_bench.py --listing 100000

Every figure is measured here, on this machine: compare the rows of one run (this VM's speed varies from one
session to the next). The local Ray is started with --cpus CPUs, the local pool has as many processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_pngs(folder: Path, count: int) -> Path:
    """``count`` small RGB PNGs (40-96 px, a smooth gradient and noise: as hard to compress as thumbnails)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        h, w = (int(x) for x in rng.integers(40, 97, 2))
        ramp = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img-{i:06d}.png")
    return folder


def make_jpegs(folder: Path, count: int) -> Path:
    """``count`` large JPEGs (3024x4032, a phone photo's size; quality 90) of smooth colour fields and noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    h, w = 3024, 4032
    yy, xx = np.mgrid[0:h:8, 0:w:8]
    for i in range(count):
        field = np.stack([np.sin(xx / (200 + 50 * c) + i) * np.cos(yy / (300 + 40 * c)) for c in range(3)], -1)
        small = ((field + 1) * 127).astype(np.uint8)
        big = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        noisy = np.clip(np.asarray(big, np.int16) + rng.integers(-10, 11, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"photo-{i:04d}.jpg", quality=90)
    return folder


def prepare_both(folder: Path, out: Path, cpus: int) -> list[dict]:
    """Prepare ``folder`` locally and as Ray tasks: a row for each."""
    from pipeline.data.images import prepare_folder
    from pipeline.data.shards import Preparation
    from pipeline.distributed.prepare_tasks import RayShardMaker

    rows = []
    for how in ("local processes", "Ray tasks"):
        job = Preparation(str(folder), str(out / how.replace(" ", "-")), 64, 3, 0.1)
        maker = RayShardMaker() if how == "Ray tasks" else None
        started = time.perf_counter()
        prepared = prepare_folder(job, lambda _: None, workers=cpus, maker=maker)
        seconds = time.perf_counter() - started
        images = prepared.count("train") + prepared.count("test")
        peak = f"{maker.peak_rss / 2**20:.0f}" if maker else "-"
        rows.append({"how": how, "count": images, "s": seconds, "rate": images / seconds, "peak": peak})
    return rows


def decode_only(folder: Path) -> list[dict]:
    """The decoding alone, as plain Ray tasks of 64 images and as a Ray Data pipeline over the files."""

    import ray
    import ray.data

    from pipeline.data.images import list_folder
    from pipeline.data.pixels import decode
    from pipeline.data.shard_making import DECODE_CHUNK, decode_chunk
    from pipeline.data.shards import Preparation

    listing = list_folder(str(folder))
    rels = [rel for rel, _ in listing.files]
    job = Preparation(str(folder), "", 64, 3, 0.1)
    task = ray.remote(num_cpus=1)(decode_chunk)
    started = time.perf_counter()
    answers = ray.get(
        [task.remote(str(folder), rels[i : i + DECODE_CHUNK], job) for i in range(0, len(rels), DECODE_CHUNK)]
    )
    tasks_s = time.perf_counter() - started
    decoded = sum(len(kept) for kept, _, _ in answers)

    def decode_batch(batch: dict) -> dict:
        import numpy as np

        pairs = zip(batch["bytes"], batch["path"], strict=True)
        return {"pixels": np.stack([decode(blob, path, 64, 3).reshape(-1) for blob, path in pairs])}

    started = time.perf_counter()
    dataset = ray.data.read_binary_files([str(folder / rel) for rel in rels], include_paths=True)
    count = dataset.map_batches(decode_batch, batch_size=DECODE_CHUNK, num_cpus=1).count()
    data_s = time.perf_counter() - started
    return [
        {"how": "plain Ray tasks (decode only)", "count": decoded, "s": tasks_s, "rate": decoded / tasks_s},
        {"how": "Ray Data (decode only)", "count": count, "s": data_s, "rate": count / data_s},
    ]


def listing(keys: int) -> None:
    """Put ``keys`` tiny objects in a bucket on moto's server and list them as a preparation does."""
    import boto3

    from pipeline.data.images import list_folder
    from tests.servers import S3Server, _boto_credentials

    with tempfile.TemporaryDirectory() as tmp:
        server = S3Server(Path(tmp))
        try:
            server.make_bucket("many")
            s3 = boto3.client("s3", endpoint_url=server.endpoint, **_boto_credentials())
            started = time.perf_counter()
            with ThreadPoolExecutor(32) as pool:
                names = [f"photos/{i // 1000:03d}/img-{i:06d}.png" for i in range(keys)]
                list(pool.map(lambda key: s3.put_object(Bucket="many", Key=key, Body=b"x"), names))
            put_s = time.perf_counter() - started
            os.environ.update(server.env)
            started = time.perf_counter()
            found = list_folder("s3://many/photos")
            list_s = time.perf_counter() - started
        finally:
            server.stop()
    print("| keys put | put (s) | keys listed | pages of 1,000 | listing (s) | keys/s listed |")
    print("|---|---|---|---|---|---|")
    pages = -(-keys // 1000)
    print(f"| {keys} | {put_s:.1f} | {len(found.files)} | {pages} | {list_s:.1f} | {len(found.files) / list_s:.0f} |")
    if len(found.files) != keys:
        raise SystemExit(f"listed {len(found.files)} of {keys} keys")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pngs", type=int, default=3000, help="small PNGs (default 3000)")
    parser.add_argument("--jpegs", type=int, default=120, help="large JPEGs, 3024x4032 (default 120)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for both ways (default all)")
    parser.add_argument("--listing", type=int, default=0, help="instead: list a bucket of this many keys")
    args = parser.parse_args()
    if args.listing:
        listing(args.listing)
        return
    import logging

    import ray

    from pipeline.distributed.ray_runtime import init_ray

    os.environ["RAY_ADDRESS"] = ""  # a local Ray of --cpus CPUs, as the local pool has
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        print(f"[bench] making {args.pngs} small PNGs and {args.jpegs} large JPEGs in {base}", flush=True)
        folders = {
            "small PNGs": make_pngs(base / "pngs", args.pngs),
            "large JPEGs": make_jpegs(base / "jpegs", args.jpegs),
        }
        print(f"| folder | how | images | s | images/s | images/s per CPU ({args.cpus} CPUs) | peak MiB a task |")
        print("|---|---|---|---|---|---|---|")
        for name, folder in folders.items():
            # A fresh Ray for each folder: a task's peak memory is its worker process's, and workers are reused.
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # its progress lines, between the table's rows
            init_ray()
            for row in prepare_both(folder, base / "out" / name.replace(" ", "-"), args.cpus) + decode_only(folder):
                print(
                    f"| {name} | {row['how']} | {row['count']} | {row['s']:.1f} | {row['rate']:.0f} | "
                    f"{row['rate'] / args.cpus:.0f} | {row.get('peak', '-')} |",
                    flush=True,
                )
            ray.shutdown()


if __name__ == "__main__":
    main()
