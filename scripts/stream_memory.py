"""A worker's peak memory and speed on an image folder's shards: streamed (pipeline.data.batches.Streamed) or held in
memory, for prepared sets of two sizes. Prints a table.

    python scripts/stream_memory.py                  # 100 MB and 1 GB of 64x64 RGB pixels, 60 steps each
    python scripts/stream_memory.py --sizes-mb 50 500 --steps 40

Each set is fabricated straight into shards (random pixels: incompressible, the worst case for reading), with
the layout `data prepare --dataset images` writes. Each case runs in a fresh process that trains the smoke
model on 64x64 RGB for ``--steps`` steps of ``--batch`` images and reports its peak RSS (``ru_maxrss``) and its
images/s after the first step.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIDE, CHANNELS = 64, 3


def fabricate(location: Path, megabytes: int) -> int:
    """A prepared folder of ``megabytes`` MB of random 64x64 RGB pixels at ``location``; its image count."""
    import numpy as np

    from pipeline.data.images import FORMAT
    from pipeline.data.shard_making import SHARD_BYTES, write_shard

    one = CHANNELS * SIDE * SIDE
    count, per_shard = (megabytes << 20) // one, SHARD_BYTES // one
    rng = np.random.default_rng(0)
    shards = []
    for number, start in enumerate(range(0, count, per_shard)):
        rows = min(per_shard, count - start)
        pixels = rng.integers(0, 256, (rows, one), dtype=np.uint8)
        shards.append(
            write_shard(str(location), f"train-{number:05d}.parquet", [r.tobytes() for r in pixels], [-1] * rows)
        )
    manifest = {
        "format": FORMAT,
        "source_digest": "fabricated",
        "image_size": SIDE,
        "channels": CHANNELS,
        "test_fraction": 0.0,
        "source": "fabricated",
        "classes": [],
        "shards": {"train": shards, "test": []},
        "skipped": 0,
        "skipped_files": [],
        "digest": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
    }
    (location / "manifest.json").write_text(json.dumps(manifest))
    return count


class Enough(Exception):
    """Raised from the progress hook once the steps asked for are done."""


def child(location: str, stream: bool, steps: int, batch: int) -> None:
    import torch

    from pipeline.config.load import load_config
    from pipeline.data.kinds import source_of
    from pipeline.gan.hooks import On
    from pipeline.gan.loop import train_gan

    overrides = [
        "data.dataset=images",
        f"data.path={location}",
        f"data.prepared={location}",
        f"data.image_size={SIDE}",
        f"data.channels={CHANNELS}",
        "data.limit=null",
        f"data.stream={'true' if stream else 'false'}",
        "eval.every_epochs=0",
        f"train.batch_size={batch}",
    ]
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    started = time.perf_counter()
    data = source_of(cfg.data).batches(torch.device("cpu"), lambda _: None)
    loaded = time.perf_counter() - started
    times = []

    def progress(step: object) -> None:
        times.append(time.perf_counter())
        if len(times) > steps:
            raise Enough

    with contextlib.suppress(Enough):
        train_gan(cfg, data, hooks=[On(step=progress)])
    rate = batch * (len(times) - 1) / (times[-1] - times[0])
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"num_images": len(data), "load_s": loaded, "img_s": rate, "peak_rss_mb": rss_mb}))


def readers(location: str, batches: int, batch: int) -> dict[str, float]:
    """Images/s of reading alone (no training): this project's reader against Ray Data's (read_parquet, then
    iter_torch_batches with a local shuffle buffer of one window), ``batches`` batches each after one."""
    import numpy as np
    import ray
    import torch

    from pipeline.data.batches import WINDOW_BYTES, Plan, Streamed
    from pipeline.data.shards import pixels_of, read_manifest

    manifest = read_manifest(location)
    shape = (CHANNELS, SIDE, SIDE)
    stream = Streamed(location, manifest)
    plan = Plan(0, 0, 1, batch, len(stream) // batch, torch.device("cpu"))

    def rate(iterator) -> float:
        next(iterator)
        started = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * batch / (time.perf_counter() - started)

    ours = rate(iter(stream.epoch(0, 0, plan)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        files = [f"{location}/{s['file']}" for s in manifest["shards"]["train"]]
        dataset = ray.data.read_parquet(files, columns=["image"])
        buffer = WINDOW_BYTES // int(np.prod(shape))

        def as_images(rows):
            import pyarrow as pa

            return torch.from_numpy(pixels_of(pa.array(rows["image"], pa.binary()), shape).copy())

        theirs = rate(
            as_images(rows)
            for rows in dataset.iter_batches(batch_size=batch, batch_format="numpy", local_shuffle_buffer_size=buffer)
        )
    finally:
        ray.shutdown()
    return {"ours_img_s": ours, "ray_data_img_s": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--child", nargs=2, metavar=("LOCATION", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--readers", action="store_true", help="also: reading alone, this reader vs Ray Data's")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "stream", args.steps, args.batch)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in args.sizes_mb:
            location = Path(tmp) / f"set-{megabytes}mb"
            started = time.perf_counter()
            count = fabricate(location, megabytes)
            print(f"{megabytes} MB: {count} images in shards ({time.perf_counter() - started:.0f} s)", flush=True)
            for mode in ("stream", "memory"):
                cmd = [sys.executable, __file__, "--child", str(location), mode]
                cmd += ["--steps", str(args.steps), "--batch", str(args.batch)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append((megabytes, mode, json.loads(done.stdout.strip().splitlines()[-1])))
                print(f"  {mode}: {rows[-1][2]}", flush=True)
            if args.readers:
                read = readers(str(location), args.steps, args.batch)
                print(f"  reading alone, {args.steps} batches of {args.batch}: {read}", flush=True)
    print(f"\n64x64 RGB, smoke model, batch {args.batch}, {args.steps} steps, one worker process")
    print("| set | mode | images | peak RSS (MB) | load (s) | images/s |")
    print("|---|---|---|---|---|---|")
    for megabytes, mode, r in rows:
        print(
            f"| {megabytes} MB | {mode} | {r['num_images']:,} | {r['peak_rss_mb']:,.0f} | {r['load_s']:.1f} | "
            f"{r['img_s']:,.0f} |"
        )


if __name__ == "__main__":
    main()
