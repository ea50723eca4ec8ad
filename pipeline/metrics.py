"""Sample quality: FID and Inception Score measured with a small classifier trained on the dataset itself.

Inception-v3 weights cannot be downloaded everywhere, and for small grey images a dataset classifier is the
usual yardstick (TF-GAN's ``mnist_score`` / ``mnist_frechet_distance``). The evaluator is trained the
first time it is needed, checked against an accuracy gate, and cached under the data root with its
metadata and the test split's feature statistics. These FIDs are *not* comparable with Inception-FIDs.

Everyone who shares a tracking store shares one evaluator per dataset (:func:`shared_evaluator`): the first run
that needs it registers its own as ``evaluator-<dataset>`` in the store, and every later run, on any host,
downloads that one, checks its checksums and caches it by checksum. FIDs from different hosts then compare.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from pipeline.config import DataConfig
from pipeline.data import Split, file_sha256, load, resolve_root, to_model_range
from pipeline.datasets import IMAGES, DatasetSpec, dataset_spec
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.registry import SharedVersion

EVALUATOR_VERSION = 1
FEATURE_DIM = 128
EVAL_BATCH = 1000


class EvaluatorError(UserError):
    """The evaluator could not be trained to its accuracy gate, or its cache is unusable."""


class Classifier(nn.Module):
    """Two conv blocks and a 128-unit layer (the FID features) before the class logits, for ``spec``'s images;
    images larger than 32 px are first averaged down to 32 px (2x2 or 4x4 average pooling): a cheap evaluator
    whatever the side, which sees what a 32 px thumbnail shows."""

    def __init__(self, spec: DatasetSpec) -> None:
        super().__init__()
        scale = max(1, spec.image_size // 32)
        side = spec.image_size // scale // 4  # after two 2x2 max-pools
        self.features = nn.Sequential(
            *([nn.AvgPool2d(scale)] if scale > 1 else []),
            nn.Conv2d(spec.channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * side * side, FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, spec.num_classes)
        self.side = spec.image_size

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, side, classes): what rebuilds this network elsewhere."""
        first = next(m for m in self.features if isinstance(m, nn.Conv2d))
        return first.in_channels, self.side, self.head.out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) for images in [-1, 1]."""
        feats = self.features(x)
        return feats, self.head(self.dropout(feats))


# --------------------------------------------------------------------------------------------------
# The two scores


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), in float64.

    Tr((S1 S2)^1/2) is computed as Tr((A S2 A)^1/2) with A = S1^1/2: both matrices are symmetric, so two
    eigendecompositions replace a general (and often complex-valued) matrix square root.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    vals, vecs = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` equal parts (Salimans et al., 2016)."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


# --------------------------------------------------------------------------------------------------
# The evaluator


@dataclass
class Evaluator:
    model: Classifier
    dataset: str
    test_accuracy: float
    test_mu: np.ndarray
    test_sigma: np.ndarray
    # SHA-256 of the cached weights: FIDs are comparable only between runs scored by the same evaluator.
    checksum: str = ""

    @torch.no_grad()
    def features_and_probs(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, H, W) -> float64 features (N, 128) and class probabilities (N, classes)."""
        self.model.eval()
        feats, probs = [], []
        for start in range(0, len(images), EVAL_BATCH):
            f, logits = self.model(to_model_range(images[start : start + EVAL_BATCH].cpu()))
            feats.append(f.double())
            probs.append(F.softmax(logits.double(), dim=1))
        return torch.cat(feats).numpy(), torch.cat(probs).numpy()

    def payload(self) -> dict:
        """Everything needed to rebuild this evaluator elsewhere (shipped to every worker of a run, so all
        trials on all nodes are scored by the very same network)."""
        return {
            "weights": self.model.state_dict(),
            "dataset": self.dataset,
            "shape": list(self.model.shape),
            "test_accuracy": self.test_accuracy,
            "test_mu": self.test_mu,
            "test_sigma": self.test_sigma,
            "checksum": self.checksum,
        }

    @classmethod
    def from_payload(cls, payload: dict) -> Evaluator:
        model = Classifier(_payload_spec(payload))
        model.load_state_dict(payload["weights"])
        return cls(
            model.eval(),
            payload["dataset"],
            payload["test_accuracy"],
            payload["test_mu"],
            payload["test_sigma"],
            payload.get("checksum", ""),
        )

    def score(self, images: torch.Tensor) -> dict[str, float]:
        """``fid`` against the test split and ``inception_score`` (10 splits) of uint8 images."""
        if len(images) < 2:
            raise EvaluatorError(f"need at least 2 images to score, got {len(images)}")
        feats, probs = self.features_and_probs(images)
        mu, sigma = statistics(feats)
        is_mean, is_std = inception_score(probs, splits=min(10, len(images)))
        return {
            "fid": frechet_distance(mu, sigma, self.test_mu, self.test_sigma),
            "inception_score": is_mean,
            "inception_score_std": is_std,
        }


def _payload_spec(payload: dict) -> DatasetSpec:
    """The spec a shipped evaluator's network is built for: its recorded shape, or its dataset's entry."""
    if "shape" not in payload:
        return dataset_spec(payload["dataset"])
    channels, side, classes = payload["shape"]
    return DatasetSpec(payload["dataset"], "", side, channels, classes, 0, 0.0)


def evaluator_spec(cfg: DataConfig) -> DatasetSpec:
    """The spec the evaluator of ``cfg``'s data is built and named by (an image folder's read from its manifest)."""
    if cfg.dataset == IMAGES:
        from pipeline.shards import folder_spec

        return folder_spec(cfg)
    return dataset_spec(cfg.dataset)


def cache_dir(cfg: DataConfig) -> Path:
    return resolve_root(cfg) / "evaluators" / evaluator_spec(cfg).key


EVALUATOR_FILES = ("evaluator.pt", "test_stats.npz", "meta.json")  # meta.json last: it marks a cache valid


def shared_evaluator(cfg: DataConfig, uri: str, progress=print) -> Evaluator:
    """The evaluator of ``cfg.dataset`` that every run on the tracking store ``uri`` uses: the first version of
    ``evaluator-<dataset>`` registered there for this dataset's files and this evaluator's version. With none,
    this host's own (cached, or trained now) is registered first. A downloaded one is checked against the
    checksums it was registered with and cached under the data root by checksum."""
    from pipeline.registry import register_evaluator, shared_evaluator_version

    spec = evaluator_spec(cfg)
    name = f"evaluator-{spec.key.replace('_', '-')}" if cfg.dataset == IMAGES else f"evaluator-{cfg.dataset}"
    match = {"dataset_sha256": spec.digest, "evaluator_version": str(EVALUATOR_VERSION)}
    directory = cache_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".shared.lock"), timeout=3600):
        shared = shared_evaluator_version(uri, name, match)
        if shared is None:
            own = get_evaluator(cfg, progress)
            meta = json.loads((directory / "meta.json").read_text())
            tags = {
                **match,
                "dataset": spec.key,
                "weights_sha256": own.checksum,
                "stats_sha256": meta["stats_sha256"],
                "test_accuracy": repr(own.test_accuracy),
            }
            register_evaluator(uri, name, [directory / f for f in EVALUATOR_FILES], tags)
            shared = shared_evaluator_version(uri, name, match)  # the first registered, if two hosts raced
            progress(f"[eval] registered this host's {spec.key} evaluator as {name} in {uri}")
        return _shared_copy(cfg, spec, uri, shared, progress)


def _shared_copy(cfg: DataConfig, spec: DatasetSpec, uri: str, shared: SharedVersion, progress) -> Evaluator:
    """The evaluator ``shared`` from this host's cache (its own, or a copy kept by checksum), else downloaded,
    verified and cached."""
    from pipeline.registry import download_evaluator

    checksum, directory = shared.tags["weights_sha256"], cache_dir(cfg)
    where = f"{shared.name} version {shared.version} in {uri}"
    kept = directory / f"sha256-{checksum}"
    for candidate in (directory, kept):
        cached = _load_cached(candidate, spec)
        if cached is not None and cached.checksum == checksum:
            return cached
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        files = download_evaluator(uri, shared, Path(tmp))
        got = {
            key: file_sha256(files / f)
            for key, f in (("weights_sha256", "evaluator.pt"), ("stats_sha256", "test_stats.npz"))
        }
        wrong = [key for key, value in got.items() if shared.tags.get(key) != value]
        if wrong:
            raise EvaluatorError(
                f"the shared {spec.key} evaluator ({where}) does not match its registered {', '.join(wrong)}: "
                "its files were changed after registration; delete that model version so that the next run "
                "registers a good one"
            )
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(files, kept)
    evaluator = _load_cached(kept, spec)
    if evaluator is None:
        raise EvaluatorError(f"the shared {spec.key} evaluator ({where}) cannot be loaded from {kept}")
    progress(
        f"[eval] {spec.key} evaluator: {where} (sha256 {checksum[:12]}, test accuracy "
        f"{evaluator.test_accuracy:.4f}), verified and cached in {kept}"
    )
    return evaluator


def train_classifier(
    spec: DatasetSpec, train: Split, test: Split, epochs: int = 4, seed: int = 0, progress=print
) -> tuple[Classifier, float]:
    """Train the evaluator (Adam, one-cycle schedule, light shift augmentation) for ``epochs``, or for as many as
    the spec's ``evaluator_min_steps`` take on a small set (an image folder's); return it and its test accuracy."""
    torch.manual_seed(seed)
    model = Classifier(spec)
    batch = min(128, len(train))  # a folder of fewer images trains on all of them each step
    per_epoch = len(train) // batch
    epochs = max(epochs, -(-spec.evaluator_min_steps // per_epoch))
    steps = epochs * (len(train) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(len(train) // batch):
            idx = order[i * batch : (i + 1) * batch]
            x = to_model_range(train.images[idx])
            # Random shifts of up to 2 pixels: cheap augmentation that buys the last tenths of a percent.
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            _, logits = model(x)
            loss = F.cross_entropy(logits, train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % -(-epochs // 8) and epoch + 1 < epochs:
            continue  # at most 8 lines however many epochs a small set takes
        accuracy = classifier_accuracy(model, test)
        progress(
            f"[eval] evaluator epoch {epoch + 1}/{epochs}: test accuracy {accuracy:.4f} "
            f"({time.perf_counter() - started:.0f}s)"
        )
    return model, accuracy


@torch.no_grad()
def classifier_accuracy(model: Classifier, split: Split) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), EVAL_BATCH):
        _, logits = model(to_model_range(split.images[start : start + EVAL_BATCH]))
        correct += int((logits.argmax(1) == split.labels[start : start + EVAL_BATCH]).sum())
    return correct / len(split)


def get_evaluator(cfg: DataConfig, progress=print, splits: tuple[Split, Split] | None = None) -> Evaluator:
    """The cached evaluator for ``cfg.dataset``; trained (under a file lock) the first time.

    ``splits`` (train, test) replaces the dataset's own (tests use tiny fabricated ones).
    """
    spec = evaluator_spec(cfg)
    directory = cache_dir(cfg)
    cached = _load_cached(directory, spec)
    if cached is not None:
        return cached
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / ".lock"), timeout=3600):
        cached = _load_cached(directory, spec)
        if cached is not None:
            return cached
        full = replace(cfg, limit=None)
        if splits is None:
            most = spec.evaluator_images or (None, None)  # a large folder's evaluator: its first images
            splits = load(full, True, progress, most[0]), load(full, False, progress, most[1])
        train, test = splits
        progress(f"[eval] training the {spec.key} evaluator (once; cached in {directory})")
        model, accuracy = train_classifier(spec, train, test, progress=progress)
        gate = spec.evaluator_min_accuracy
        if accuracy < gate:
            raise EvaluatorError(
                f"the {spec.key} evaluator reached only {accuracy:.4f} test accuracy (< {gate}); "
                f"FID/IS from it would mislead, so nothing was cached. {_evaluator_fix(cfg)}"
            )
        evaluator = Evaluator(model, spec.key, accuracy, np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM))
        feats, _ = evaluator.features_and_probs(test.images)
        evaluator.test_mu, evaluator.test_sigma = statistics(feats)
        weights = directory / "evaluator.pt"
        tmp = weights.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(weights)
        np.savez(directory / "test_stats.npz", mu=evaluator.test_mu, sigma=evaluator.test_sigma)
        evaluator.checksum = file_sha256(weights)
        meta = {
            "version": EVALUATOR_VERSION,
            "dataset": spec.key,
            "test_accuracy": accuracy,
            "weights_sha256": evaluator.checksum,
            "stats_sha256": file_sha256(directory / "test_stats.npz"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks the cache valid
        return evaluator


def _evaluator_fix(cfg: DataConfig) -> str:
    if cfg.dataset == IMAGES:
        return (
            "Its classes must be told apart by their images: add images per class, or train without FID/IS "
            "(eval.every_epochs=0)"
        )
    return "Check the data (python -m pipeline data prepare) and try again"


def _load_cached(directory: Path, spec: DatasetSpec) -> Evaluator | None:
    """The cached evaluator if complete and intact (checksums match); None means (re)train it."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        weights, stats = directory / "evaluator.pt", directory / "test_stats.npz"
        if (
            meta.get("version") != EVALUATOR_VERSION
            or meta.get("dataset") != spec.key
            or file_sha256(weights) != meta["weights_sha256"]
            or file_sha256(stats) != meta["stats_sha256"]
        ):
            return None
        model = Classifier(spec)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        with np.load(stats, allow_pickle=False) as arrays:
            mu, sigma = arrays["mu"], arrays["sigma"]
    except (OSError, KeyError, ValueError, json.JSONDecodeError, RuntimeError):
        return None
    return Evaluator(model.eval(), spec.key, float(meta["test_accuracy"]), mu, sigma, meta["weights_sha256"])


def real_reference(cfg: DataConfig, evaluator: Evaluator, num: int = 10_000, progress=print) -> dict[str, float]:
    """The real-data yardstick, scored by ``evaluator``: FID of ``num`` training images vs the test split; IS of
    the test split."""
    full = replace(cfg, limit=None)
    train = load(full, train=True, progress=progress)
    test = load(full, train=False, progress=progress)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:num]
    fid = evaluator.score(train.images[pick])["fid"]
    test_scores = evaluator.score(test.images)
    return {
        "fid_train_vs_test": fid,
        "inception_score_test": test_scores["inception_score"],
        "inception_score_test_std": test_scores["inception_score_std"],
        "evaluator_test_accuracy": evaluator.test_accuracy,
    }
