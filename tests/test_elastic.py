"""Elastic trials' arithmetic (pipeline.distributed.elastic) and the worker range in the config; the sweep that
resizes a trial for real is in tests/test_tune.py."""

import pytest

from pipeline.config.load import load_config, with_overrides
from pipeline.core.errors import ConfigError
from pipeline.distributed.elastic import ASK_EVERY_S, POLL_EVERY_STEPS, Allotment, ResizePoll, ThreadShare, shares


def test_a_lone_trial_takes_the_free_workers_up_to_its_max():
    assert shares(["a"], capacity=4, low=1, high=3, waiting=0) == {"a": 3}
    assert shares(["a", "b"], capacity=4, low=1, high=4, waiting=0) == {"a": 2, "b": 2}
    assert shares(["a", "b", "c"], capacity=4, low=1, high=2, waiting=0) == {"a": 2, "b": 1, "c": 1}


def test_nothing_grows_while_trials_wait_to_start():
    assert shares(["a"], capacity=4, low=1, high=4, waiting=1) == {"a": 1}
    assert shares([], capacity=4, low=2, high=4, waiting=0) == {}


def test_the_allotment_answers_low_for_a_trial_it_has_not_been_told_of():
    allotment = Allotment(capacity=2, low=1, high=2)
    assert allotment.want("a") == 1
    allotment.update(["a", "b"], waiting=0)
    assert allotment.want("a") == 1
    allotment.update(["a"], waiting=0)
    assert allotment.want("a") == 2
    allotment.update(["a", "c"], waiting=0)  # a new trial: a shrinks back
    assert allotment.want("a") == 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_poll_asks_at_its_steps_and_grows_only_with_enough_left():
    clock, answers = Clock(), [2]
    poll = ResizePoll(lambda: answers[0], world=1, broadcast=lambda v: v, grow_min_s=60.0, clock=clock)
    decisions = []
    for step in range(1, 2 * POLL_EVERY_STEPS + 1):
        clock.now += 1.0  # one second a step
        decisions.append(poll.resize(step, steps_left=100))
    # Only at the poll steps, and 100 steps left at 1 s each is worth a restart.
    assert decisions[POLL_EVERY_STEPS - 1] == 2
    assert [d for i, d in enumerate(decisions) if i != POLL_EVERY_STEPS - 1 and i != 2 * POLL_EVERY_STEPS - 1] == [
        None
    ] * (2 * POLL_EVERY_STEPS - 2)
    assert poll.resize(3 * POLL_EVERY_STEPS, steps_left=30) is None  # 30 s left: not worth it
    shrink = ResizePoll(lambda: 1, world=2, broadcast=lambda v: v, grow_min_s=60.0, clock=clock)
    assert shrink.resize(POLL_EVERY_STEPS, steps_left=1) == 1  # shrinking happens whatever is left


def test_other_ranks_take_rank_zeros_answer():
    heard = []
    poll = ResizePoll(None, world=2, broadcast=lambda v: heard.append(v) or 3, grow_min_s=0.0)
    assert poll.resize(POLL_EVERY_STEPS, steps_left=1000) == 3
    assert heard == [2]  # a non-zero rank offers its own size; rank 0's value comes back


def test_num_workers_takes_a_range():
    cfg = load_config(None, ["scaling.num_workers=[1, 2]"])
    assert (cfg.scaling.num_workers, cfg.scaling.max_workers) == (1, 2)
    again = with_overrides(cfg, {"train.epochs": 2})
    assert (again.scaling.num_workers, again.scaling.max_workers) == (1, 2)
    with pytest.raises(ConfigError, match=r"min must not exceed max"):
        load_config(None, ["scaling.num_workers=[3, 2]"])
    with pytest.raises(ConfigError, match=r"one number or \[min, max\]"):
        load_config(None, ["scaling.num_workers=[1, 2, 3]"])
    with pytest.raises(ConfigError, match=r"does not split evenly across 3 workers.*narrower range"):
        load_config(None, ["scaling.num_workers=[2, 4]", "train.batch_size=64"])


def test_a_shared_gpu_holds_one_worker_runs_only():
    assert load_config(None, ["scaling.gpus_per_worker=0.25"]).scaling.gpus_per_worker == 0.25
    with pytest.raises(ConfigError, match=r"gpus_per_worker: 0.5 with up to 2 workers.*num_workers=1"):
        load_config(None, ["scaling.gpus_per_worker=0.5", "scaling.num_workers=[1, 2]"])
    with pytest.raises(ConfigError, match=r"gpus_per_worker.*must be <= 1"):
        load_config(None, ["scaling.gpus_per_worker=2"])


def test_a_resize_stops_at_a_checkpoint_that_continues_exactly(fake_split, tmp_path):
    """train_gan stops where ``resize`` names a new size: a Pause report with ``resize_to`` and a checkpoint from
    inside the epoch, no evaluation; continued (here at the same size), the run ends where a straight one did.
    Across Ray's report (a dict) the pause and its size reach the driver, and no other report reads as one."""
    import torch

    from pipeline.core import checkpoint
    from pipeline.distributed.results import result_resize_to, to_result
    from pipeline.gan.hooks import On
    from pipeline.gan.loop import train_gan
    from pipeline.gan.reports import EpochEnd, Pause

    cfg = load_config(None, ["train.batch_size=64", "train.epochs=3", "model.g_channels=8", "model.d_channels=8"])
    straight: list = []
    train_gan(
        cfg,
        fake_split,
        hooks=[On(report=lambda r: straight.append((dict(r.metrics), r.checkpoint)))],
    )
    reports: list = []
    paused = train_gan(
        cfg,
        fake_split,
        hooks=[On(report=reports.append, resize_to=lambda step, left: 2 if step == 6 else None)],
    )
    assert paused.resize_to == 2 and paused.step == 6
    assert [type(r) for r in reports] == [EpochEnd, Pause]
    last, state = reports[-1], reports[-1].checkpoint
    assert last.resize_to == 2 and (last.metrics["step"], last.metrics["progress"]) == (6, 1.5)
    assert "fid" not in last.metrics
    assert result_resize_to(to_result(last)) == 2 and result_resize_to(to_result(reports[0])) is None
    assert state["epoch_partial"] is not None and state["step"] == 6
    path = checkpoint.save(tmp_path / "pause.pt", state)
    rest: list = []
    done = train_gan(
        cfg,
        fake_split,
        hooks=[On(report=lambda r: rest.append((dict(r.metrics), r.checkpoint)))],
        resume=checkpoint.load(path),
    )
    assert done.resize_to is None and [m["step"] for m, _ in rest] == [8, 12]
    a, b = straight[-1][1]["generator"], rest[-1][1]["generator"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a real local Ray
def test_a_single_run_with_a_range_takes_what_ray_train_gives_it(tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(
        "train",
        "-c",
        "configs/smoke.yaml",
        "--set",
        f"train.storage_path={tmp_path / 'runs'}",
        "--set",
        f"tracking.uri={uri}",
        "--set",
        "scaling.num_workers=[1, 2]",
        "--name",
        "elastic-run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1-2 worker(s), elastic (Ray Train sizes the group)" in result.stdout
    run_id = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("MLflow run id"))
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["world_size"] == "1-2"
    # Ray Train's ElasticScalingPolicy found this machine's 2 CPUs free: 2 workers of 1 CPU each.
    assert [m.value for m in client.get_metric_history(run_id, "world_size")] == [2.0]


def test_the_shares_callback_pickles_without_its_actor_handle():
    """Tune pickles callbacks into the sweep's state; a resumed sweep's driver finds the new allotment by name."""
    from ray import cloudpickle

    from pipeline.sweep.tune import elastic_shares

    callback = elastic_shares("pipeline-allotment-s", expected=4)
    callback.actor, callback.told = object(), (("a",), 0)  # as after a step: a live handle and what it told
    restored = cloudpickle.loads(cloudpickle.dumps(callback))
    assert restored.actor is None and restored.told is None


def test_thread_shares_come_from_the_trials_own_node():
    """Counted in threads, a trial's share is its node's CPUs over the trials there (a trial not heard from yet
    may be anywhere, so it counts on every node); nothing grows while trials wait to start."""
    allotment = Allotment(capacity=6, low=1, high=4, node_cpus={"a": 2, "b": 4})
    allotment.update(["t1", "t2", "t3"], waiting=0)
    assert allotment.want("t1", "a") == 1  # t2 and t3 unheard of: they may be on "a"
    assert allotment.want("t2", "b") == 2  # t3 may be on "b" too: 4 CPUs for 2 trials
    allotment.want("t3", "b")
    assert allotment.want("t1", "a") == 2  # alone on its 2-CPU node
    assert allotment.want("t2", "b") == 2 and allotment.want("t3", "b") == 2
    allotment.update(["t1", "t2"], waiting=0)  # t3 ended
    assert allotment.want("t2", "b") == 4
    allotment.update(["t1", "t2", "t3"], waiting=1)
    assert allotment.want("t1", "a") == 1 and allotment.want("t2", "b") == 1
    assert allotment.want("t1", "nowhere") == 1 and allotment.want("t1") == 1


def test_thread_share_sets_threads_at_its_polls_and_counts_the_grown_cpu_seconds():
    now = [0.0]
    answers = [2]
    set_to = []
    share = ThreadShare(lambda: answers[0], low=1, set_threads=set_to.append, clock=lambda: now[0])
    changes = []
    for _ in range(POLL_EVERY_STEPS):  # one step a second; the poll at step 10 grows it
        now[0] += 1.0
        changes.append(share())
    assert changes[-1] == (1, 2) and set(changes[:-1]) == {None} and set_to == [2] and share.threads == 2
    assert share.take() == 0.0  # every step so far ran on 1 thread, the reservation
    for _ in range(5):
        now[0] += 1.0
        share()
    assert share.take() == pytest.approx(5.0)  # 5 s on one thread beyond the reservation
    share.pause()  # a report: evaluation and checkpoint time until the next step is not training
    now[0] += 100.0
    share()
    assert share.take() == 0.0
    answers[0] = 1  # trials wait: back to the reservation at the next poll, asked at most every ASK_EVERY_S
    while share.threads == 2:
        now[0] += ASK_EVERY_S
        share()
    assert set_to == [2, 1]


def test_cpus_per_worker_takes_a_range_for_one_worker_trials():
    cfg = load_config(None, ["scaling.cpus_per_worker=[1, 2]"])
    assert (cfg.scaling.cpus_per_worker, cfg.scaling.max_cpus_per_worker) == (1, 2)
    with pytest.raises(ConfigError, match=r"max_cpus_per_worker: 2 with up to 2 workers per run"):
        load_config(None, ["scaling.cpus_per_worker=[1, 2]", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match=r"max_cpus_per_worker: 2 needs scaling.cpus_per_worker.*\[1, 2\]"):
        load_config(None, ["scaling.max_cpus_per_worker=2"])
    with pytest.raises(ConfigError, match=r"cpus_per_worker: \[3, 2\]; min must not exceed max"):
        load_config(None, ["scaling.cpus_per_worker=[3, 2]"])


def test_an_allotment_that_cannot_be_reached_is_said_once_and_the_trial_keeps_what_it_holds():
    from pipeline.distributed.elastic import ask_allotment

    class Gone:
        class want:  # noqa: N801 - the actor method's name
            @staticmethod
            def remote(*args):
                raise RuntimeError("The actor died unexpectedly before finishing this task.")

    said = []
    ask = ask_allotment(Gone(), "t1", fallback=2, say=said.append)
    assert [ask() for _ in range(3)] == [2, 2, 2]
    assert said == [
        "[elastic] trial t1: the sweep's allotment cannot be reached (RuntimeError: The actor died unexpectedly "
        "before finishing this task.); it goes on with 2, as reserved"
    ]
