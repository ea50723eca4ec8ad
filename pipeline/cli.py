"""Command line: ``python -m pipeline {data,train,tune,sample,evaluate,bench,config} ...``; the only argv reader.

User errors (bad config, missing data, damaged checkpoint) print one ``error: ...`` line and exit 2,
before any expensive work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import PROJECT_ROOT
from pipeline.config.load import describe_fields, load_config
from pipeline.config.schema import DataConfig
from pipeline.core.errors import ConfigError, UserError
from pipeline.core.secrets import redact_console
from pipeline.data.folder import IMAGE_SIZES
from pipeline.data.kinds import DEFAULT_DATASET, source_names
from pipeline.distributed.prepare_tasks import PREPARE_ON, shard_maker
from pipeline.distributed.ray_runtime import check_ray_address

EXIT_USAGE = 2
MODEL_HELP = (
    "a generator by model URI: models:/NAME@ALIAS (e.g. models:/gan-mnist@champion), models:/NAME/VERSION "
    "or runs:/RUN_ID/generator"
)


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


def _add_data_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="dataset preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="download or convert a dataset into torchvision's layout, or prepare a folder of your own images "
        "(--dataset images) into compressed shards",
    )
    prep.add_argument("--dataset", default=DEFAULT_DATASET, choices=source_names())
    prep.add_argument("--root", help="data directory (default: $PIPELINE_DATA_ROOT or the per-user cache)")
    prep.add_argument("--path", help="images: the folder, a directory or s3://bucket/prefix (a subfolder per class)")
    prep.add_argument("--image-size", type=int, help=f"images: the side to prepare at, one of {IMAGE_SIZES}")
    prep.add_argument("--channels", type=int, default=1, help="images: 1 (grey, the default) or 3 (RGB)")
    prep.add_argument("--out", help="images: where the shards go (default: <path>.prepared/<side>px-<c>ch)")
    prep.add_argument("--test-fraction", type=float, default=0.1, help="images: share held out (default 0.1)")
    prep.add_argument(
        "--background", default="white", help="images: the colour transparent areas are shown on (default white)"
    )
    on = "images: decode in local processes or as Ray tasks on the cluster (auto: Ray when RAY_ADDRESS is set)"
    prep.add_argument("--on", choices=PREPARE_ON, default="auto", help=on)


def _add_sample_parser(sub: Any) -> None:
    """``sample``: images from a run's or a registered generator, and ways of looking at it."""
    sample = sub.add_parser("sample", help="generate images with a run's logged generator")
    generator = sample.add_mutually_exclusive_group(required=True)
    generator.add_argument("--run-id", help="MLflow run id (printed at the end of `train`)")
    generator.add_argument("--model", help=MODEL_HELP)
    sample.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    sample.add_argument(
        "--out",
        required=True,
        help="an .npz (key `images`, uint8 (N, H, W) grey or (N, 3, H, W) RGB), or a new folder: one PNG per image",
    )
    sample.add_argument("--grid", help="also write a PNG grid of the samples")
    sample.add_argument(
        "--truncation",
        type=float,
        default=1.0,
        metavar="PSI",
        help="the truncation trick: the noise scaled by PSI towards its mean; < 1 trades variety for typical images "
        "(default 1: none)",
    )
    sample.add_argument(
        "--interpolate",
        type=int,
        metavar="STEPS",
        help="walks through the latent space instead: --out a .png of 8 rows, each STEPS images between two random "
        "points, or a .gif whose frames walk an 8x8 grid through 4 points and back, STEPS frames between each two",
    )
    sample.add_argument(
        "--class",
        dest="cls",
        type=int,
        metavar="K",
        help="a conditional generator's class K for every sample (default: classes as frequent as in its training set)",
    )
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sample.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or <project>/mlflow.db)")


def _add_evaluate_parser(sub: Any) -> None:
    """``evaluate``: scores of a run's generator, of sample files, or of the real data against itself."""
    evaluate = sub.add_parser("evaluate", help="FID, KID, precision/recall (and IS) by the data's evaluator")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--real", action="store_true", help="the real-data reference for --dataset")
    source.add_argument("--run-id", help="score the generator logged in this MLflow run")
    source.add_argument("--model", help=MODEL_HELP)
    source.add_argument(
        "--samples", help="score an .npz written by `sample` (key `images`, uint8) or a folder of image files"
    )
    evaluate.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        choices=source_names(),
        help=f"default {DEFAULT_DATASET}; a run's own with --run-id",
    )
    evaluate.add_argument("--root", help="data directory (default: $PIPELINE_DATA_ROOT or the per-user cache)")
    evaluate.add_argument("--path", help="images: the folder the samples are compared with (as for data prepare)")
    evaluate.add_argument("--image-size", type=int, help=f"images: its prepared side, one of {IMAGE_SIZES}")
    evaluate.add_argument("--channels", type=int, default=1, help="images: 1 (grey, the default) or 3 (RGB)")
    evaluate.add_argument("--test-fraction", type=float, default=0.1, help="images: its held-out share (default 0.1)")
    evaluate.add_argument(
        "--evaluator",
        default="auto",
        choices=("auto", "classifier", "rotation"),
        help="the network that scores (data.evaluator): auto = a classifier where the data has classes",
    )
    evaluate.add_argument(
        "--num", type=int, help="samples to generate with --run-id/--model (default: as many as the run scored)"
    )
    evaluate.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or <project>/mlflow.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    _add_data_parser(sub)

    train = sub.add_parser("train", help="train one GAN on Ray Train, tracked in MLflow")
    _add_config_args(train)
    group = train.add_mutually_exclusive_group()
    group.add_argument("--name", help="run name under train.storage_path (default: <dataset>-<date>-<time>)")
    group.add_argument("--resume", metavar="NAME", help="continue the run NAME from its last checkpoint")
    train.add_argument("--verbose", action="store_true", help="also show Ray's own log lines (hidden by default)")

    tune = sub.add_parser("tune", help="Ray Tune sweep over tune.search_space, trials as MLflow child runs")
    _add_config_args(tune)
    tune.add_argument("--resume", action="store_true", help="finish the interrupted sweep tune.name (or --name)")
    tune.add_argument("--name", help="sweep name (overrides tune.name)")
    tune.add_argument("--verbose", action="store_true", help="also show Ray's own log lines (hidden by default)")

    _add_sample_parser(sub)
    _add_evaluate_parser(sub)

    bench = sub.add_parser("bench", help="throughput: plain loop, Ray Train 1 and N workers, vs the matmul peak")
    _add_config_args(bench)
    bench.add_argument("--quick", action="store_true", help="a shorter run (about 3 minutes), same keys")
    bench.add_argument("--workers", type=int, help="N for the N-worker run (default: the CPUs)")
    bench.add_argument(
        "--rounds", type=int, help="interleaved rounds of the loops; ratios are medians over them (default 3, quick 1)"
    )
    bench.add_argument("--out", help="write the results as JSON here")
    bench.add_argument(
        "--sweep", action="store_true", help="also a small sweep: busy_fraction, trial start-to-first-step (minutes)"
    )
    bench.add_argument(
        "--scaling",
        type=int,
        nargs="+",
        metavar="BATCH",
        help="instead: the data-parallel scaling model (docs/SCALING.md) at these images per GPU per step",
    )

    cfg = sub.add_parser("config", help="show the resolved config, or every key with its default and meaning")
    _add_config_args(cfg)
    cfg.add_argument("--keys", action="store_true", help="list every config key, its default and what it means")
    cfg.add_argument("--markdown", action="store_true", help="docs/config.md: every key, the metrics, the schedulers")
    return parser


def main(argv: list[str] | None = None) -> int:
    redact_console()  # no credential in any line printed from here on
    args = build_parser().parse_args(argv)
    # MLflow announces every table it creates and every run it ends: noise next to our progress lines.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    commands = {"data": _cmd_data_prepare, "config": _cmd_config, "train": _cmd_train, "tune": _cmd_tune}
    commands |= {"sample": _cmd_sample, "evaluate": _cmd_evaluate, "bench": _cmd_bench}
    try:
        check_ray_address()
        return commands[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


# The data.* keys `evaluate` takes for a folder of images.
EVALUATE_FOLDER_KEYS = ("path", "image_size", "channels", "test_fraction")

# The data.* keys `data prepare` takes, and the flag that sets each.
PREPARE_FLAGS = {
    "path": "--path",
    "image_size": "--image-size",
    "channels": "--channels",
    "prepared": "--out",
    "test_fraction": "--test-fraction",
    "background": "--background",
}


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.kinds import source_of

    data = DataConfig(
        dataset=args.dataset,
        root=args.root,
        **{key: getattr(args, flag[2:].replace("-", "_")) for key, flag in PREPARE_FLAGS.items()},
    )
    source, defaults = source_of(data), DataConfig()
    given = [key for key in PREPARE_FLAGS if getattr(data, key) != getattr(defaults, key)]
    unread = [PREPARE_FLAGS[key] for key in given if key not in source.reads]
    if unread:
        raise ConfigError(
            f"{', '.join(unread)}: not for --dataset {args.dataset}, which is prepared as it is; drop them"
        )
    if not 0.0 <= args.test_fraction < 1.0:
        raise ConfigError(f"--test-fraction: {args.test_fraction}; hold out a fraction in [0, 1), e.g. 0.1")
    source.check_settings(PREPARE_FLAGS)
    if args.on == "ray" and "path" not in source.reads:
        raise ConfigError(f"--on ray: not for --dataset {args.dataset}, which is prepared as it is; drop it")
    source.prepare(maker=shard_maker(source, args.on))
    settings = " ".join(f"--set data.{key}={getattr(data, key)}" for key in given)
    train_with = f"; train with --set data.dataset={args.dataset} {settings}" if given else ""
    print(f"{args.dataset}: ready in {source.location}{train_with}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    if args.markdown:
        from pipeline.tools.reference import config_markdown

        print(config_markdown(), end="")
        return 0
    if args.keys:
        for key, default, doc in describe_fields():
            print(f"{key:<28} {default!s:<14} {doc}")
        return 0
    cfg = load_config(args.config, args.overrides)
    if cfg.tune.search_space:  # a sweep's config: what only a sweep needs, checked as `tune` would
        from pipeline.sweep.checks import check_sweep

        check_sweep(cfg)
    print(yaml.safe_dump(cfg.to_record(), sort_keys=False), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from pipeline.distributed.lifecycle import RunFailed, ui_command
    from pipeline.distributed.prepare import RunRequest
    from pipeline.distributed.run import run_training

    name = args.resume or args.name or f"{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        outcome = run_training(cfg, RunRequest(name, resume=bool(args.resume), verbose=args.verbose))
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics = outcome.metrics
    print(
        f"done: run {outcome.name!r}, {metrics.get('epoch', '?')} epoch(s), loss_d={metrics.get('loss_d', 0):.4f} "
        f"loss_g={metrics.get('loss_g', 0):.4f}"
    )
    print(f"MLflow run id: {outcome.mlflow_run_id}")
    print(f"checkpoint:    {outcome.checkpoint_dir}")
    print(f"MLflow UI:     {ui_command(outcome.tracking_uri, outcome.mlflow_run_id)}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from pipeline.distributed.lifecycle import RunFailed, ui_command
    from pipeline.eval.metrics import scores_line
    from pipeline.sweep.report import format_rows
    from pipeline.sweep.tune import default_sweep_name, run_sweep

    name = args.name or cfg.tune.name
    if args.resume and not name:
        raise ConfigError("--resume: which sweep? pass --name NAME (or set tune.name) of the sweep to finish")
    name = name or default_sweep_name(cfg)
    started = time.perf_counter()
    try:
        outcome = run_sweep(cfg, name, resume=args.resume, verbose=args.verbose)
    except RunFailed as exc:  # the sweep stopped, resumable (its store failed)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"\nsweep {name!r}: {len(outcome.rows)} trials in {time.perf_counter() - started:.0f}s")
    print(format_rows(outcome.rows, list(cfg.tune.search_space)))
    if outcome.time is not None:
        print(f"hardware: {outcome.time.line()}")
    if outcome.best is not None:
        scores = scores_line(outcome.best, digits=3)
        print(f"best trial {outcome.best['trial_id']}: {scores}, MLflow run {outcome.best['run_id']}")
    if outcome.scheduler_text is not None:
        print(f"\n{outcome.scheduler_text}")
    print(f"MLflow parent run id: {outcome.parent_run_id}")
    print(f"MLflow UI:            {ui_command(outcome.tracking_uri, outcome.parent_run_id)}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    if args.num < 1:
        raise ConfigError(f"--num: {args.num} must be >= 1")
    if args.truncation < 0:
        raise ConfigError(f"--truncation: {args.truncation:g}; give PSI >= 0 (1 = none, 0.7 a common choice)")
    out = Path(args.out).expanduser()
    if args.interpolate is not None:
        if args.interpolate < 2 or out.suffix not in (".png", ".gif"):
            raise ConfigError("--interpolate STEPS: STEPS >= 2, with --out a .png (rows of walks) or a .gif (frames)")
        if args.truncation == 0 or args.grid:
            raise ConfigError(
                "--interpolate: a walk needs --truncation above 0 (at 0 every point is the mean) and makes its own "
                "grid (no --grid)"
            )
    elif out.suffix and out.suffix != ".npz":
        raise ConfigError(f"--out: {args.out!r}; give an .npz file or a folder (no suffix) for PNG files")
    from pipeline.core.uris import resolve_tracking_uri
    from pipeline.tracking.registry import generator_uri, load_generator
    from pipeline.tracking.store import check_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, PROJECT_ROOT, "--tracking-uri", given_wins=True)
    check_tracking_uri(uri)
    generator, facts = load_generator(uri, generator_uri(args.run_id, args.model))
    if args.interpolate is not None:
        from pipeline.tools.samples import write_walk

        print(write_walk(generator, facts, args.interpolate, args.seed, args.truncation, out, args.cls))
        return 0
    from pipeline.tools.samples import write_samples

    for line in write_samples(generator, facts, out, args.num, args.seed, args.truncation, args.cls, args.grid):
        print(line)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.core.uris import resolve_tracking_uri
    from pipeline.data.kinds import source_of
    from pipeline.eval.metrics import comparing, scores_line
    from pipeline.tracking.evaluators import shared_evaluator
    from pipeline.tracking.store import check_tracking_uri

    # Scored by the evaluator every run on the store shares: the figures compare with the runs'.
    uri = resolve_tracking_uri(args.tracking_uri, PROJECT_ROOT, "--tracking-uri", given_wins=True)
    check_tracking_uri(uri)
    if args.real:
        from pipeline.eval.evaluator import real_reference

        data_cfg = _evaluated_data(args, args.dataset)
        evaluator = shared_evaluator(data_cfg, uri)
        ref = real_reference(data_cfg, evaluator)
        print(f"{data_cfg.dataset} real-data reference ({evaluator.describe()}):")
        print(f"  training images against the test split: {scores_line(comparing(ref['train']), 3)}")
        if alone := scores_line(comparing(ref["test"], compares=False), 3, spread=True):
            print(f"  the test split itself: {alone}")
        return 0
    if args.samples:
        from pipeline.tools.samples import read_samples

        data_cfg = _evaluated_data(args, args.dataset)
        images = read_samples(args.samples, source_of(data_cfg).image_shape)
        label, asked = args.samples, None
        evaluator = shared_evaluator(data_cfg, uri)
    else:
        if args.num is not None and args.num < 4:
            raise ConfigError(f"--num: {args.num} must be >= 4 (precision and recall need a k=3 neighbourhood)")
        import torch

        from pipeline.gan.sampling import generate_images, sample_classes
        from pipeline.tracking.registry import generator_uri, load_generator

        model_uri = generator_uri(args.run_id, args.model)
        generator, facts = load_generator(uri, model_uri)
        data_cfg = _evaluated_data(args, facts.get("dataset") or args.dataset)
        evaluator = shared_evaluator(data_cfg, uri)
        # As many as a run scores by default (eval.num_samples null): the held-out reference's count.
        count = evaluator.sample_count(args.num)
        weights = facts.get("class_weights")
        images = generate_images(generator, count, facts["latent_dim"], 0, torch.device("cpu"), 1.0, weights)
        asked = sample_classes(generator, count, 0, weights, None)  # a conditional one's: class_accuracy too
        label = args.model or f"run {args.run_id}"
    shown = scores_line(evaluator.score(images, asked), 3, spread=True)
    print(f"{label}: {len(images)} images  {shown}  ({evaluator.dataset}'s {evaluator.kind} evaluator)")
    return 0


def _evaluated_data(args: argparse.Namespace, dataset: str) -> DataConfig:
    """The data ``evaluate`` compares with: ``dataset`` and the flags its kind reads, checked, prepared, and able
    to be scored (a ConfigError saying why not, before an evaluator is trained)."""
    from pipeline.data.kinds import source_of

    reads = source_of(DataConfig(dataset=dataset)).reads  # the flags this kind of data takes
    data = DataConfig(
        dataset=dataset,
        root=args.root,
        evaluator=args.evaluator,
        **{key: getattr(args, key) for key in EVALUATE_FOLDER_KEYS if key in reads},
    )
    source = source_of(data)
    source.check_settings({key: PREPARE_FLAGS[key] for key in EVALUATE_FOLDER_KEYS})
    source.prepare(print)
    unavailable = source.scores_unavailable()
    if unavailable:
        raise ConfigError(f"--dataset: {unavailable}")
    return data


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.tools.bench import BenchOptions, bench, format_table, write_json

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: {args.workers} must be >= 1")
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds: {args.rounds} must be >= 1")
    cfg = load_config(args.config, args.overrides)  # bad input fails here, before any measurement
    if args.scaling:
        from pipeline.tools.scaling import scaling_report

        if min(args.scaling) < 1:
            raise ConfigError(f"--scaling: {min(args.scaling)}; give images per GPU per step, e.g. --scaling 64 128")
        print(scaling_report(cfg, args.scaling))
        return 0
    options = BenchOptions(args.config, tuple(args.overrides), args.quick, args.workers, args.rounds, args.sweep)
    results = bench(options)
    print(format_table(results))
    if args.out:
        write_json(results, args.out)
        print(f"wrote {args.out}")
    return 0
