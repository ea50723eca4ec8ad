"""Command line: ``python -m pipeline {data,train,config} ...``. The only module that reads argv.

User errors (bad config, missing data, damaged checkpoint) print one ``error: ...`` line and exit 2,
before any expensive work starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline import PROJECT_ROOT
from pipeline.config import ConfigError, UserError, describe_fields, load_config

EXIT_USAGE = 2


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (e.g. configs/mnist.yaml); defaults if omitted")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optim.lr_g=1e-3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="download or convert a dataset into torchvision's layout")
    prep.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    prep.add_argument("--root", help="data directory (default: $PIPELINE_DATA_ROOT or the per-user cache)")

    train = sub.add_parser("train", help="train one GAN on Ray Train, tracked in MLflow")
    _add_config_args(train)
    group = train.add_mutually_exclusive_group()
    group.add_argument("--name", help="run name under train.storage_path (default: <dataset>-<date>-<time>)")
    group.add_argument("--resume", metavar="NAME", help="continue the run NAME from its last checkpoint")

    sample = sub.add_parser("sample", help="generate images with a run's logged generator")
    sample.add_argument("--run-id", required=True, help="MLflow run id (printed at the end of `train`)")
    sample.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    sample.add_argument("--out", required=True, help="output .npz: key `images`, uint8 (N, 28, 28)")
    sample.add_argument("--grid", help="also write a PNG grid of the samples")
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sample.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or <project>/mlflow.db)")

    cfg = sub.add_parser("config", help="show the resolved config, or every key with its default and meaning")
    _add_config_args(cfg)
    cfg.add_argument("--keys", action="store_true", help="list every config key, its default and what it means")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "data":
            return _cmd_data_prepare(args)
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "sample":
            return _cmd_sample(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    raise AssertionError(args.command)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from pipeline.data import default_root, prepare

    root = Path(args.root).expanduser().resolve() if args.root else default_root()
    raw = prepare(args.dataset, root)
    print(f"{args.dataset}: ready in {raw}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    if args.keys:
        for key, default, doc in describe_fields():
            print(f"{key:<28} {default!s:<14} {doc}")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from pipeline.distributed import run_training, ui_command

    name = args.resume or args.name or f"{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    outcome = run_training(cfg, name, resume=bool(args.resume))
    metrics = outcome.metrics
    print(
        f"done: run {outcome.name!r}, {metrics.get('epoch', '?')} epoch(s), loss_d={metrics.get('loss_d', 0):.4f} "
        f"loss_g={metrics.get('loss_g', 0):.4f}"
    )
    print(f"MLflow run id: {outcome.mlflow_run_id}")
    print(f"checkpoint:    {outcome.checkpoint_dir}")
    print(f"MLflow UI:     {ui_command(outcome.tracking_uri)}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise ConfigError(f"--num: {args.num} must be >= 1")
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out: {args.out!r} must end in .npz")
    from pipeline.tracking import load_generator, resolve_tracking_uri, save_image_grid

    uri = args.tracking_uri or resolve_tracking_uri(None, PROJECT_ROOT)
    generator, latent_dim = load_generator(uri, args.run_id)
    images = generate(generator, latent_dim, args.num, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    import numpy as np

    np.savez_compressed(out, images=images.numpy())
    print(f"wrote {args.num} samples {tuple(images.shape)} uint8 to {out}")
    if args.grid:
        save_image_grid(images[:64], args.grid)
        print(f"wrote grid of {min(args.num, 64)} to {args.grid}")
    return 0


def generate(generator, latent: int, num: int, seed: int, batch: int = 500):
    """``num`` uint8 (N, 28, 28) images from a loaded generator, noise seeded by ``seed``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    chunks = []
    with torch.no_grad():
        for start in range(0, num, batch):
            z = torch.randn(min(batch, num - start), latent, generator=gen)
            chunks.append(generator(z).squeeze(1).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(chunks)
