"""One FID/IS evaluator per dataset for everyone who shares a tracking server, and a champion that moves only on
evidence. Two "hosts" (two data roots, each with an evaluator of its own, as two machines that each trained one)
use one real MLflow server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config.load import load_config
from pipeline.config.schema import DataConfig
from pipeline.core.files import file_sha256
from pipeline.data.idx import prepare
from pipeline.data.kinds import load
from pipeline.data.source import default_root
from pipeline.data.specs import MNIST
from pipeline.distributed.lifecycle import generator_facts
from pipeline.distributed.registration import rescorer
from pipeline.eval.evaluator import EVALUATOR_VERSION, EvaluatorError, get_evaluator
from pipeline.gan.sampling import generate_images
from pipeline.tracking.evaluators import shared_evaluator
from pipeline.tracking.registry import CHAMPION, register_generator
from pipeline.tracking.store import start_run
from pipeline.tracking.tracker import MLflowTracker
from tests.conftest import CONFIGS
from tests.servers import MLflowServer

pytestmark = pytest.mark.slow

SAMPLES = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mlflow-server")
    started = MLflowServer(directory, str(directory / "artifacts"))
    yield started, directory
    started.stop()


def host(root: Path, nudge: float) -> DataConfig:
    """A host's data root: MNIST's files and an evaluator of its own (this machine's cached one, its weights
    nudged by ``nudge`` so that each host's differs, as from another CPU type)."""
    prepare("mnist", default_root(), lambda _: None)
    shutil.copytree(default_root() / "MNIST", root / "MNIST")
    mine = get_evaluator(DataConfig(dataset="mnist"), lambda _: None)
    cfg = DataConfig(dataset="mnist", root=str(root))
    directory = root / "evaluators" / "mnist"
    directory.mkdir(parents=True)
    weights = {k: v + nudge if v.is_floating_point() else v for k, v in mine.model.state_dict().items()}
    torch.save(weights, directory / "evaluator.pt")
    np.savez(directory / "test_stats.npz", reference=mine.reference)
    meta = {
        "version": EVALUATOR_VERSION,
        "dataset": "mnist",
        "kind": mine.kind,
        "shape": list(mine.shape),
        "test_accuracy": mine.test_accuracy,
        "weights_sha256": file_sha256(directory / "evaluator.pt"),
        "stats_sha256": file_sha256(directory / "test_stats.npz"),
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    assert get_evaluator(cfg).checksum == meta["weights_sha256"]
    return cfg


class Replay(torch.nn.Module):
    """A 'generator' that plays back real test images: as good as a generator can be (with all ten digits)."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.register_buffer("images", images.unsqueeze(1).float() / 127.5 - 1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.images[(z[:, 0].abs() * 1e4).long() % self.images.shape[0]]


class Blank(torch.nn.Module):
    """A 'generator' whose every image is the same grey square: as bad as one can be."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros(z.shape[0], 1, 28, 28) + 0.0 * z[:, :1, None, None]


def test_two_hosts_share_one_evaluator_and_the_champion_moves_only_on_evidence(server, tmp_path, capsys):
    mlflow, directory = server
    uri = mlflow.uri
    a, b = host(tmp_path / "host-a", 0.0), host(tmp_path / "host-b", 1e-3)
    own_a, own_b = get_evaluator(a).checksum, get_evaluator(b).checksum
    assert own_a != own_b

    lines: list[str] = []
    first = shared_evaluator(a, uri, lines.append)
    assert first.checksum == own_a and "registered this host's mnist evaluator as evaluator-mnist" in lines[-1]
    second = shared_evaluator(b, uri, lines.append)
    assert second.checksum == own_a  # host B scores with A's, not its own
    kept = tmp_path / "host-b" / "evaluators" / "mnist" / f"sha256-{own_a}"
    assert file_sha256(kept / "evaluator.pt") == own_a and "verified and cached" in lines[-1]
    said = len(lines)
    assert shared_evaluator(b, uri, lines.append).checksum == own_a and len(lines) == said  # cached: no download
    version = MlflowClient(uri).get_model_version("evaluator-mnist", "1")
    assert version.tags["weights_sha256"] == own_a and version.tags["dataset_sha256"] == MNIST.digest
    assert float(version.tags["test_accuracy"]) >= MNIST.evaluator_min_accuracy

    # Three generators, registered from both hosts, each scored by that host's evaluator for the store.
    cfg = load_config(CONFIGS / "smoke.yaml", [f"eval.num_samples={SAMPLES}"])
    test = load(DataConfig(dataset="mnist"), train=False)
    # sevens only: FID in between (one digit of ten); blank: far worse; all digits: far better
    models = {"sevens": Replay(test.images[test.labels == 7]), "blank": Blank(), "replay": Replay(test.images[:2000])}

    def register(name: str, data: DataConfig, samples: int = SAMPLES) -> str:
        evaluator = shared_evaluator(data, uri, lines.append)
        images = generate_images(models[name], samples, cfg.model.latent_dim, 0, torch.device("cpu"))
        fid = evaluator.score(images)["fid"]
        run_id = start_run(uri, "gan-pipeline", name)
        model_uri = MLflowTracker(uri, run_id).log_generator(models[name].eval(), generator_facts(cfg))
        tags = {
            "fid": repr(fid),
            "dataset": "mnist",
            "evaluator_sha256": evaluator.checksum,
            "eval_num_samples": str(samples),
        }
        host_cfg = load_config(CONFIGS / "smoke.yaml", [f"eval.num_samples={samples}", f"data.root={data.root}"])
        registration = register_generator(uri, "gan-mnist", model_uri, tags, rescorer(host_cfg, uri, lines.append))
        lines.append(f"[registry] {registration.message}")
        return registration.champion

    assert register("sevens", a) == "1"
    assert register("blank", b) == "1"  # worse, by the same evaluator: the alias stays
    # Scored on fewer samples (FID's bias differs): the champion's own generator is scored the same way first.
    assert register("replay", a, samples=500) == "3"  # better: it moves
    assert f"champion version 1 re-scored with evaluator {own_a[:12]} at 500 samples (was evaluator " in lines[-1]
    print("\n".join(lines))
    client = MlflowClient(uri)
    assert client.get_model_version_by_alias("gan-mnist", CHAMPION).version == "3"
    assert f"fid.{own_a[:12]}.500" in client.get_model_version("gan-mnist", "1").tags


def test_a_shared_evaluator_whose_files_changed_is_refused(server, tmp_path):
    mlflow, directory = server
    c = host(tmp_path / "host-c", 2e-3)
    shared_evaluator(c, mlflow.uri, lambda _: None)  # registered by the first test, or by this one
    (stored,) = (directory / "artifacts").rglob("evaluator/evaluator.pt")
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-8] + b"\0" * 8)
        d = host(tmp_path / "host-d", 3e-3)
        with pytest.raises(EvaluatorError, match="does not match its registered weights_sha256"):
            shared_evaluator(d, mlflow.uri, lambda _: None)
        assert not list((tmp_path / "host-d" / "evaluators" / "mnist").glob("sha256-*/evaluator.pt"))
    finally:
        stored.write_bytes(original)
