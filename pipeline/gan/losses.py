"""The GAN losses on D's logits (``model.loss``) and the R1 penalty (``optim.r1_gamma``).

- ``bce``: the seed's binary cross-entropy: D towards ``train.real_label`` on real images and 0 on fakes, G towards
  1. On logits with targets 1 and 0 it *is* the non-saturating logistic loss (softplus(-D(x)) + softplus(D(G(z))),
  G: softplus(-D(G(z)))), so "non-saturating logistic with R1" is ``bce`` with ``optim.r1_gamma`` > 0.
- ``hinge``: D: relu(1 - D(x)) + relu(1 + D(G(z))); G: -D(G(z)) (Lim & Ye 2017; SAGAN, BigGAN, StudioGAN).

R1 (Mescheder et al. 2018) penalises the squared norm of D's gradient at real images, gamma/2 * |grad|^2, lazily
as StyleGAN2 does: every ``optim.r1_every`` D steps, scaled by that interval so its average weight stays gamma/2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_real_loss(kind: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """D's loss on real images' logits (``target``: BCE's real label, one per image)."""
    if kind == "hinge":
        return F.relu(1.0 - logits).mean()
    return F.binary_cross_entropy_with_logits(logits, target)


def d_fake_loss(kind: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """D's loss on generated images' logits (``target``: BCE's zeros)."""
    if kind == "hinge":
        return F.relu(1.0 + logits).mean()
    return F.binary_cross_entropy_with_logits(logits, target)


def g_loss(kind: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """G's loss on D's logits for its images (``target``: BCE's ones)."""
    if kind == "hinge":
        return -logits.mean()
    return F.binary_cross_entropy_with_logits(logits, target)


def r1_penalty(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The mean over images of |d logits / d real|^2, with its graph (``real`` was given requires_grad); the
    gradient is taken in D's precision (bf16 under autocast), its square and sum in fp32."""
    (grad,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
    return grad.float().square().sum(dim=[1, 2, 3]).mean()
