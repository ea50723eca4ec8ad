"""The maths of the scores, on feature arrays: Fréchet distance, Inception Score, KID, precision and recall, feature
statistics."""

from __future__ import annotations

import numpy as np
import torch


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


def frechet_distance_of_sets(features: np.ndarray, reference: np.ndarray) -> float:
    """:func:`frechet_distance` of two feature sets' statistics, computed from the sets (N and M rows of D): with
    A and B the centred sets over sqrt(N-1) and sqrt(M-1), S1 = A'A and S2 = B'B, and Tr((S1 S2)^1/2) is the sum of
    the singular values of A B' (the nonzero eigenvalues of S1 S2 are those of (A B')(A B')'). An N x M problem
    instead of two D x D ones: what a small folder's evaluation costs when D (a 64 px extractor's 1,920 features)
    exceeds its images."""
    x, y = np.asarray(features, np.float64), np.asarray(reference, np.float64)
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    a, b = (x - mu1) / np.sqrt(len(x) - 1), (y - mu2) / np.sqrt(len(y) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * trace_sqrt)


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


KID_WHOLE_KERNELS = 3000  # up to this many images in both sets, KID computes each kernel matrix once (<= 72 MB)


def kernel_inception_distance(
    features: np.ndarray, reference: np.ndarray, subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al., 2018): the unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³, mean and std
    over ``subsets`` random subsets of ``subset_size`` of each set (both drawn without replacement; the size cut to
    the smaller set), as torch-fidelity and clean-fid compute it (they take 100 subsets: 50 halve the time and
    widen the mean's spread by 1.4x). Unlike theirs, the features are first divided by the reference's RMS (theirs
    are Inception's, already about 1; a network's own may be 100x off, and the cube would swamp or vanish); kernels
    in float32, their sums in float64."""
    x, y = np.asarray(features, np.float64), np.asarray(reference, np.float64)
    # The kernel sees features scaled so that the reference's mean squared entry is 1, as Inception's pool features
    # roughly are: a network's own features may be 100x larger or smaller, and the cube would swamp or vanish.
    scale = np.sqrt((y**2).mean()) or 1.0
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    xt, yt, dim = torch.from_numpy(x / scale).float(), torch.from_numpy(y / scale).float(), x.shape[1]

    def kernel(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        k = p @ q.T / dim + 1
        return (k * k * k).double()  # a product, not a power: several times faster

    # Small sets (a folder's few hundred held-out images): each kernel once; a subset's block sums are then w'Kv
    # with w, v its 0/1 indicators, not new kernels of its features.
    whole = (kernel(xt, xt), kernel(yt, yt), kernel(xt, yt)) if len(x) + len(y) <= KID_WHOLE_KERNELS else None
    values = []
    for _ in range(subsets):
        ia = torch.from_numpy(rng.choice(len(x), m, replace=False))
        ib = torch.from_numpy(rng.choice(len(y), m, replace=False))
        if whole is not None:
            (k_xx, k_yy, k_xy), wa, wb = whole, _indicator(ia, len(x)), _indicator(ib, len(y))
            sum_aa, sum_bb, sum_ab = wa @ k_xx @ wa, wb @ k_yy @ wb, wa @ k_xy @ wb
            traces = k_xx.diagonal()[ia].sum() + k_yy.diagonal()[ib].sum()
        else:
            a, b = xt[ia], yt[ib]
            k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
            sum_aa, sum_bb, sum_ab, traces = k_aa.sum(), k_bb.sum(), k_ab.sum(), k_aa.trace() + k_bb.trace()
        within = (sum_aa + sum_bb - traces) / (m * (m - 1))
        values.append(float(within - 2 * sum_ab / (m * m)))
    return float(np.mean(values)), float(np.std(values))


def _indicator(rows: torch.Tensor, n: int) -> torch.Tensor:
    """A float64 vector of ``n`` zeros with ones at ``rows``."""
    w = torch.zeros(n, dtype=torch.float64)
    w[rows] = 1.0
    return w


def _pairwise(a: torch.Tensor, b: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)), a block of rows at a time."""
    return torch.cat([torch.cdist(a[i : i + rows], b) for i in range(0, len(a), rows)])


def manifold_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Each feature's distance to its k-th nearest neighbour among the others: the radius of its ball in the
    k-NN manifold of Kynkäänniemi et al. (2019)."""
    x = torch.from_numpy(np.array(features, np.float32))  # a copy: arrays from Ray's object store are read-only
    if len(x) <= k:
        raise ValueError(f"a k={k} manifold needs more than {k} images, got {len(x)}")
    radii = [torch.cdist(x[i : i + 1024], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), 1024)]
    return torch.cat(radii).numpy()  # k + 1: each point is its own nearest, at 0


def precision_recall(
    features: np.ndarray, reference: np.ndarray, k: int = 3, reference_radii: np.ndarray | None = None
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019): precision is the share of generated features
    inside the real manifold (the union of balls around each real feature reaching its k-th nearest real
    neighbour), recall the share of real features inside the generated manifold. ``reference_radii`` are the real
    manifold's radii when already known (:func:`manifold_radii`)."""
    fake = torch.from_numpy(np.array(features, np.float32))  # copies: arrays from Ray's object store are read-only
    real = torch.from_numpy(np.array(reference, np.float32))
    real_radii = torch.from_numpy(
        np.array(reference_radii if reference_radii is not None else manifold_radii(reference, k))
    )
    fake_radii = torch.from_numpy(manifold_radii(features, k))
    distances = _pairwise(fake, real)  # (fake, real)
    precision = (distances <= real_radii[None, :]).any(dim=1).float().mean()
    recall = (distances <= fake_radii[:, None]).any(dim=0).float().mean()
    return float(precision), float(recall)
