import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own verdict, skipping the interpreter's teardown.

    What it guards against: a full run (2026-11-29: 200 passed, summary printed) then died with a segmentation
    fault in the interpreter's teardown (atexit handlers, module and thread finalisation), after pytest had
    reported; the tests that start Ray, gloo and torch's thread pools in this process leave their threads there.
    Its exact site is not known: the in-process Ray and DDP tests alone, under ``python -X faulthandler`` with
    PIPELINE_TEST_HARD_EXIT=0, exited cleanly (2026-12-04), and the full run that crashed printed no stack
    (pytest's faulthandler is off by then). Why os._exit is the remedy and hides nothing: every verdict, the
    summary and the exit status are final before this hook; only that teardown is skipped, which no test checks.
    PIPELINE_TEST_HARD_EXIT=0 runs it (with -X faulthandler, a crash there prints its stack)."""
    if _EXIT_STATUS and os.environ.get("PIPELINE_TEST_HARD_EXIT", "1") == "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])


@pytest.fixture
def smoke_cfg():
    from pipeline.config.load import load_config

    return load_config(CONFIGS / "smoke.yaml")


@pytest.fixture
def fake_split():
    """256 random 28x28 uint8 'images' with labels: enough to exercise the loop without real data."""
    import torch

    from pipeline.data.split import Split

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (256,), generator=gen)
    return Split(images, labels)


def sweep_runs(uri: str) -> tuple:
    """A finished sweep's MLflow parent run (the only one in the store) and its child runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gan-pipeline").experiment_id
    (parent,) = [r for r in client.search_runs([experiment]) if r.data.tags.get("kind") == "sweep"]
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in the repo, as a user would run it."""
    return run_python("-m", "pipeline", *args, env=env, timeout=timeout)


def run_python(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python ARGS` in the repo (this interpreter), output captured."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def run_together(fn, args_list) -> list[BaseException]:
    """``fn(*args)`` for each args of ``args_list``, each in a thread, all released at the same moment (a
    barrier): races as concurrent writers meet them. Returns what the calls raised."""
    import threading

    start, errors = threading.Barrier(len(args_list)), []

    def call(*args):
        start.wait()
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=call, args=args) for args in args_list]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
