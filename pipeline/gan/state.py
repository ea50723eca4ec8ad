"""What a training run continues from: both networks, their optimizers, G's EMA copy and the counters.

:class:`TrainState` is the one place that knows the checkpoint's layout (``to_checkpoint`` and
``load_checkpoint``); pipeline.core.checkpoint writes and reads the file.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from pipeline.config.schema import PipelineConfig
from pipeline.gan.augment import AdaptiveP
from pipeline.gan.models import Generator, build_models


class EmaGenerator:
    """An exponential moving average of G's weights; BatchNorm statistics are copied from G.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the average does not
    drag the random initial weights along for thousands of steps.
    """

    def __init__(self, generator: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        # torch's EMA of a parameter list: one foreach kernel over all of them (a launch per step on a GPU).
        get_ema_multi_avg_fn(decay)(list(self.model.parameters()), list(generator.parameters()), None)
        for mine, theirs in zip(self.model.buffers(), generator.buffers(), strict=True):
            mine.copy_(theirs)


@dataclass
class TrainState:
    """What a run continues from: both networks, their optimizers, G's EMA copy and the counters.

    :meth:`to_checkpoint` and :meth:`load_checkpoint` are the checkpoint format; pipeline.core.checkpoint writes
    and reads the file.
    """

    generator: Generator
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EmaGenerator | None
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    ada: AdaptiveP | None = None  # an adaptive augmentation probability (train.augment_target)

    @classmethod
    def initial(
        cls,
        cfg: PipelineConfig,
        image_shape: tuple[int, int, int],
        device: torch.device,
        class_weights: torch.Tensor | None = None,
    ) -> TrainState:
        """Fresh networks for images of ``image_shape`` from ``train.seed`` (the same weights on every worker), one
        Adam each, the EMA copy; a conditional GAN's for classes of the training set's ``class_weights``."""
        torch.manual_seed(cfg.train.seed)
        generator, discriminator = build_models(cfg.model, image_shape, class_weights)
        generator.to(device)
        discriminator.to(device)
        # The fused kernel: the same Adam in one pass over all parameters (PyTorch's CPU default loops over them).
        adam = functools.partial(
            torch.optim.Adam, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=True if cfg.optim.fused else None
        )
        opt_g = adam(generator.parameters(), lr=cfg.optim.lr_g)
        opt_d = adam(discriminator.parameters(), lr=cfg.optim.lr_d)
        ema = EmaGenerator(generator, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        ada = None
        if cfg.train.augment_target is not None and cfg.train.diffaugment_kinds:
            train = cfg.train
            ada = AdaptiveP(train.augment_p, train.augment_target, train.batch_size, train.augment_speed, device)
        return cls(generator, discriminator, opt_g, opt_d, ema, ada=ada)

    @property
    def sampler(self) -> nn.Module:
        """The generator that samples, is evaluated and is logged: the EMA copy when the run keeps one."""
        return self.ema.model if self.ema is not None else self.generator

    def set_learning_rates(self, lr_g: float, lr_d: float) -> None:
        for optimizer, lr in ((self.opt_g, lr_g), (self.opt_d, lr_d)):
            for group in optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):  # a captured step reads it from device memory
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr

    def apply_optim(self, cfg: PipelineConfig) -> None:
        """The config's learning rates and betas into both optimizers (a checkpoint's optimizer state carries its
        own: a run continued with other values, as PBT's perturbed trials are, must train with the new ones)."""
        self.set_learning_rates(cfg.optim.lr_g, cfg.optim.lr_d)
        for optimizer in (self.opt_g, self.opt_d):
            for group in optimizer.param_groups:
                group["betas"] = (cfg.optim.beta1, cfg.optim.beta2)

    @property
    def learning_rates(self) -> dict[str, float]:
        """The live learning rates, as the optimizers hold them."""
        return {"lr_g": float(self.opt_g.param_groups[0]["lr"]), "lr_d": float(self.opt_d.param_groups[0]["lr"])}

    def fingerprint(self) -> str:
        """SHA-256 of the networks' weights (G, D and G's EMA copy): equal fingerprints, equal networks."""
        return weights_digest(
            self.generator.state_dict(),
            self.discriminator.state_dict(),
            self.ema.model.state_dict() if self.ema is not None else None,
        )

    def to_checkpoint(self, cfg: PipelineConfig, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint dict; ``partial`` is the epoch's progress when it is taken inside an epoch."""
        return {
            "epoch_partial": partial,
            "generator": self.generator.state_dict(),
            "generator_ema": self.ema.model.state_dict() if self.ema is not None else None,
            "discriminator": self.discriminator.state_dict(),
            "opt_g": portable(self.opt_g.state_dict()),
            "opt_d": portable(self.opt_d.state_dict()),
            "epoch": self.epoch,
            "step": self.step,
            "rng": {"torch": torch.get_rng_state()},
            **({"ada": self.ada.to_dict()} if self.ada is not None else {}),  # the seed's checkpoint as it was
            "config": cfg.to_record(),  # no credential in a checkpoint
        }

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, a dict :meth:`to_checkpoint` made (a run without EMA has no EMA weights)."""
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        if self.ema is not None:
            self.ema.model.load_state_dict(self.sampling_weights(state))
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.ada is not None and state.get("ada"):  # else it starts at train.augment_p
            self.ada.load(state["ada"])
        torch.set_rng_state(state["rng"]["torch"])

    def resume(
        self, checkpoint: dict[str, Any], cfg: PipelineConfig, log: Callable[[str], None] | None, total_steps: int
    ) -> dict[str, Any] | None:
        """Continue from ``checkpoint`` with the config's learning rates and betas (told to ``log``, with the rates
        that changed, unless the run is done); returns its record of the epoch it was taken inside (None at an
        epoch's end)."""
        self.load_checkpoint(checkpoint)
        before = self.learning_rates
        self.apply_optim(cfg)
        if log is not None and self.step < total_steps:
            log(f"resuming from epoch {self.epoch} (step {self.step})")
            if before != self.learning_rates and cfg.optim.lr_final_scale == 1.0:
                changes = ", ".join(f"{k} {before[k]:.3g} -> {v:.3g}" for k, v in self.learning_rates.items())
                log(f"learning rates from the config: {changes}")
        return checkpoint.get("epoch_partial")

    @staticmethod
    def sampling_weights(state: dict[str, Any]) -> dict[str, Any]:
        """From a checkpoint, the generator weights to sample with: the EMA copy if the run kept one."""
        return state.get("generator_ema") or state["generator"]


def portable(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's state_dict as every run can load it: a CUDA-graphed run's learning rates (device tensors)
    as numbers and its ``capturable`` flag off (a CPU run cannot load a capturable Adam)."""
    for group in optimizer_state["param_groups"]:  # state_dict() made these dicts: the live groups are untouched
        group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return optimizer_state


def weights_digest(*state_dicts: dict[str, torch.Tensor] | None) -> str:
    """SHA-256 over the tensors of ``state_dicts`` in order (None counts as an empty one)."""
    digest = hashlib.sha256()
    for weights in state_dicts:
        for name, tensor in (weights or {}).items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
