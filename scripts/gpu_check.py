"""GPU path check: CUDA training steps under DDP on an NCCL process group, bf16 autocast, channels_last,
torch.compile, and CPU-vs-GPU agreement of one step. Prints a markdown table; --out writes JSON.

    python scripts/gpu_check.py [--out gpu_check.json] [--epochs 2]

Needs only torch, torchvision, numpy, pyyaml and filelock (no Ray or MLflow), so it runs on a bare GPU box.
One GPU gives a one-rank NCCL group: it proves the backend, DDP wrapping and all-reduce path, not scaling.
`--allow-cpu` runs the same script on the CPU with gloo (to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import load  # noqa: E402
from pipeline.train import Runtime, all_reduce_mean, train_gan  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

VARIANTS = [
    ("fp32", []),
    ("fp32 per-tensor Adam", ["optim.fused=false"]),
    ("fp32 channels_last", ["train.channels_last=true"]),
    ("bf16", ["train.precision=bf16"]),
    ("fp32 compile", ["train.compile=true"]),
    ("bf16 compile", ["train.precision=bf16", "train.compile=true"]),
    ("fp32 batch 1024", ["train.batch_size=1024"]),
    ("bf16 batch 1024", ["train.precision=bf16", "train.batch_size=1024"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per variant; the last one is timed")
    parser.add_argument("--limit", type=int, default=None, help="training images (default: all 60,000)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU with gloo if there is no GPU")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("error: no CUDA device; pass --allow-cpu to dry-run the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group(backend, rank=0, world_size=1)
    probe = torch.arange(4.0, device=device)
    dist.all_reduce(probe)
    report: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "backend": dist.get_backend(),
        "all_reduce_ok": probe.tolist() == [0.0, 1.0, 2.0, 3.0],
        "variants": [],
    }
    print(f"device: {report['device']}  torch {report['torch']}  backend {report['backend']}")

    base = ["data.limit=null"] if args.limit is None else [f"data.limit={args.limit}"]
    data = load(load_config(CONFIGS / "mnist.yaml", base).data)
    runtime = Runtime(
        device=device,
        wrap_model=lambda m: DistributedDataParallel(m, device_ids=[0] if cuda else None),
        mean_over_workers=all_reduce_mean,
    )
    for label, overrides in VARIANTS:
        cfg = load_config(CONFIGS / "mnist.yaml", [*base, f"train.epochs={args.epochs}", *overrides])
        epochs = []
        started = time.perf_counter()
        try:
            result = train_gan(
                cfg, data, runtime=runtime, report=lambda m, s, out=epochs: out.append(dict(m)), log=print
            )
        except Exception as exc:  # one failing switch must not hide the others' numbers
            message = str(exc).strip().splitlines()
            report["variants"].append({"variant": label, "error": f"{type(exc).__name__}: {message[:1]}"})
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
        report["variants"].append(row)

    # One fp32 step on the CPU and on this device from the same seed: the weights should agree closely
    # (not exactly: TF32 and cuDNN's algorithms round differently).
    step_cfg = load_config(CONFIGS / "smoke.yaml", ["data.limit=64", "train.batch_size=64", "train.epochs=1"])
    small = load(step_cfg.data)
    on_cpu = train_gan(step_cfg, small, log=lambda _: None).generator.state_dict()
    on_dev = train_gan(step_cfg, small, runtime=Runtime(device=device), log=lambda _: None).generator.state_dict()
    report["cpu_vs_device_max_abs_diff"] = max(
        (on_cpu[k].float() - on_dev[k].cpu().float()).abs().max().item() for k in on_cpu
    )
    dist.destroy_process_group()

    print()
    print(f"| variant ({report['device']}, {report['backend']}) | batch | img/s | first epoch s | peak MiB | finite |")
    print("|---|---|---|---|---|---|")
    for row in report["variants"]:
        if "error" in row:
            print(f"| {row['variant']} | | failed: {row['error'][:120]} | | | False |")
            continue
        print(
            f"| {row['variant']} | {row['batch_size']} | {row['img_s_last_epoch']:.0f} | {row['first_epoch_s']:.1f} "
            f"| {row.get('max_mem_mib', 0):.0f} | {row['finite']} |"
        )
    print(
        f"\nall_reduce ok: {report['all_reduce_ok']}; CPU vs device, one step, max |dW|: "
        f"{report['cpu_vs_device_max_abs_diff']:.2e}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    ok = report["all_reduce_ok"] and all(r.get("finite", False) for r in report["variants"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
