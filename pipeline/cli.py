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
from pipeline.config import ConfigError, PipelineConfig, UserError, describe_fields, load_config

EXIT_USAGE = 2


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", help="YAML config file (e.g. configs/mnist.yaml); defaults if omitted"
    )
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

    train = sub.add_parser("train", help="train one GAN")
    _add_config_args(train)
    train.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the checkpoint in DIR (a run directory or its checkpoint.pt)",
    )

    cfg = sub.add_parser("config", help="show the resolved config, or every key with its default and meaning")
    _add_config_args(cfg)
    cfg.add_argument(
        "--keys", action="store_true", help="list every config key, its default and what it means"
    )
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


def _run_dir(cfg: PipelineConfig, resume: str | None) -> tuple[Path, dict | None]:
    """Where an in-process run writes, and the checkpoint it continues (if any). Never overwrites a run."""
    from pipeline import checkpoint

    if resume:
        path = Path(resume).expanduser().resolve()
        state = checkpoint.load(path)
        return (path if path.is_dir() else path.parent), state
    if cfg.train.checkpoint_dir:
        run_dir = Path(cfg.train.checkpoint_dir).expanduser().resolve()
        if (run_dir / checkpoint.FILENAME).exists():
            raise ConfigError(
                f"train.checkpoint_dir: {str(run_dir)!r} already holds a checkpoint; pass --resume {run_dir} "
                "to continue it, or choose another directory"
            )
    else:
        run_dir = PROJECT_ROOT / "runs" / f"{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_dir, None


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    run_dir, state = _run_dir(cfg, args.resume)
    _check_writable(run_dir)

    import torch

    from pipeline import checkpoint
    from pipeline.data import load
    from pipeline.tracking import DirectoryTracker
    from pipeline.train import train_gan

    torch.set_num_threads(cfg.scaling.cpus_per_worker * cfg.scaling.num_workers)
    data = load(cfg.data)
    print(
        f"training on {len(data)} {cfg.data.dataset} images, {cfg.train.epochs} epoch(s); run dir {run_dir}"
    )

    def report(metrics: dict, ckpt: dict | None) -> None:
        if ckpt is not None:
            checkpoint.save(run_dir / checkpoint.FILENAME, ckpt)

    result = train_gan(cfg, data, tracker=DirectoryTracker(str(run_dir)), report=report, resume=state)
    print(f"done: {result.epoch} epoch(s), {result.step} steps; checkpoint {run_dir / checkpoint.FILENAME}")
    return 0


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create run directory {str(directory)!r} ({exc.strerror}); choose another"
        ) from None
