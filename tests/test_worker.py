"""One worker's run in this process (pipeline.distributed.worker.run_worker) with a place that records what it hands on:
every report's result as Ray receives it (the typed report's kind, the accounting's figures, the hooks'), its
checkpoint, and the hooks told of every step. And which Train runs rank their checkpoints by FID."""

import torch

from pipeline.config.load import load_config
from pipeline.core import checkpoint
from pipeline.data.kinds import source_of
from pipeline.data.source import DataSource
from pipeline.distributed.results import report_kind
from pipeline.distributed.worker import ElasticJob, TrialPart, WorkerJob, WorkerPlace, run_worker
from pipeline.eval.metrics import CHAMPION_METRIC
from pipeline.gan.hooks import Hook
from pipeline.gan.steps import Runtime
from tests.conftest import CONFIGS


class Steps(Hook):
    """A hook every worker gets that counts the steps it sees and adds a figure to every report."""

    def __init__(self):
        self.steps: list[int] = []

    def on_step(self, step):
        self.steps.append(step.number)

    def figures(self):
        return {"hook_steps": len(self.steps)}


class Given(DataSource):
    """The split it is given, as a data source."""

    def __init__(self, data, split):
        super().__init__(data)
        self.split = split

    @property
    def image_shape(self):
        return (1, *self.split.images.shape[1:])

    def read(self, train, progress, most):
        return self.split


def test_a_worker_hands_on_each_report_with_its_figures_and_checkpoint(fake_split):
    overrides = ["train.epochs=2", "tune.report_every_steps=3", "eval.every_epochs=0", "scaling.cpus_per_worker=1"]
    overrides.append("data.limit=256")  # the fake split's size
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    handed: list = []

    def report(result, directory):
        saved = checkpoint.load(f"{directory}/{checkpoint.FILENAME}") if directory else None
        handed.append((dict(result), saved))

    hook = Steps()
    place = WorkerPlace(Runtime(0, 1, torch.device("cpu")), 0, None, report, node_ids=lambda: ["node-a"])
    job = WorkerJob(cfg, Given(cfg.data, fake_split), hooks=(hook,), started_at=100.0, fit_at=101.0)
    run_worker(job, place, entered=103.0)

    # 256 images in batches of 64: reports at step 3 (inside epoch 1), 4 (its end), 6 (inside epoch 2), 8
    assert [(r["step"], report_kind(r).kind) for r, _ in handed] == [
        (3, "interval"),
        (4, "epoch"),
        (6, "interval"),
        (8, "epoch"),
    ]
    assert hook.steps == list(range(1, 9)) and [r["hook_steps"] for r, _ in handed] == [3, 4, 6, 8]
    first, later = handed[0][0], [r for r, _ in handed[1:]]
    # Where this start went, in the first report only: driver (started_at -> fit_at), workers (-> entered), data,
    # set-up (-> first step)
    assert (first["start_driver_s"], first["start_workers_s"]) == (1.0, 2.0)
    assert first["start_s"] > 3.0 and first["start_data_s"] >= 0 and first["start_setup_s"] > 0
    assert not any(key.startswith("start_") for r in later for key in r)
    # Worker-seconds in steps every report; the previous report's checkpoint seconds from the second on
    assert all(r["worker_s"] == r["train_s"] > 0 for r, _ in handed)
    assert first["checkpoint_s"] == 0.0 and all(r["checkpoint_s"] > 0 for r in later)
    # The checkpoint each report carries is the state at its step (inside an epoch: with the epoch so far)
    assert [s["step"] for _, s in handed] == [3, 4, 6, 8]
    assert handed[0][1]["epoch_partial"] is not None and handed[1][1]["epoch_partial"] is None


def test_only_runs_whose_every_checkpoint_is_scored_rank_them_by_fid():
    from pipeline.distributed.train_run import checkpoint_config, ranks_checkpoints

    cfg = load_config(CONFIGS / "smoke.yaml")
    every = load_config(CONFIGS / "smoke.yaml", ["eval.every_epochs=2"])

    def job(cfg, elastic=None):
        return WorkerJob(cfg, source_of(cfg.data), trial=TrialPart(elastic=elastic))

    assert ranks_checkpoints(job(cfg))
    assert not ranks_checkpoints(job(every))
    # A worker-elastic trial's pause to resize is not scored: its Train run keeps the latest checkpoints
    assert not ranks_checkpoints(job(cfg, ElasticJob(None, "t", 60.0)))
    assert ranks_checkpoints(job(cfg, ElasticJob(None, "t", 0.0, threads=True)))  # threads never pause

    class Config(dict):
        def __init__(self, **kwargs):
            super().__init__(kwargs)

    assert checkpoint_config(job(cfg), Config) == {
        "num_to_keep": cfg.train.keep_checkpoints,
        "checkpoint_score_attribute": CHAMPION_METRIC.name,
        "checkpoint_score_order": CHAMPION_METRIC.mode,
    }
    assert checkpoint_config(job(cfg, ElasticJob(None, "t", 60.0)), Config) == {
        "num_to_keep": cfg.train.keep_checkpoints
    }


class History:
    """A tracker holding tags and a loss history, as an MLflow run does across a trial's restarts."""

    def __init__(self):
        self.tag_values: dict[str, str] = {}
        self.steps: list[int] = []

    def metric_history(self, key):
        return [(step, 1.0) for step in self.steps]

    def tags(self):
        return dict(self.tag_values)

    def set_tags(self, tags):
        self.tag_values.update(tags)


class Copied:
    """What exploit_record reads of the state a trial continues from."""

    def __init__(self, step, lr_g):
        self.step, self.learning_rates = step, {"lr_g": lr_g, "lr_d": 1e-3}

    def fingerprint(self):
        return "ab" * 32


def test_a_pbt_copy_replayed_by_a_resumed_sweep_keeps_its_first_record_and_a_new_one_is_recorded():
    """A resumed sweep restarts a trial from the copy it made before: the copy's record keeps where the trial's
    own steps began (logged_through), though the run has logged further since; a new copy is recorded."""
    import json

    from pipeline.distributed.hooks import ExploitRecord
    from pipeline.gan.hooks import On

    tracker, said = History(), []
    tracker.steps = [2, 4]
    exploit = {"donor_trial": "t1", "donor_epoch": 1.5}
    record = ExploitRecord(exploit, tracker, On(line=said.append)).on_resume
    record(Copied(12, 2e-3))
    tracker.steps += [14, 16, 18, 20]  # trained on, then the sweep was killed and resumed from the copy
    record(Copied(12, 2e-3))
    assert json.loads(tracker.tag_values["pbt.exploit.step_12"])["logged_through"] == 4
    assert said[-1].endswith("as recorded before")
    record(Copied(12, 1e-3))  # another copy at the same step (other learning rates): that one is recorded
    assert json.loads(tracker.tag_values["pbt.exploit.step_12"])["lr_g"] == 1e-3
    assert not said[-1].endswith("as recorded before")
