"""Screenshots of the MLflow UI for a sweep, taken by headless Chromium against a real `mlflow ui`.

    python scripts/ui_screenshots.py [--tracking-uri sqlite:///mlflow.db] [--sweep NAME] [--out docs/ui]

Starts `mlflow ui` on 127.0.0.1 (a free port) over the store, opens the pages a GAN user looks at and saves
one PNG each, and checks in the rendered page (Chromium's DOM) that each shows what it should:

    experiment.png  the experiment's runs in the model-training view, as charts (the link train/tune print)
    compare.png     the compare view of the sweep's trials (their parameters and fid side by side)
    samples.png     the best trial's last sample grid in its artifacts
    models.png      the experiment's logged generators and their source runs
    registry.png    the registered model with its versions (the champion alias)

Needs Debian's `chromium` package (apt install chromium) or --chromium PATH. The sweep defaults to the
latest one in the experiment. Exit 1 if a page does not show what it should; 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.distributed.lifecycle import UI_RUNS_VIEW  # noqa: E402
from pipeline.eval.metrics import CHAMPION_METRIC  # noqa: E402

WINDOW = "1600,1000"
MODEL_TRAINING = "workflowType=machine_learning"  # MLflow 3.17's model-training view (see UI_RUNS_VIEW)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--experiment", default="gan-pipeline")
    parser.add_argument("--sweep", help="sweep name (default: the latest sweep in the experiment)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "ui"), help="folder for the PNGs")
    parser.add_argument("--chromium", help="Chromium binary (default: chromium or google-chrome on PATH)")
    parser.add_argument("--wait", type=float, default=40.0, help="seconds each page gets to render")
    args = parser.parse_args(argv)

    try:
        browser = find_browser(args.chromium)
        check_store(args.tracking_uri)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    with mlflow_ui(args.tracking_uri) as base:
        try:
            pages = plan_pages(base, args.experiment, args.sweep)
        except UsageError as exc:
            print(f"error: {exc} ({args.tracking_uri})", file=sys.stderr)
            return 2
        for page in pages:
            url = f"{base}/#{page['route']}"
            shot = out / page["file"]
            dom = render(browser, url, shot, args.wait)
            missing = [text for text in page["expect"] if text not in dom]
            unwanted = [text for text in page.get("refuse", ()) if text in dom]
            ok = not missing and not unwanted and shot.is_file()
            print(f"{'ok  ' if ok else 'FAIL'} {shot}  {page['what']}  ({url.removeprefix(base)})")
            if not ok:
                failed.append(page["file"])
                for text in missing:
                    print(f"       missing from the page: {text!r}")
                for text in unwanted:
                    print(f"       on the page but should not be: {text!r}")
    if failed:
        print(f"error: {len(failed)} page(s) do not show what they should: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


class UsageError(Exception):
    pass


def check_store(uri: str) -> None:
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UsageError(f"no MLflow store at {uri}; run a sweep first (scripts/run_local.sh) or pass --tracking-uri")


def find_browser(explicit: str | None) -> str:
    for name in [explicit] if explicit else ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    raise UsageError(
        f"no Chromium found ({explicit or 'chromium, chromium-browser, google-chrome'} not on PATH); "
        "install Debian's package (apt install chromium) or pass --chromium PATH"
    )


def api(base: str, endpoint: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API on the UI server (GET with query parameters, or POST with JSON)."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if body is None:
        request = urllib.request.Request(url)
    else:
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise UsageError(f"MLflow answered {exc.code} to {endpoint}: {exc.read().decode()[:300]}") from None


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics_of(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def plan_pages(base: str, experiment_name: str, sweep: str | None) -> list[dict]:
    """The pages of the sweep's runs, each with the texts its rendered DOM must contain."""
    found = api(base, "experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment_name}))
    if not found:
        raise UsageError(f"no experiment {experiment_name!r} in the store; pass --experiment NAME")
    eid = found["experiment"]["experiment_id"]
    query = "tags.kind = 'sweep'" + (f" and tags.sweep = '{sweep}'" if sweep else "")
    body = {"experiment_ids": [eid], "filter": query, "order_by": ["attributes.start_time DESC"], "max_results": 1}
    parents = api(base, "runs/search", body).get("runs", [])
    if not parents:
        raise UsageError(f"no sweep {sweep + ' ' if sweep else ''}in experiment {experiment_name!r}")
    parent = parents[0]
    name = tags_of(parent).get("sweep", parent["info"]["run_name"])
    children = api(
        base,
        "runs/search",
        {"experiment_ids": [eid], "filter": f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'"},
    ).get("runs", [])
    ranked = CHAMPION_METRIC.name
    scored = sorted((c for c in children if ranked in metrics_of(c)), key=lambda c: metrics_of(c)[ranked])
    if len(scored) < 2:
        raise UsageError(f"sweep {name!r} has {len(scored)} trial(s) with an FID; the compare view needs two")
    best_id, best_name = scored[0]["info"]["run_id"], scored[0]["info"]["run_name"]
    listing = api(base, "artifacts/list?" + urllib.parse.urlencode({"run_id": best_id, "path": "samples"}))
    grids = sorted(f["path"] for f in listing.get("files", []) if f["path"].endswith(".png"))
    if not grids:
        raise UsageError(f"the best trial of sweep {name!r} ({best_id}) has no sample grids")
    compare = urllib.parse.urlencode(
        {"runs": json.dumps([c["info"]["run_id"] for c in scored]), "experiments": json.dumps([eid])}
    )
    pages = [
        {
            "file": "experiment.png",
            "what": "the experiment's runs as the link that train and tune print opens them",
            "route": f"/experiments/{eid}/{UI_RUNS_VIEW}",
            "expect": [f"best_{ranked}", name],
            "refuse": ["Token Usage"],  # MLflow's GenAI overview
        },
        {
            "file": "compare.png",
            "what": f"compare view of the {len(scored)} scored trials of sweep {name!r}",
            "route": f"/compare-runs?{compare}",
            "expect": [ranked, *(c["info"]["run_name"] for c in scored)],
        },
        {
            "file": "samples.png",
            "what": f"{grids[-1]} of the best trial {best_name!r}",
            "route": f"/experiments/{eid}/runs/{best_id}/artifacts/{grids[-1]}",
            "expect": [grids[-1].rsplit("/", 1)[-1]],
        },
        {
            "file": "models.png",
            "what": "the experiment's logged generators",
            "route": f"/experiments/{eid}/models?{MODEL_TRAINING}",
            "expect": ["generator", best_name],
        },
    ]
    search = urllib.parse.urlencode({"filter": f"run_id = '{best_id}'"})
    versions = api(base, f"model-versions/search?{search}").get("model_versions", [])
    if versions:
        model = versions[0]["name"]
        pages.append(
            {
                "file": "registry.png",
                "what": f"registered model {model!r}",
                "route": f"/models/{urllib.parse.quote(model)}",
                "expect": [model, "champion"],
            }
        )
    return pages


class mlflow_ui:
    """`mlflow ui` over ``uri`` on 127.0.0.1 and a free port, in a process group of its own, stopped on exit."""

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.uri, "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(port)], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"error: mlflow ui exited: {self.log.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return base
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise SystemExit("error: mlflow ui did not answer within 120 s")

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def render(browser: str, url: str, shot: Path, wait: float) -> str:
    """Screenshot ``url`` into ``shot`` and return the rendered DOM (two headless runs of the browser)."""
    common = [
        browser,
        "--headless",
        "--no-sandbox",  # root in a container has no user namespace for Chromium's sandbox
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--window-size={WINDOW}",
        f"--virtual-time-budget={int(wait * 1000)}",
    ]
    with tempfile.TemporaryDirectory() as profile:
        user = [f"--user-data-dir={profile}"]
        subprocess.run(
            [*common, *user, f"--screenshot={shot}", url], capture_output=True, timeout=wait + 120, check=False
        )
        dom = subprocess.run(
            [*common, *user, "--dump-dom", url], capture_output=True, text=True, timeout=wait + 120, check=False
        )
    return dom.stdout


if __name__ == "__main__":
    sys.exit(main())
