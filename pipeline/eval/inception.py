"""The standard Inception FID, where the weights are: the TF-FID Inception-v3 (pool3, 2048 features) of
torch-fidelity's ``inception-v3-compat`` extractor, loaded from the file ``pt_inception-2015-12-05-6726825d.pth``
that pytorch-fid publishes (torch-fidelity's own copy is the same file).

Images are resized as clean-fid does (each channel as float32, Pillow's bicubic to 299 x 299), rounded to uint8
(the extractor takes uint8; at 299 px its own TF-style resize is the identity) and grey images repeated to three
channels; :data:`RESIZE` names this, and runs record it with the weights' SHA-256 so that figures made otherwise
never compare. The file is fetched once (a path, a URL, or pytorch-fid's release), checked against its SHA-256,
loaded with ``weights_only=True`` and kept as a file this project wrote; pipeline.tracking.evaluators shares it
through the tracking store, so workers and hosts without internet use it too.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import UserError
from pipeline.core.files import file_sha256
from pipeline.eval.metrics import Features, metrics_needing
from pipeline.eval.scores import statistics

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
# The published file's SHA-256 begins with the 8 hex digits in its name (torch.hub's convention, which its
# check_hash tests); a file whose digest does not is refused unless eval.inception_sha256 names it.
PUBLISHED_PREFIX = "6726825d"
RESIZE = "clean-fid-bicubic-299-uint8"  # how images reach the network (recorded as a tag)
SIDE = 299
BATCH = 50


class InceptionError(UserError):
    """The Inception weights could not be had or are not the ones pinned."""


def check_digest(digest: str, expected: str | None, where: str) -> None:
    """``digest`` is the pinned one: ``expected`` in full, or (none given) the published file's."""
    if expected is not None and digest != expected.lower():
        raise InceptionError(f"{where} has SHA-256 {digest}, not eval.inception_sha256={expected}; check the file")
    if expected is None and not digest.startswith(PUBLISHED_PREFIX):
        raise InceptionError(
            f"{where} has SHA-256 {digest[:16]}..., not the published {WEIGHTS_FILE} (digest {PUBLISHED_PREFIX}...); "
            "give that file, or set eval.inception_sha256 to this digest to use other weights"
        )


def fetch_weights(setting: str, expected: str | None, cache: Path, progress: Any = print) -> tuple[Path, str]:
    """The weights ``setting`` names (a path, an http(s) URL, or ``download``: pytorch-fid's release), checked and
    kept in ``cache``: the file as it came (``original-<digest>.pth``, what the tracking store shares) and
    ``sha256-<digest>.pt``, a state dict this project saved after loading it with ``weights_only=True``; returns
    that file and the original's digest."""
    cache.mkdir(parents=True, exist_ok=True)
    url = WEIGHTS_URL if setting == "download" else setting if "://" in setting else None
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        if url is not None:
            source = Path(tmp) / WEIGHTS_FILE
            progress(f"[eval] downloading the Inception weights from {url}")
            try:
                with urllib.request.urlopen(url, timeout=60) as response, source.open("wb") as out:
                    shutil.copyfileobj(response, out)
            except OSError as exc:
                raise InceptionError(f"eval.inception_weights: {url} could not be downloaded ({exc})") from None
        else:
            source = Path(setting).expanduser()
            if not source.is_file():
                raise InceptionError(f"eval.inception_weights: {setting!r} is not a file")
        digest = file_sha256(source)
        check_digest(digest, expected, url or str(source))
        kept = keep(source, digest, cache)
        original = cache / f"original-{digest}.pth"
        if not original.is_file():
            shutil.copyfile(source, Path(tmp) / "original")
            (Path(tmp) / "original").replace(original)
        return kept, digest


def keep(source: Path, digest: str, cache: Path) -> Path:
    """``source`` (whose SHA-256 is ``digest``, checked by the caller) loaded with ``weights_only=True`` and saved
    again as ``cache/sha256-<digest>.pt``: the only file handed to torch-fidelity, which loads without
    ``weights_only``."""
    kept = cache / f"sha256-{digest}.pt"
    if not kept.is_file():
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever a file that is no state dict raises
            raise InceptionError(f"{source} is not a weights file ({type(exc).__name__}: {exc})") from None
        tmp = kept.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(kept)
    return kept


def cached_weights(cache: Path, expected: str | None) -> tuple[Path, str] | None:
    """Weights already kept in ``cache`` that pass the pin, if any."""
    for kept in sorted(cache.glob("sha256-*.pt")):
        digest = kept.stem.removeprefix("sha256-")
        if (expected or "").lower() == digest or (expected is None and digest.startswith(PUBLISHED_PREFIX)):
            return kept, digest
    return None


def resize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> uint8 (N, 3, 299, 299): clean-fid's resize (each channel as float32,
    Pillow's bicubic), rounded; grey repeated to three channels."""
    from PIL import Image

    x = images[:, None] if images.ndim == 3 else images
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    out = np.empty((len(x), 3, SIDE, SIDE), np.uint8)
    for i, image in enumerate(x.numpy()):
        for c in range(3):
            channel = Image.fromarray(image[c].astype(np.float32), mode="F").resize((SIDE, SIDE), Image.BICUBIC)
            out[i, c] = np.asarray(channel).round().clip(0, 255).astype(np.uint8)
    return torch.from_numpy(out)


class Inception:
    """The network and the test split's statistics: ``score`` gives the metrics that need it (the Inception FID)."""

    def __init__(self, weights: Path, digest: str, mu: np.ndarray | None = None, sigma: np.ndarray | None = None):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # The kept file was saved by this project from tensors loaded with weights_only=True.
        self.network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(weights))
        self.digest = digest
        self.mu, self.sigma = mu, sigma
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> Inception:
        """Run the network on ``device`` (a GPU makes 50,000 samples an evaluation affordable)."""
        self.network.to(device)
        self.device = device
        return self

    @classmethod
    def of(cls, payload: dict[str, Any]) -> Inception:
        """Rebuilt from a run's payload (pipeline.tracking.evaluators.shared_inception): its weights, digest and
        the test split's statistics."""
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "inception.pt"
            torch.save(payload["weights"], weights)  # the state dict as the driver loaded it (weights_only)
            return cls(weights, payload["sha256"], payload["mu"], payload["sigma"])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """uint8 images -> float64 pool3 features (N, 2048)."""
        parts = [
            self.network(resize(images[i : i + BATCH].cpu()).to(self.device))[0].double().cpu()
            for i in range(0, len(images), BATCH)
        ]
        return torch.cat(parts).numpy()

    def reference(self, test: torch.Tensor) -> None:
        self.mu, self.sigma = statistics(self.features(test))

    def score(self, images: torch.Tensor) -> dict[str, float]:
        feats = self.features(images)
        features = Features(feats, None, feats[:0], self.mu, self.sigma)
        return {
            key: value for metric in metrics_needing("inception") for key, value in metric.compute(features).items()
        }
