"""What does each training option cost per step? Times the plain loop's step with each option of the recipe
(pipeline/gan: losses, R1, flips, DiffAugment, ADA, EMA, spectral norm, conditioning) against the seed's step, in
interleaved rounds (every option once per round, so a machine's drift touches all alike), in CPU time on one thread
(what a step costs however busy the machine is), and prints a Markdown table of the medians over rounds, their
spread and the ratio to the seed's step. Lazy R1's cost is derived from the step that always takes it.

    python scripts/option_cost.py                                   # 64x64 RGB, widths 32, batch 64, 1 thread
    python scripts/option_cost.py --side 28 --channels 1 --width 64 # the MNIST-sized networks
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

OPTIONS = {
    "seed (BCE, BatchNorm D)": [],
    "model.loss=hinge": ["model.loss=hinge"],
    "R1, every step": ["optim.r1_gamma=1", "optim.r1_every=1"],
    "data.flip": ["data.flip=true"],
    "DiffAugment color,translation,cutout": ["train.diffaugment=color,translation,cutout"],
    "... adaptive (ADA)": [
        "train.diffaugment=color,translation,cutout",
        "train.augment_p=0",
        "train.augment_target=0.6",
    ],
    "EMA of G": ["train.ema_decay=0.999"],
    "spectral norm D": ["model.d_norm=spectral"],
    "model.conditional (class embedding)": ["model.conditional=true"],
    "... by conditional BatchNorm": ["model.conditional=true", "model.g_conditioning=batchnorm"],
}
R1_EVERY = 16  # optim.r1_every's default: lazy R1's one step in 16, derived from the step that always takes it


def seconds_per_step(settings: list[str], data, steps: int, warmup: int) -> float:
    """The median CPU seconds of ``steps`` timed steps after ``warmup`` untimed ones, of the loop with ``settings``
    (the process's CPU time, not the wall clock: on one thread, what the step costs however busy the machine is)."""
    from pipeline.config.load import load_config
    from pipeline.gan.hooks import Hook
    from pipeline.gan.loop import train_gan

    class CpuClock(Hook):
        times: list[float] = []

        def on_step(self, step) -> None:
            self.times.append(time.process_time())

    clock = CpuClock()
    clock.times = []
    train_gan(load_config(None, [*settings, "eval.every_epochs=0", "train.epochs=1"]), data, hooks=[clock])
    times = clock.times[warmup : warmup + steps + 1]
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--width", type=int, default=32, help="model.g_channels and model.d_channels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per option and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pipeline.data.split import Split

    warmup = 3
    count = args.batch * (warmup + args.steps + 2)
    shape = (count, args.side, args.side) if args.channels == 1 else (count, args.channels, args.side, args.side)
    data = Split(torch.randint(0, 256, shape, dtype=torch.uint8), torch.arange(count) % 10)  # ten classes
    base = [
        f"model.g_channels={args.width}",
        f"model.d_channels={args.width}",
        f"train.batch_size={args.batch}",
    ]
    rounds: dict[str, list[float]] = {name: [] for name in OPTIONS}
    for number in range(args.rounds):
        for name, settings in OPTIONS.items():
            rounds[name].append(seconds_per_step([*base, *settings], data, args.steps, warmup))
        print(f"round {number + 1}/{args.rounds} done", flush=True)
    seed = statistics.median(rounds["seed (BCE, BatchNorm D)"])
    shape = f"{args.side}x{args.side}x{args.channels}"
    print(f"\n{shape}, widths {args.width}, batch {args.batch}, {args.threads} thread(s)")
    print("| option | CPU ms per step (median) | spread over rounds | vs the seed's step |")
    print("|---|---|---|---|")
    for name, times in rounds.items():
        mid = statistics.median(times)
        print(f"| {name} | {mid * 1e3:.1f} | {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} | {mid / seed:.2f}x |")
        if name == "R1, every step":  # a median of timed steps would miss lazy R1's one step in 16: derived
            lazy = seed + (mid - seed) / R1_EVERY
            print(f"| R1, every {R1_EVERY} steps (lazy; derived) | {lazy * 1e3:.1f} | - | {lazy / seed:.2f}x |")


if __name__ == "__main__":
    main()
