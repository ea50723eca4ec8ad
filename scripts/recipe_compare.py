"""Which training recipe makes the best GAN, at equal compute? Trains each recipe (the seed's DCGAN, each change
alone, and a combination) for the same number of training images, over several seeds, on one dataset, and scores
each run's sampling generator against the dataset's images (training and held out: the reference FID is taken
against, as StyleGAN's is). Prints a Markdown table of means and spreads (docs/recipes.md) and writes each run's
grid beside its results.

    python scripts/recipe_compare.py --dataset fashion_mnist --images 30000 --out /tmp/recipes/fashion
    python scripts/recipe_compare.py --dataset images --path ~/data/oxygen --image-size 64 --channels 3 \
        --images 8000 --set model.g_channels=32 --set model.d_channels=32 --out /tmp/recipes/oxygen
    python scripts/recipe_compare.py ... --table-only    # the table of what --out already holds

Runs go two at a time, one torch thread each (the fastest use of two cores for these small networks); each finished
run is one line of ``<out>/runs.jsonl``, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

# Each recipe: the config keys it sets on top of the dataset's (the seed's DCGAN: BCE, BatchNorm D, no augmentation).
RECIPES = {
    "seed": [],
    "hinge": ["model.loss=hinge"],
    "r1": ["optim.r1_gamma=1.0"],
    "flip": ["data.flip=true"],
    "diffaugment": ["train.diffaugment=color,translation,cutout"],
    "ada": ["train.diffaugment=color,translation,cutout", "train.augment_p=0", "train.augment_target=0.6"],
    "augmented": ["data.flip=true", "train.diffaugment=color,translation,cutout"],
    "ada_flip": [  # the best two at 32k images: ADA and flips
        "train.diffaugment=color,translation,cutout",
        "train.augment_p=0",
        "train.augment_target=0.6",
        "data.flip=true",
    ],
    "conditional": ["model.conditional=true"],  # data with classes only
    "conditional_bn": ["model.conditional=true", "model.g_conditioning=batchnorm"],
    "combined": [
        "optim.r1_gamma=1.0",
        "data.flip=true",
        "train.diffaugment=color,translation,cutout",
    ],
}


def run_one(job: dict) -> dict:
    """Train one recipe at one seed for the budget, score its sampling generator; the result row."""
    import torch

    torch.set_num_threads(1)
    from pipeline.config.load import load_config
    from pipeline.core.pictures import save_image_grid
    from pipeline.data.kinds import load
    from pipeline.eval.evaluator import get_evaluator
    from pipeline.gan.loop import steps_per_epoch, train_gan
    from pipeline.gan.sampling import generate_images, grid_noise, sample_images

    base = load_config(None, [*job["set"], *RECIPES[job["recipe"]], f"train.seed={job['seed']}", "eval.every_epochs=0"])
    split = load(base.data, True, lambda _: None)
    per_epoch = steps_per_epoch(len(split), base.train.batch_size) * base.train.batch_size
    epochs = max(1, math.ceil(job["budget"] / per_epoch))
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=epochs))
    started = time.perf_counter()
    result = train_gan(cfg, split)
    seconds = time.perf_counter() - started
    row = {"recipe": job["recipe"], "seed": job["seed"], "epochs": epochs, "trained": epochs * per_epoch}
    row["train_s"] = seconds
    if result.state.ada is not None:  # where ADA left its probability, and D's last overfitting measure r_t
        row |= {"augment_p": float(result.state.ada.p), "augment_r_t": float(result.state.ada.r_t)}
    reference = torch.cat([split.images, load(base.data, False, lambda _: None).images])
    device = torch.device("cpu")
    samples = generate_images(result.generator, len(reference), cfg.model.latent_dim, 0, device)
    for kind in job["evaluators"]:
        evaluator = get_evaluator(dataclasses.replace(base.data, evaluator=kind), lambda _: None)
        scores = evaluator.referenced(reference).score(samples)
        row |= {f"{kind}_{key}": value for key, value in scores.items()}
    grid = sample_images(result.generator, grid_noise(result.generator, cfg.model.latent_dim, 0, device))
    save_image_grid(grid, str(Path(job["out"]) / f"{job['recipe']}-seed{job['seed']}.png"))
    return row


def table(rows: list[dict], evaluators: list[str]) -> str:
    """Markdown: per recipe, each evaluator's FID and KID as mean ± standard deviation over the seeds, and the FID's
    change from the seed recipe's mean."""
    by = {}
    for row in rows:
        by.setdefault(row["recipe"], []).append(row)
    seed_fid = {k: statistics.mean(r[f"{k}_fid"] for r in by["seed"]) for k in evaluators} if "seed" in by else {}
    head = ["recipe", "seeds", "images", "train s"]
    for kind in evaluators:
        head += [f"{kind} FID", "vs seed", f"{kind} KID"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in [r for r in RECIPES if r in by]:
        runs = by[recipe]
        cells = [
            recipe,
            str(len(runs)),
            str(runs[0].get("trained", runs[0].get("images"))),
            f"{statistics.mean(r['train_s'] for r in runs):.0f}",
        ]
        for kind in evaluators:
            fid = [r[f"{kind}_fid"] for r in runs]
            kid = [r[f"{kind}_kid"] for r in runs]
            change = statistics.mean(fid) / seed_fid[kind] - 1 if kind in seed_fid else float("nan")
            cells += [spread(fid, 3), f"{change:+.0%}", spread(kid, 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def montage(out: Path, recipes: list[str], seed: int, path: str) -> None:
    """Each recipe's grid of run ``seed`` side by side, its name above it, as one PNG."""
    from PIL import Image, ImageDraw

    grids = [
        (r, Image.open(out / f"{r}-seed{seed}.png").convert("RGB"))
        for r in recipes
        if (out / f"{r}-seed{seed}.png").exists()
    ]
    width, height = grids[0][1].size
    sheet = Image.new("RGB", (len(grids) * (width + 8), height + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (recipe, grid) in enumerate(grids):
        sheet.paste(grid, (i * (width + 8), 18))
        draw.text((i * (width + 8) + 2, 3), recipe, fill="black")
    if sheet.width > 1600:  # a page's width, not the pixels of every grid
        sheet = sheet.resize((1600, round(sheet.height * 1600 / sheet.width)), Image.LANCZOS)
    sheet.save(path, **({"quality": 85} if path.endswith(".jpg") else {"optimize": True}))


def spread(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--path", help="images: the folder")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--images", type=int, required=True, help="training images per run (the equal compute)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"which of {', '.join(RECIPES)}")
    parser.add_argument("--set", action="append", default=[], help="a config key for every run (key=value)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--montage", help="also write the recipes' grids of seed 0 side by side to this PNG")
    args = parser.parse_args()
    data = [f"data.dataset={args.dataset}"]
    if args.path:
        data += [f"data.path={args.path}", f"data.image_size={args.image_size}", f"data.channels={args.channels}"]
    from pipeline.config.load import load_config
    from pipeline.data.kinds import source_of

    source = source_of(load_config(None, data).data)
    source.prepare(print)
    evaluators = ["rotation", "classifier"] if source.labelled() else ["rotation"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "runs.jsonl"
    rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    done = {(r["recipe"], r["seed"]) for r in rows}
    recipes = args.recipes.split(",")
    jobs = [
        {"recipe": r, "seed": s, "budget": args.images, "set": [*data, *args.set], "evaluators": evaluators, "out": out}
        for s in range(args.seeds)
        for r in recipes
        if (r, s) not in done
    ]
    if jobs and not args.table_only:
        from pipeline.data.kinds import load
        from pipeline.eval.evaluator import EvaluatorError, get_evaluator

        cfg = load_config(None, data)
        for kind in list(evaluators):  # trained once, before the runs share it
            try:
                get_evaluator(dataclasses.replace(cfg.data, evaluator=kind))
            except EvaluatorError as exc:
                print(f"not scored by the {kind}: {exc}")
                evaluators.remove(kind)
        load(cfg.data, True, print)
        print(f"{len(jobs)} runs of {args.images} images each, {args.processes} at a time", flush=True)
        with ProcessPoolExecutor(args.processes) as pool:
            for done_run in as_completed([pool.submit(run_one, job) for job in jobs]):
                row = done_run.result()
                rows.append(row)
                with record.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                fids = " ".join(f"{k} FID {row[f'{k}_fid']:.3f}" for k in evaluators)
                ada = f", augment_p {row['augment_p']:.3f} r_t {row['augment_r_t']:.3f}" if "augment_p" in row else ""
                print(f"{row['recipe']} seed {row['seed']}: {row['train_s']:.0f}s, {fids}{ada}", flush=True)
    shown = [r for r in rows if r["recipe"] in recipes]
    evaluators = [k for k in evaluators if all(f"{k}_fid" in r for r in shown)]  # one that could not score: none
    print(table(shown, evaluators))
    if args.montage:
        montage(out, recipes, 0, args.montage)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
