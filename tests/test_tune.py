"""Ray Tune sweeps on a real local Ray with a real sqlite MLflow store. Slow: each trial is a Ray process."""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def _sweep_args(tmp_path, *extra):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, [
        "tune",
        "-c",
        "configs/smoke.yaml",
        "--set",
        f"train.storage_path={tmp_path / 'runs'}",
        "--set",
        f"tracking.uri={uri}",
        "--set",
        "train.epochs=3",
        *extra,
    ]


# Epochs that last a few seconds (8,192 images, wider nets than smoke.yaml's): long enough that Tune acts on a
# trial's result, or another trial's end reaches the allotment, before the trial is done.
SECONDS_LONG_EPOCHS = ("--set", "data.limit=8192", "--set", "model.g_channels=16", "--set", "model.d_channels=16")


def _children(client, parent_id):
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_sweep_with_asha_parent_child_runs_and_best_entries(tmp_path):
    # Sequential trials, the good learning rate first: ASHA must stop the hopeless one at its rung, epoch 2 of 3
    # (after one epoch the good trial's FID can still be worse than an untrained G's: 3,730 vs 2,711 seen).
    uri, args = _sweep_args(
        tmp_path,
        "--set",
        "tune.search_space={optim.lr_g: {grid: [1.0e-3, 1.0e-7]}}",
        "--set",
        "tune.grace_period=2",
        *SECONDS_LONG_EPOCHS,
        "--set",
        "tune.max_concurrent_trials=1",
        "--set",
        "tune.num_samples=1",
        "--set",
        "tracking.system_metrics_s=2",
        "--name",
        "asha",
    )
    result = run_cli(*args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trial | optim.lr_g | epochs | FID | IS | KID | precision | recall | status |" in result.stdout
    assert "early_stopped" in result.stdout
    # The console: our trials table as trials change, not Ray's every-30-s status table; every worker line
    # names its trial.
    out = result.stdout + result.stderr
    # (at most one table every 15 s: the sweep can end before a change after the first table is printed, so only
    # the first one, with the first trial running, is certain; the counts are tests/test_tune.py's unit test's)
    assert "Trial status:" not in out and re.search(r"\[tune\] \d+ min \d\d s: .*1 running", out), out[-4000:]
    epoch_lines = [line for line in out.splitlines() if " epoch 2/3 " in line]
    assert len(epoch_lines) == 2 and all(re.search(r"\[[0-9a-f]{5}_0000[01]\] epoch 2/3", line) for line in epoch_lines)

    client = MlflowClient(uri)
    parent_id = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("MLflow parent run id"))
    parent = client.get_run(parent_id)
    assert parent.data.tags["sweep"] == "asha" and "optim.lr_g" in parent.data.tags["search_space"]
    children = _children(client, parent_id)
    assert len(children) == 2
    statuses = sorted(c.data.tags.get("status") for c in children)
    assert statuses == ["early_stopped", "finished"], statuses
    ends = {"early_stopped": "KILLED", "finished": "FINISHED"}
    assert all(c.info.status == ends[c.data.tags["status"]] for c in children), [
        (c.data.tags["status"], c.info.status) for c in children
    ]
    for child in children:
        assert {"lr_g", "lr_d", "latent_dim", "epochs"} <= set(child.data.params)
        assert child.data.tags["sweep"] == "asha"
    best = min(children, key=lambda c: c.data.metrics["fid"])
    assert parent.data.metrics["best_fid"] == pytest.approx(best.data.metrics["fid"])
    assert "best_inception_score" in parent.data.metrics
    assert float(parent.data.params["best_lr_g"]) == pytest.approx(1.0e-3)
    assert parent.data.tags["best_run_id"] == best.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert "best_trial_samples.png" in artifacts
    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert {"plots/fid_curves.png", "plots/fid_vs_optim_lr_g.png"} <= plots

    # Each child run ends when its trial ends (the trials ran one after another), not when the sweep ends.
    ordered = sorted(children, key=lambda c: c.info.start_time)
    for before, after in zip(ordered, ordered[1:], strict=False):
        assert before.info.end_time <= after.info.start_time + 5000, [
            (c.data.tags["status"], c.info.start_time, c.info.end_time) for c in ordered
        ]
    assert all(c.info.end_time <= parent.info.end_time for c in children)
    # The finished trial's run: system metrics and its dataset; its generator is the registered champion.
    (finished,) = [c for c in children if c.data.tags["status"] == "finished"]
    assert "system/cpu_utilization_percentage" in finished.data.metrics
    (dataset,) = finished.inputs.dataset_inputs
    assert dataset.dataset.name == "mnist" and '"limit": 8192' in dataset.dataset.profile
    champion = client.get_model_version_by_alias("gan-mnist", "champion")
    assert champion.run_id == finished.info.run_id and champion.tags["run_id"] == finished.info.run_id
    assert "[registry] registered model 'gan-mnist' version 1" in result.stdout
    model = client.get_logged_model(finished.data.tags["generator_model"].split("/")[-1])
    linked = {m.key: m.value for m in model.metrics}
    assert linked["fid"] == finished.data.metrics["fid"]
    assert linked["inception_score"] == finished.data.metrics["inception_score"]

    # Where the hardware's time went (pipeline.sweep.accounting), on the parent run and in the console: one 1-CPU
    # trial at a time holds at most one of the cluster's CPUs; each trial started once.
    spent = parent.data.metrics
    assert spent["trial_starts"] == 2 and 0 < spent["busy_fraction"] <= 1 / spent["capacity"], spent
    assert 0 < spent["start_median_s"] <= spent["start_max_s"] < spent["wall_s"], spent
    phases = ("driver", "data", "setup")
    assert all(0 < spent[f"start_{phase}_median_s"] < spent["start_max_s"] for phase in phases), spent
    # One-worker trials train in the trial's own process: no Ray Train worker group to start.
    assert spent["start_workers_median_s"] < 0.5, spent
    assert all(c.data.tags["trained_in"] == "trial process" for c in children)
    assert spent["eval_s"] > 0 and spent["checkpoint_s"] > 0, spent
    assert "| status | train s | start s |" in result.stdout and "hardware: busy_fraction " in result.stdout


def _kill_processes_with_env(key: str, value: str) -> None:
    """SIGKILL every process whose environment has key=value (a crashed driver's Ray, and only it)."""
    victims = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(key) == value:
                process.kill()
                victims.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    psutil.wait_procs(victims, timeout=30)


def _kill_sweep_once(args: list[str], db, query: str, timeout: float = 600) -> None:
    """Start the sweep ``args``, SIGKILL its driver and its Ray once ``query`` counts a row in the MLflow
    store ``db``."""
    # The sweep's Ray gets a temp dir of its own, so that killing "its" Ray processes below can find
    # exactly them (every process it starts inherits RAY_TMPDIR) and never touches another Ray on the machine.
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths have a length limit
    killed_log = open(db.parent / "killed.log", "w")  # noqa: SIM115 (closed once the sweep is dead)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        start_new_session=True,
        stdout=killed_log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            time.sleep(2)
            assert proc.poll() is None, "the sweep ended before it could be killed"
            if db.exists():
                try:
                    with sqlite3.connect(db) as conn:
                        if conn.execute(query).fetchone()[0] >= 1:
                            break
                except sqlite3.OperationalError:
                    pass
        else:
            pytest.fail(f"nothing matched {query!r} within {timeout:.0f} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_log.close()
    _kill_processes_with_env("RAY_TMPDIR", ray_tmp)  # Ray's daemons run in sessions of their own
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_pbt_copies_the_donor_into_the_weaker_trial_and_a_killed_pbt_sweep_resumes(tmp_path):
    """Two PBT trials at once on one sqlite store, reporting inside epochs too; the sweep's driver is killed
    once a trial has continued from the other's checkpoint, then --resume finishes it: one child run per
    trial, every step once, each exploit's weights the donor's and its learning rates the perturbed ones. The two
    trials have networks of two sizes (model.latent_dim 16 and 32): an exploit crosses sizes, and every child and
    the champion still sample and evaluate (the generator carries its latent size)."""
    import torch

    from pipeline.gan.state import weights_digest

    uri, args = _sweep_args(
        tmp_path,
        "--set",
        "tune.scheduler=pbt",
        "--set",
        "tune.search_space={optim.lr_g: {loguniform: [1.0e-4, 1.0e-2]}, optim.lr_d: {loguniform: [1.0e-4, 1.0e-2]}, "
        "model.latent_dim: {grid: [16, 32]}}",
        "--set",
        "tune.num_samples=1",
        "--set",
        "tune.max_concurrent_trials=2",
        "--set",
        "tune.report_every_steps=4",  # smoke: 8 steps an epoch, so a report in the middle of each
        "--set",
        "tune.pbt_interval=1.5",  # a decision in the middle of epoch 2 (step 12)
        "--set",
        "train.keep_checkpoints=8",  # every Tune checkpoint stays, for the check below
        "--name",
        "pbt",
    )
    _kill_sweep_once(args, tmp_path / "mlflow.db", "select count(*) from tags where key like 'pbt.exploit.%'")

    resumed = run_cli(*args[:-2], "--name", "pbt", "--resume", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client = MlflowClient(uri)
    parents = [
        r
        for r in client.search_runs([client.get_experiment_by_name("gan-pipeline").experiment_id])
        if r.data.tags.get("kind") == "sweep"
    ]
    assert len(parents) == 1  # the parent run was reused
    children = _children(client, parents[0].info.run_id)
    assert len(children) == 2  # exactly one child run per trial, across its Train runs
    exploits = []
    for child in children:
        # smoke: 8 steps per epoch, log_every 2, 3 epochs -> every even step once, no duplicates
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss_d")]
        assert steps == list(range(2, 25, 2)), steps
        assert [m.step for m in client.get_metric_history(child.info.run_id, "fid")] == [4, 8, 12, 16, 20, 24]
        assert child.info.status == "FINISHED", (child.data.tags, resumed.stdout[-6000:])
        records = [json.loads(v) for k, v in child.data.tags.items() if k.startswith("pbt.exploit.step_")]
        exploits += [(child, record) for record in records]
    assert exploits, "no trial continued from another's checkpoint"
    for child, record in exploits:
        # The weights it continued with are the donor's, as Tune kept the donor's checkpoint at that step ...
        notes = sorted((tmp_path / "runs" / "pbt").glob(f"*{record['donor_trial']}*/checkpoint_*/lineage.json"))
        (donor_checkpoint,) = [n.parent for n in notes if json.loads(n.read_text())["step"] == record["step"]]
        state = torch.load(donor_checkpoint / "checkpoint.pt", weights_only=True)
        assert record["weights_sha256"] == weights_digest(state["generator"], state["discriminator"], None)
        # ... and it trained on with the perturbed learning rates: the ones its next report logged, not the donor's
        # (past the steps it had logged before the copy: a donor checkpoint older than the trial's last report
        # rewinds it, and those steps keep the values it logged first)
        since = max(record["step"], record["logged_through"])
        after = {
            key: [m for m in client.get_metric_history(child.info.run_id, key) if m.step > since]
            for key in ("lr_g", "lr_d")
        }
        donor = {key: state["opt_g" if key == "lr_g" else "opt_d"]["param_groups"][0]["lr"] for key in ("lr_g", "lr_d")}
        for key in ("lr_g", "lr_d"):
            assert min(after[key], key=lambda m: m.step).value == pytest.approx(record[key]), (key, record)
            assert record[key] != pytest.approx(donor[key]), (key, record, donor)
            # params keep the starting values; the later ones are metrics and exploit records, not tags
            assert f"resumed_with.{key}" not in child.data.tags
    # The recipient continued with the donor's network; its params keep the size it started with.
    assert any(record["network"]["latent_dim"] != int(child.data.params["latent_dim"]) for child, record in exploits)
    for model in [f"runs:/{child.info.run_id}/generator" for child in children] + ["models:/gan-mnist@champion"]:
        sampled = run_cli(
            "sample", "--model", model, "--num", "8", "--out", str(tmp_path / "s.npz"), "--tracking-uri", uri
        )
        assert sampled.returncode == 0 and "wrote 8 samples (8, 28, 28)" in sampled.stdout, sampled.stderr[-2000:]
        scored = run_cli("evaluate", "--model", model, "--num", "100", "--tracking-uri", uri)
        assert scored.returncode == 0 and "FID=" in scored.stdout, scored.stderr[-2000:]
    parent = client.get_run(parents[0].info.run_id)
    assert parent.data.metrics["pbt_exploits"] == len(exploits)
    assert "plots/pbt_schedule.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "pbt_schedule.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert f"PBT: {len(exploits)} exploit(s)" in resumed.stdout


def test_a_one_worker_trial_trains_in_its_own_process_and_tune_retries_it_from_its_checkpoint(tmp_path):
    """A one-worker trial trains in the trial's process (no Ray Train run), reporting every 4 steps; its process
    dies at step 20 (epoch 3 of 3, before that report): Tune starts it again from its step-16 checkpoint, and it
    finishes in its one MLflow run with every step logged once. Tune keeps its best checkpoints by FID and the
    latest, as a Train run does. Alone on the 2 CPUs with ``cpus_per_worker: [1, 2]``, it grows to 2 threads at
    its first poll (step 10), and starts again at its reservation after the restart."""
    uri, args = _sweep_args(
        tmp_path,
        "--set",
        "tune.search_space={optim.lr_g: {grid: [1.0e-3]}}",
        "--set",
        "tune.num_samples=1",
        "--set",
        "scaling.cpus_per_worker=[1, 2]",
        "--set",
        "tune.report_every_steps=4",
        "--name",
        "retried",
    )
    env = {"PIPELINE_FAULT_AT_STEP": "20", "PIPELINE_FAULT_ONCE": str(tmp_path / "fault")}
    result = run_cli(*args, env=env, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert (tmp_path / "fault").exists()  # the fault really fired
    assert "in the trial's own process on CPU" in out and "resuming from epoch 2 (step 16)" in out
    assert not list((tmp_path / "runs").glob("retried-*"))  # no Ray Train run directory (<sweep>-<trial id>)
    client = MlflowClient(uri)
    parent = next(
        r
        for r in client.search_runs([client.get_experiment_by_name("gan-pipeline").experiment_id])
        if r.data.tags.get("kind") == "sweep"
    )
    (child,) = _children(client, parent.info.run_id)
    assert child.data.tags["trained_in"] == "trial process"
    assert out.count("[elastic] step 10: 1 -> 2 thread(s)") == 1
    threads = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "threads")]
    assert sorted(threads) == [(0, 1), (10, 2), (16, 1)], threads
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss_d")] == list(range(2, 25, 2))
    assert [m.step for m in client.get_metric_history(child.info.run_id, "fid")] == list(range(4, 25, 4))
    assert child.info.status == "FINISHED" and child.data.tags["status"] == "finished"
    assert child.data.tags.get("generator_model", "").startswith("models:/")
    # Six checkpoints (steps 4-16, then 20 and 24 after the restart); kept: the 3 best by FID and the latest.
    # (Each kept checkpoint's step from its lineage.json, each step's FID from MLflow: Tune's result.json of a
    # restarted trial is restored from its last sync and can lack the reports just before the crash.)
    (trial_dir,) = (tmp_path / "runs" / "retried").glob("_trial_driver_*")
    fid_at = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "fid")}
    kept = {json.loads(note.read_text())["step"] for note in trial_dir.glob("checkpoint_*/lineage.json")}
    assert kept == set(sorted(fid_at, key=fid_at.get)[:3]) | {24}, (kept, fid_at)


def test_resume_with_nothing_to_resume_is_a_clean_error(tmp_path):
    _, args = _sweep_args(
        tmp_path, "--set", "tune.search_space={train.seed: {grid: [1, 2]}}", "--name", "nope", "--resume"
    )
    result = run_cli(*args)
    assert result.returncode == 2 and "nothing to resume" in result.stderr and "Traceback" not in result.stderr


def _fake_trial(trial_id):
    from ray.tune.experiment import Trial

    return Trial("fake", trial_id=trial_id, stub=True)


@pytest.mark.parametrize("epochs", [2, 4])  # plain ASHA has a rung at both: it would stop "bad" there
def test_asha_stops_at_a_rung_but_never_at_the_final_epoch(epochs):
    from ray.tune.schedulers import TrialScheduler

    from pipeline.config.load import build_config
    from pipeline.sweep.schedulers import scheduler_of

    cfg = build_config({"train": {"epochs": epochs}, "tune": {"grace_period": 1, "reduction_factor": 2}})
    scheduler = scheduler_of(cfg).make(cfg)
    scheduler.set_search_properties("fid", "min")
    good, bad = _fake_trial("good"), _fake_trial("bad")
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    decisions = {}
    for epoch in range(1, epochs + 1):  # the bad trial is always worse, and always second to report
        for trial, fid in ((good, 10.0), (bad, 100.0)):
            decisions[trial.trial_id, epoch] = scheduler.on_trial_result(None, trial, {"progress": epoch, "fid": fid})
    # The worse trial is stopped at the first rung (epoch 1)...
    assert decisions["bad", 1] == TrialScheduler.STOP
    assert decisions["good", 1] == TrialScheduler.CONTINUE
    # ... and a trial at its last epoch is never stopped, rung or not (it ends by itself, fully logged).
    assert decisions["bad", epochs] == TrialScheduler.CONTINUE
    assert decisions["good", epochs] == TrialScheduler.CONTINUE


@pytest.mark.parametrize("grace_period", [3, 5])  # equal to, and past, the last epoch (ASHA asserts grace <= max_t)
def test_a_grace_period_at_or_past_the_last_epoch_means_no_early_stop(grace_period):
    from ray.tune.schedulers import TrialScheduler

    from pipeline.config.load import build_config
    from pipeline.sweep.schedulers import scheduler_of

    cfg = build_config({"train": {"epochs": 3}, "tune": {"grace_period": grace_period, "reduction_factor": 2}})
    scheduler = scheduler_of(cfg).make(cfg)
    scheduler.set_search_properties("fid", "min")
    good, bad = _fake_trial("good"), _fake_trial("bad")
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    for epoch in range(1, 4):
        for trial, fid in ((good, 10.0), (bad, 100.0)):
            assert scheduler.on_trial_result(None, trial, {"progress": epoch, "fid": fid}) == TrialScheduler.CONTINUE


def test_sweep_status_prints_the_trials_table_on_change_and_not_more_often(monkeypatch):
    from ray.tune.experiment import Trial

    from pipeline.config.load import build_config
    from pipeline.sweep import report as sweep

    cfg = build_config(
        {"train": {"epochs": 2}, "tune": {"search_space": {"optim.lr_g": {"loguniform": [1.0e-4, 1.0e-3]}}}}
    )
    printed: list[str] = []
    status = sweep.sweep_status(cfg, printed.append)
    trials = [
        Trial("fake", trial_id=f"abc_0000{i}", stub=True, config={"optim": {"lr_g": lr}})
        for i, lr in ((0, 2e-4), (1, 5e-4))
    ]
    trials[0].set_status(Trial.RUNNING)
    status.on_trial_start(0, trials, trials[0])
    status.on_step_end(0, trials)
    assert printed[0].startswith("[tune] 0 min 0") and "1 pending, 1 running" in printed[0]
    assert "| abc_00000 | 0.0002 | 0 | - | - | running |" in printed[1]

    trials[1].set_status(Trial.RUNNING)
    trials[1].update_last_result({"epoch": 1, "fid": 120.5, "inception_score": 1.5})
    status.on_trial_result(0, trials, trials[1], trials[1].last_result)
    status.on_step_end(1, trials)
    assert len(printed) == 2  # a change within STATUS_MIN_GAP_S of the last table waits ...
    monkeypatch.setattr(sweep, "STATUS_MIN_GAP_S", 0.0)
    status.on_step_end(2, trials)  # ... and is printed once the gap has passed
    assert "best fid 120.500 (abc_00001)" in printed[2]
    table = printed[3].splitlines()
    assert table[2] == "| abc_00001 | 0.0005 | 1 | 120.500 | 1.500 | running |"  # best first
    status.on_step_end(3, trials)
    assert len(printed) == 4  # nothing changed: nothing printed

    trials[1].set_status(Trial.TERMINATED)
    status.on_trial_complete(0, trials, trials[1])
    status.on_step_end(4, trials)
    assert "early_stopped" in printed[5]  # ended after epoch 1 of 2


class _Controller:
    """What a Tune scheduler asks of Tune's controller, for trials that never start (Ray keeps a failed
    trial among the live ones, as its controller does)."""

    search_alg = None

    def __init__(self, trials):
        self.trials = trials

    def get_trials(self):
        return self.trials

    def get_live_trials(self):
        return set(self.trials)

    def pause_trial(self, trial, should_checkpoint=True):
        from ray.tune.experiment import Trial

        trial.set_status(Trial.PAUSED)


def test_a_failed_trial_does_not_hang_synchronous_pbt():
    """Ray's synchronous PBT waits at each decision point for every live trial, a failed one included: the
    others would stay paused for ever. Ours decides without it, and the paused trial runs again."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from pipeline.config.load import build_config
    from pipeline.sweep.schedulers import scheduler_of

    space = {"optim.lr_g": {"loguniform": [1.0e-4, 1.0e-2]}}
    cfg = build_config({"train": {"epochs": 3}, "tune": {"scheduler": "pbt", "search_space": space}})
    scheduler = scheduler_of(cfg).make(cfg)
    scheduler.set_search_properties("fid", "min")
    alive, failed = _fake_trial("alive"), _fake_trial("failed")
    for trial in (alive, failed):
        trial.config = {"optim": {"lr_g": 1.0e-3}}
    controller = _Controller([alive, failed])
    for trial in (alive, failed):
        scheduler.on_trial_add(controller, trial)
    failed.set_status(Trial.ERROR)
    alive.set_status(Trial.RUNNING)
    decision = scheduler.on_trial_result(controller, alive, {"progress": 1.0, "fid": 10.0})
    assert decision == TrialScheduler.PAUSE  # synchronous PBT pauses every trial at a decision point ...
    alive.set_status(Trial.PAUSED)
    assert scheduler.choose_trial_to_run(controller) is alive  # ... and, the decision made, runs it again


def test_the_sweep_status_callback_pickles_after_ray_replaced_print(monkeypatch):
    """Ray's tqdm_ray replaces builtins.print in the driver at the first worker line it shows; Tune pickles
    its callbacks after that, and a callback holding the original `print` could not be pickled (a sweep under
    `ray job submit` failed before any trial)."""
    import builtins

    import ray.cloudpickle

    from pipeline.config.load import build_config
    from pipeline.sweep.report import print_line, sweep_status

    cfg = build_config({"tune": {"search_space": {"optim.lr_g": {"loguniform": [1.0e-4, 1.0e-3]}}}})
    original = builtins.print
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: original(*args, **kwargs))
    ray.cloudpickle.loads(ray.cloudpickle.dumps(sweep_status(cfg, print_line)))


def test_an_elastic_trial_grows_into_the_cpu_another_trial_left(tmp_path):
    # Two trials on this machine's 2 CPUs with scaling.num_workers [1, 2]: the 1-epoch trial ends while the
    # 4-epoch one trains; that one then checkpoints inside an epoch and goes on with 2 workers, in the same
    # MLflow run, its steps continuing.
    uri, args = _sweep_args(
        tmp_path,
        "--set",
        "tune.search_space={train.epochs: {grid: [1, 4]}}",
        "--set",
        "train.epochs=4",
        "--set",
        "tune.scheduler=none",
        *SECONDS_LONG_EPOCHS,
        "--set",
        "scaling.num_workers=[1, 2]",
        "--set",
        "scaling.elastic_grow_min_s=0",
        "--set",
        "tune.num_samples=1",
        "--name",
        "elastic",
    )
    result = run_cli(*args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "[tune] elastic trials: 1 to 2 worker(s) each, 2 in all" in out
    assert re.search(r"\[elastic\] step \d+: 1 -> 2 worker\(s\)", out), out[-4000:]

    client = MlflowClient(uri)
    parent_id = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("MLflow parent run id"))
    (grown,) = [c for c in _children(client, parent_id) if c.data.params["epochs"] == "4"]
    assert grown.info.status == "FINISHED" and grown.data.tags["status"] == "finished"
    sizes = [(m.step, m.value) for m in client.get_metric_history(grown.info.run_id, "world_size")]
    assert sizes[0] == (0, 1.0) and sizes[-1][1] == 2.0 and 0 < sizes[-1][0] < 4 * 128, sizes
    # Every tracking.log_every-th step once, from the first to the last: nothing lost or repeated at the resize.
    steps = [m.step for m in client.get_metric_history(grown.info.run_id, "loss_d")]
    assert sorted(steps) == list(range(2, 4 * 128 + 1, 2)), steps
    assert [m.step for m in client.get_metric_history(grown.info.run_id, "fid")] == [128, 256, 384, 512]
    # The resize is a restart the accounting counts: 2 first starts and 1 more.
    assert client.get_run(parent_id).data.metrics["trial_starts"] == 3


def test_a_sweep_prepares_the_evaluator_of_each_dataset_its_trials_may_train_on(monkeypatch):
    """The sweep's driver prepares (data and) the evaluator once per dataset its trials can take, and each trial
    picks its own dataset's: searching ``data.dataset`` must not score Fashion-MNIST with the MNIST network."""
    import pipeline.sweep.tune
    from pipeline.config.load import load_config

    prepared = []

    def prepare(cfg, progress, uri, ranked=None, verbose=False):
        assert ranked is not None and ranked.name == "fid"  # the sweep's metric: checked against the evaluator
        assert uri == "sqlite:///store.db"  # the sweep's store: its trials share its evaluators
        prepared.append(cfg.data.dataset)
        return {"dataset": cfg.data.dataset} if cfg.eval.every_epochs else None

    monkeypatch.setattr(pipeline.sweep.tune, "prepare_inputs", prepare)
    base = load_config(REPO / "configs" / "smoke.yaml")
    assert pipeline.sweep.tune.sweep_evaluators(base, "sqlite:///store.db", print) == {"mnist": {"dataset": "mnist"}}
    searched = load_config(
        REPO / "configs" / "smoke.yaml", ["tune.search_space={data.dataset: {choice: [fashion_mnist, mnist]}}"]
    )
    prepared.clear()
    evaluators = pipeline.sweep.tune.sweep_evaluators(searched, "sqlite:///store.db", print)
    assert sorted(prepared) == ["fashion_mnist", "mnist"]
    assert all(payload["dataset"] == dataset for dataset, payload in evaluators.items()) and len(evaluators) == 2
    assert (
        pipeline.sweep.tune.sweep_evaluators(
            load_config(REPO / "configs" / "smoke.yaml", ["eval.every_epochs=0"]), "sqlite:///store.db", print
        )
        == {}
    )


def test_a_store_failing_in_the_sweeps_bookkeeping_stops_it_with_one_line_and_failed_resumable_runs(
    tmp_path, monkeypatch
):
    """The MLflow store fails inside a Tune callback (a trial's run being closed): one line naming the store, the
    sweep and the way on, never a traceback; the sweep's runs are marked FAILED where the store still answers."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's client retries for minutes otherwise
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from types import SimpleNamespace

    from ray.tune.error import TuneError

    from pipeline.sweep.report import SweepStoreFailed, close_child_runs
    from pipeline.sweep.tune import _cause, _fail_runs
    from pipeline.tracking.store import start_run
    from pipeline.tracking.tracker import MLflowTracker

    closing = close_child_runs("http://127.0.0.1:9", "gan-pipeline", "s", 3)
    with pytest.raises(SweepStoreFailed) as caught:
        closing.on_trial_error(1, [], SimpleNamespace(trial_id="t1", last_result={}))
    message = str(caught.value)
    assert message.startswith("the MLflow store http://127.0.0.1:9 failed while sweep 's' closed trial t1's run (")
    assert "\n" not in message
    # Tune hands it on wrapped: the sweep finds it in the chain.
    try:
        try:
            raise caught.value
        except SweepStoreFailed as inner:
            raise TuneError("The Ray Tune run failed.") from inner
    except TuneError as wrapped:
        assert _cause(wrapped, SweepStoreFailed) is caught.value
    assert _cause(TuneError("other"), SweepStoreFailed) is None

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowTracker(uri, start_run(uri, "gan-pipeline", "s", {"kind": "sweep", "sweep": "s"}))
    running = start_run(uri, "gan-pipeline", "t1", {"mlflow.parentRunId": parent.run_id})
    finished = start_run(uri, "gan-pipeline", "t2", {"mlflow.parentRunId": parent.run_id})
    MLflowTracker(uri, finished).end("FINISHED")
    assert _fail_runs(uri, "gan-pipeline", "s", parent) == (
        "its MLflow runs are marked FAILED; once it works, finish the sweep with --name s --resume"
    )
    assert parent.status() == "FAILED" and MLflowTracker(uri, running).status() == "FAILED"
    assert MLflowTracker(uri, finished).status() == "FINISHED"
    gone = MLflowTracker("http://127.0.0.1:9", parent.run_id)
    assert "could not be marked FAILED (the store is down)" in _fail_runs(
        "http://127.0.0.1:9", "gan-pipeline", "s", gone
    )
