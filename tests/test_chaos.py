"""scripts/chaos.py's short version: a sweep of 2 trials of 2 workers on a local 2-node cluster with S3 and a team
MLflow server, while a Train worker is killed, the MLflow server restarted, the worker node killed (a fresh one
joins) and the S3 endpoint paused. Every trial finishes with every step logged once, and a champion. Slow."""

import re
import subprocess

import pytest

from tests.conftest import REPO
from tests.servers import BIN

pytestmark = pytest.mark.slow


def test_a_short_chaos_run_loses_and_repeats_no_step(tmp_path):
    done = subprocess.run(
        [f"{BIN}/python", str(REPO / "scripts" / "chaos.py"), "--short", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    table = done.stdout
    print(table[-3000:])
    assert done.returncode == 0, table[-4000:] + done.stderr[-3000:]
    assert "| verdict | PASS |" in table and "| steps missing | 0 |" in table and "| steps duplicated | 0 |" in table
    (injected,) = re.findall(r"\| faults injected \| (.*) \|", table)
    # every kind of fault was made at least once while the sweep ran
    assert all(re.search(rf"\d+ {kind}\b", injected) for kind in ("worker", "mlflow", "node", "s3")), injected
    sweep = (tmp_path / "sweep.log").read_text()
    assert "does not answer" in sweep and "answers again" in sweep  # the run waited out the MLflow restart
    assert "Retrying (Retry(" not in sweep  # one line for the store away, not one per retry
