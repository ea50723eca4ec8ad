"""Sweeps started by earlier versions of the package still resume: their saved state (tuner.pkl: the scheduler
and the callbacks, pickled by value, referring to functions by their module paths then) unpickles against
today's modules (pipeline.legacy), and what comes back works. tests/data/sweep_states holds the tuner.pkl of an
ASHA, a PBT and an elastic sweep written by the code before pipeline/tune.py was split (commit 1d135d6), and
c0c903d7/ the same three as the flat layout's last commit wrote them (tests/data/sweep_states/write_states.py)."""

import re
from pathlib import Path

import pytest

STATES = Path(__file__).parent / "data" / "sweep_states"
WRITTEN_BY = {"1d135d6": STATES, "0c903d7": STATES / "c0c903d7"}
SAVED = [(commit, kind) for commit in WRITTEN_BY for kind in ("asha", "pbt", "elastic")]


def load_state(kind: str, commit: str = "1d135d6") -> dict:
    import ray.cloudpickle

    with open(WRITTEN_BY[commit] / f"{kind}.pkl", "rb") as state:
        return ray.cloudpickle.load(state)


@pytest.mark.parametrize("commit, kind", SAVED)
def test_a_saved_sweep_state_unpickles_and_names_todays_trainable(commit, kind):
    from pipeline.sweep.trial import _trial_driver

    state = load_state(kind, commit)
    assert state["__trainable_name"] == _trial_driver.__name__  # Tuner.restore compares the two
    assert state["_run_config"].callbacks


def _trials(*ids):
    from ray.tune.experiment import Trial

    return [Trial("fake", trial_id=i, stub=True, config={"optim": {"lr_g": 1.0e-3}}) for i in ids]


@pytest.mark.parametrize("commit", WRITTEN_BY)
def test_a_saved_asha_scheduler_decides_as_before(commit):
    from ray.tune.schedulers import TrialScheduler

    scheduler = load_state("asha", commit)["_tune_config"].scheduler
    scheduler.set_search_properties("fid", "min")
    good, bad = _trials("good", "bad")
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {"progress": 1, "fid": 10.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {"progress": 1, "fid": 100.0}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, bad, {"progress": 3, "fid": 100.0}) == TrialScheduler.CONTINUE  # final


@pytest.mark.parametrize("commit", WRITTEN_BY)
def test_a_saved_pbt_scheduler_still_leaves_failed_trials_out(commit):
    """The saved scheduler's class calls WithoutFailedTrials by its module then (pipeline.tune or .ray_runtime)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tests.test_tune import _Controller

    scheduler = load_state("pbt", commit)["_tune_config"].scheduler
    scheduler.set_search_properties("fid", "min")
    alive, failed = _trials("alive", "failed")
    controller = _Controller([alive, failed])
    for trial in (alive, failed):
        scheduler.on_trial_add(controller, trial)
    failed.set_status(Trial.ERROR)
    alive.set_status(Trial.RUNNING)
    assert scheduler.on_trial_result(controller, alive, {"progress": 1.5, "fid": 10.0}) == TrialScheduler.PAUSE
    alive.set_status(Trial.PAUSED)
    assert scheduler.choose_trial_to_run(controller) is alive


@pytest.mark.parametrize("commit", WRITTEN_BY)
def test_a_saved_status_callback_prints_todays_trials_table(capsys, commit):
    """The saved live-table callback calls best_first, live_row and format_rows by their module then."""
    from ray.tune.experiment import Trial

    status = next(
        c for c in load_state("elastic", commit)["_run_config"].callbacks if type(c).__name__ == "SweepStatus"
    )
    trials = _trials("abc_00000", "abc_00001", "abc_00002")
    trials[0].set_status(Trial.RUNNING)
    trials[1].set_status(Trial.TERMINATED)
    trials[1].update_last_result({"epoch": 3, "fid": 12.5, "inception_score": 2.0, "report_kind": "epoch"})
    # A trial that diverged before the sweep was resumed: its last result says so in the old way.
    trials[2].set_status(Trial.TERMINATED)
    trials[2].update_last_result({"diverged": 1, "epoch": 1, "fid": float("inf"), "inception_score": 0.0})
    status.on_trial_start(0, trials, trials[0])
    status.on_step_end(0, trials)
    printed = capsys.readouterr().out
    assert "1 diverged, 1 finished, 1 running; best fid 12.500 (abc_00001)" in printed
    # the searched keys' cells first (the trials here set none of them), then epochs, the scores and the status
    assert re.search(r"\| abc_00001 \|[ \d.|-]* \| 3 \| 12\.500 \| 2\.000 \| finished \|", printed), printed
