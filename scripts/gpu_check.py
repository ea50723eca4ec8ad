"""GPU path check: CUDA training steps under DDP on an NCCL process group, bf16 autocast, channels_last,
torch.compile, CUDA graphs (`train.cuda_graphs`, one process without DDP, beside the same without graphs),
CPU-vs-GPU agreement of one step and graphed-vs-plain agreement of whole runs. Prints markdown tables;
--out writes JSON.

    python scripts/gpu_check.py [--out gpu_check.json] [--epochs 2] [--only LABEL,LABEL]

Needs only torch, torchvision, numpy, pyyaml and filelock (no Ray or MLflow), so it runs on a bare GPU box.
One GPU gives a one-rank NCCL group: it proves the backend, DDP wrapping and all-reduce path, not scaling.
`--allow-cpu` runs the same script on the CPU with gloo (to check the script itself).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config.load import load_config
from pipeline.data.kinds import load  # noqa: E402
from pipeline.gan.hooks import On
from pipeline.gan.loop import train_gan
from pipeline.gan.reports import Report
from pipeline.gan.steps import (
    Runtime,  # noqa: E402
    all_reduce_mean,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# (label, config overrides, under DDP): a CUDA-graphed step holds no all-reduce, so those variants and their
# plain references ("one process") train without the DDP wrapper.
VARIANTS = [
    ("fp32", [], True),
    ("fp32 per-tensor Adam", ["optim.fused=false"], True),
    ("fp32 channels_last", ["train.channels_last=true"], True),
    ("bf16", ["train.precision=bf16"], True),
    ("fp32 compile", ["train.compile=true"], True),
    ("bf16 compile", ["train.precision=bf16", "train.compile=true"], True),
    ("fp32 batch 1024", ["train.batch_size=1024"], True),
    ("bf16 batch 1024", ["train.precision=bf16", "train.batch_size=1024"], True),
    ("fp32 one process", [], False),
    ("fp32 one process cuda graphs", ["train.cuda_graphs=true"], False),
    ("bf16 one process", ["train.precision=bf16"], False),
    ("bf16 one process cuda graphs", ["train.precision=bf16", "train.cuda_graphs=true"], False),
    ("fp32 batch 64 one process", ["train.batch_size=64"], False),
    ("fp32 batch 64 one process cuda graphs", ["train.batch_size=64", "train.cuda_graphs=true"], False),
    ("fp32 batch 1024 one process cuda graphs", ["train.batch_size=1024", "train.cuda_graphs=true"], False),
]

# Whole runs with and without CUDA graphs from the same seed: the schedules, EMA, spectral norm and top-k
# (a new capture per k) of mnist_fast; the per-tensor Adam, bf16 and reused fakes on mnist.yaml.
# Short runs first (20 steps: 3 plain, then replays), where the GPU's own noise has not yet grown.
AGREEMENT = [
    ("mnist_fast.yaml", ["data.limit=640", "train.epochs=2", "train.top_k_final=0.5", "train.precision=fp32"]),
    ("mnist.yaml", ["data.limit=1280", "train.epochs=2", "optim.fused=false", "train.g_fresh_noise=false"]),
    ("mnist_fast.yaml", ["data.limit=6400", "train.epochs=2", "train.top_k_final=0.5", "train.precision=fp32"]),
    ("mnist.yaml", ["data.limit=6400", "train.epochs=2", "optim.fused=false", "train.g_fresh_noise=false"]),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per variant; the last one is timed")
    parser.add_argument("--limit", type=int, default=None, help="training images (default: all of them)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU with gloo if there is no GPU")
    parser.add_argument("--only", help="comma-separated variant labels to run (default: all; 'none': none)")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels: the agreement runs then differ only where graphs change the numbers",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # plain vs plain says whether it held
        torch.backends.cudnn.benchmark = False
    if not cuda and not args.allow_cpu:
        print("error: no CUDA device; pass --allow-cpu to dry-run the script on the CPU", file=sys.stderr)
        return 2
    wanted = set(args.only.split(",")) if args.only else {label for label, _, _ in VARIANTS}
    wanted.discard("none")
    unknown = wanted - {label for label, _, _ in VARIANTS}
    if unknown:
        print(f"error: --only {sorted(unknown)}: unknown; variants are {[v[0] for v in VARIANTS]}", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    report = process_group(device, cuda, args.deterministic)
    report["variants"] = run_variants(args, wanted, device, cuda)
    report["cpu_vs_device_max_abs_diff"] = cpu_vs_device(device)
    dist.destroy_process_group()
    if cuda:
        report["graph_agreement"] = [graph_agreement(name, overrides, device) for name, overrides in AGREEMENT]
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    ok = report["all_reduce_ok"] and all(r.get("finite", False) for r in report["variants"])
    ok = ok and all("error" not in row for row in report.get("graph_agreement", []))
    return 0 if ok else 1


def process_group(device: torch.device, cuda: bool, deterministic: bool) -> dict:
    """A one-rank process group (NCCL on a GPU, gloo otherwise) and whether its all-reduce works."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    probe = torch.arange(4.0, device=device)
    dist.all_reduce(probe)
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "backend": dist.get_backend(),
        "all_reduce_ok": probe.tolist() == [0.0, 1.0, 2.0, 3.0],
        "deterministic": deterministic,
    }
    print(f"device: {report['device']}  torch {report['torch']}  backend {report['backend']}")
    return report


def run_variants(args: argparse.Namespace, wanted: set[str], device: torch.device, cuda: bool) -> list[dict]:
    """Each wanted variant trained for ``args.epochs`` epochs: its images/s, memory and whether it stayed finite."""
    base = ["data.limit=null"] if args.limit is None else [f"data.limit={args.limit}"]
    data = load(load_config(CONFIGS / "mnist.yaml", base).data)
    ddp = Runtime(
        device=device,
        wrap_model=lambda m: DistributedDataParallel(m, device_ids=[0] if cuda else None),
        mean_over_workers=all_reduce_mean,
    )
    rows = []
    for label, overrides, under_ddp in VARIANTS:
        if label not in wanted or (not under_ddp and not cuda):  # graphs, and their plain references: GPU only
            continue
        cfg = load_config(CONFIGS / "mnist.yaml", [*base, f"train.epochs={args.epochs}", *overrides])
        epochs: list[dict] = []
        started = time.perf_counter()
        hooks = [On(report=lambda r, out=epochs: out.append(dict(r.metrics)), line=print)]
        try:
            result = train_gan(cfg, data, runtime=ddp if under_ddp else Runtime(device=device), hooks=hooks)
        except Exception as exc:  # one failing switch must not hide the others' numbers
            message = str(exc).strip().splitlines()
            rows.append({"variant": label, "error": f"{type(exc).__name__}: {message[:1]}"})
            print(f"{label}: FAILED {type(exc).__name__}: {message[:1]}")
            continue
        row = {
            "variant": label,
            "batch_size": cfg.train.batch_size,
            "img_s_last_epoch": epochs[-1]["images_per_s"],
            "first_epoch_s": epochs[0]["epoch_time_s"],
            "wall_s": time.perf_counter() - started,
            "loss_d": result.metrics["loss_d"],
            "loss_g": result.metrics["loss_g"],
            "finite": all(torch.isfinite(torch.tensor(result.metrics[k])).item() for k in ("loss_d", "loss_g")),
        }
        if cuda:
            row["max_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
    return rows


def cpu_vs_device(device: torch.device) -> float:
    """One fp32 step on the CPU and on this device from the same seed: G's largest weight difference (small, not
    zero: TF32 and cuDNN's algorithms round differently)."""
    step_cfg = load_config(CONFIGS / "smoke.yaml", ["data.limit=64", "train.batch_size=64", "train.epochs=1"])
    small = load(step_cfg.data)
    on_cpu = train_gan(step_cfg, small).generator.state_dict()
    on_dev = train_gan(step_cfg, small, runtime=Runtime(device=device)).generator.state_dict()
    return max((on_cpu[k].float() - on_dev[k].cpu().float()).abs().max().item() for k in on_cpu)


def print_report(report: dict) -> None:
    print()
    print_table(
        [f"variant ({report['device']}, {report['backend']})", "batch", "img/s", "first epoch s", "peak MiB", "finite"],
        "variant",
        report["variants"],
        lambda row: [
            row["batch_size"],
            f"{row['img_s_last_epoch']:.0f}",
            f"{row['first_epoch_s']:.1f}",
            f"{row.get('max_mem_mib', 0):.0f}",
            row["finite"],
        ],
    )
    print(
        f"\nall_reduce ok: {report['all_reduce_ok']}; CPU vs device, one step, max |dW|: "
        f"{report['cpu_vs_device_max_abs_diff']:.2e}"
    )
    if not report.get("graph_agreement"):
        return
    print()
    print_table(
        [
            "CUDA graphs vs plain, same seed",
            "steps",
            "max |dW| of G: plain vs plain",
            "graphs vs plain",
            "graphs resumed vs graphs",
            "CPU step from its checkpoint",
            "loss_d plain / graphs",
        ],
        "config",
        report["graph_agreement"],
        lambda row: [
            row["steps"],
            f"{row['plain_vs_plain']:.2e}",
            f"{row['graphs_vs_plain']:.2e}",
            f"{row['resumed_vs_graphs']:.2e}",
            row["cpu_continues"],
            f"{row['loss_d_plain']:.4f} / {row['loss_d_graphs']:.4f}",
        ],
    )


def print_table(header: list[str], label: str, rows: list[dict], cells: Callable[[dict], list]) -> None:
    """A markdown table: each row's ``label`` value, then ``cells(row)``; a row with an ``error`` says so."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        rest = [f"failed: {row['error'][:160]}", *[""] * (len(header) - 2)] if "error" in row else cells(row)
        print("| " + " | ".join(str(cell) for cell in [row[label], *rest]) + " |")


def graph_agreement(name: str, overrides: list[str], device: torch.device) -> dict:
    """Train ``name`` twice without CUDA graphs and once with them, then resume the graphed run from its
    first epoch's checkpoint (saved and loaded as a file is, weights_only) with graphs and, for one epoch, on
    the CPU without them: G's largest weight difference for each pair (plain vs plain is the GPU's own
    run-to-run noise: cuDNN's backward kernels are not deterministic)."""
    try:
        cfg = load_config(CONFIGS / name, overrides)
        graphed = load_config(CONFIGS / name, [*overrides, "train.cuda_graphs=true"])
        data = load(cfg.data)
        runtime = Runtime(device=device)
        saved: list[bytes] = []

        def keep_first(report: Report) -> None:
            if not saved and report.checkpoint is not None and report.metrics.get("epoch") == 1:
                buffer = io.BytesIO()
                torch.save(report.checkpoint, buffer)
                saved.append(buffer.getvalue())

        def g_weights(result) -> dict:
            return {k: v.detach().float().cpu() for k, v in result.generator.state_dict().items()}

        def largest(a: dict, b: dict) -> float:
            return max((a[k] - b[k]).abs().max().item() for k in a)

        plain = train_gan(cfg, data, runtime)
        again = train_gan(cfg, data, runtime)
        with_graphs = train_gan(graphed, data, runtime, [On(report=keep_first)])
        checkpoint = torch.load(io.BytesIO(saved[0]), weights_only=True)
        resumed = train_gan(graphed, data, runtime, resume=checkpoint)
        cpu_cfg = load_config(CONFIGS / name, [*overrides, "train.epochs=2"])
        on_cpu = train_gan(cpu_cfg, data, resume=torch.load(io.BytesIO(saved[0]), weights_only=True))
        return {
            "config": f"{name} {' '.join(overrides)}",
            "steps": with_graphs.step,
            "plain_vs_plain": largest(g_weights(plain), g_weights(again)),
            "graphs_vs_plain": largest(g_weights(plain), g_weights(with_graphs)),
            "resumed_vs_graphs": largest(g_weights(with_graphs), g_weights(resumed)),
            "cpu_continues": bool(all(torch.isfinite(v).all() for v in g_weights(on_cpu).values())),
            "loss_d_plain": plain.metrics["loss_d"],
            "loss_d_graphs": with_graphs.metrics["loss_d"],
        }
    except Exception as exc:  # report it beside the speed figures rather than lose them
        import traceback

        traceback.print_exc()
        return {"config": name, "error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    raise SystemExit(main())
