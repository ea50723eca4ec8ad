"""Does each kind of evaluator network order known degradations correctly? Prints a Markdown table per dataset
(docs/scores.md) and what, if anything, each kind gets wrong.

    python scripts/score_degradations.py --dataset mnist
    python scripts/score_degradations.py --dataset images --path ~/data/oxygen --image-size 64 --channels 3 \
        --test-fraction 0.3
    python scripts/score_degradations.py --dataset images --path ~/data/oxygen-flat ... --kinds rotation,random \
        --limit 200      # how few training images an extractor can learn from
"""

from __future__ import annotations

import argparse
import time

from pipeline.config.schema import DataConfig
from pipeline.data.kinds import source_of
from pipeline.eval.evaluator import EXTRACTOR_STEPS
from pipeline.tools.degradations import KINDS, degradation_rows, ordering_problems, table, train_evaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--path")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"which of {', '.join(KINDS)}")
    parser.add_argument("--steps", type=int, default=EXTRACTOR_STEPS, help="extractor training steps (batches of 64)")
    parser.add_argument("--limit", type=int, help="train the extractors on only this many training images")
    parser.add_argument("--held-out", type=int, default=4000, help="the most held-out images used (half reference)")
    args = parser.parse_args()
    data = DataConfig(
        dataset=args.dataset,
        path=args.path or "",
        image_size=args.image_size,
        channels=args.channels,
        test_fraction=args.test_fraction,
    )
    source = source_of(data)
    source.prepare(print)
    train, test = source.load(True, print), source.load(False, print)
    if args.limit:
        train = type(train)(train.images[: args.limit], train.labels[: args.limit])
    held_out = test.images[: args.held_out]
    print(f"{source.describe()}: {len(train)} training images, {len(held_out)} held out (half the reference)")
    rows = []
    for kind in args.kinds.split(","):
        if kind == "classifier" and not source.labelled():
            continue
        started = time.perf_counter()
        evaluator = train_evaluator(kind, train, test, args.steps, lambda line: None)
        trained = time.perf_counter() - started
        kind_rows = degradation_rows(evaluator, kind, held_out)
        problems = ordering_problems(kind_rows)
        print(
            f"{kind}: held-out figure {evaluator.test_accuracy:.3f}, trained in {trained:.0f}s; "
            f"{'every ordering holds' if not problems else 'WRONG: ' + '; '.join(problems)}",
            flush=True,
        )
        rows += kind_rows
    print(table(rows))


if __name__ == "__main__":
    main()
