"""Writes the saved sweep states of the code this runs with (put a checkout first on PYTHONPATH): what Tune's
tuner.pkl holds of a sweep that pipeline code built (the callbacks and the scheduler, pickled by value by Ray's
cloudpickle, naming the functions they call by their modules). The states in tests/data/sweep_states/c0c903d7/
were written by commit 0c903d7, the last of the flat layout:

    git worktree add /tmp/before 0c903d7
    PYTHONPATH=/tmp/before python tests/data/sweep_states/write_states.py tests/data/sweep_states/c0c903d7
"""

import sys
from pathlib import Path

import ray.cloudpickle
import ray.tune
from pipeline.schedulers import scheduler_of
from pipeline.sweep_report import close_child_runs, print_line, sweep_status
from pipeline.tune import elastic_shares

from pipeline.config import load_config

SPACE = "tune.search_space={optim.lr_g: {loguniform: [1.0e-4, 1.0e-2]}, model.latent_dim: {choice: [8, 16]}}"
KINDS = {
    "asha": ["tune.scheduler=asha"],
    "pbt": ["tune.scheduler=pbt", "train.epochs=3"],
    "elastic": ["tune.scheduler=asha", "scaling.num_workers=[1, 2]", "train.batch_size=64"],
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for kind, overrides in KINDS.items():
        cfg = load_config("configs/smoke.yaml", [SPACE, *overrides])
        callbacks = [close_child_runs("sqlite:////tmp/old/mlflow.db", "gan-pipeline", kind, cfg.train.epochs)]
        callbacks.append(sweep_status(cfg, print_line))
        if kind == "elastic":
            callbacks.append(elastic_shares(f"pipeline-allotment-{kind}", 4))
        state = {
            "__trainable_name": "_trial_driver",
            "_run_config": ray.tune.RunConfig(name=kind, callbacks=callbacks),
            "_tune_config": ray.tune.TuneConfig(scheduler=scheduler_of(cfg).make(cfg)),
        }
        with open(out / f"{kind}.pkl", "wb") as file:
            ray.cloudpickle.dump(state, file)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
