"""The GAN losses (model.loss), lazy R1 (optim.r1_gamma, optim.r1_every) and real-image flips (data.flip): their
values on known logits, R1's gradient norm, the lazy schedule, the flips each worker draws, and the config check
that keeps R1 out of CUDA graphs. (tests/test_ddp.py: all three under DDP equal one process.)"""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config.load import load_config
from pipeline.core.errors import ConfigError
from pipeline.gan import steps
from pipeline.gan.loop import mirrored, train_gan
from pipeline.gan.losses import d_fake_loss, d_real_loss, g_loss, r1_penalty
from tests.conftest import CONFIGS

LOGITS = torch.tensor([2.0, 0.0, -2.0])


def test_hinge_losses_on_known_logits():
    assert d_real_loss("hinge", LOGITS, LOGITS) == pytest.approx((0 + 1 + 3) / 3)
    assert d_fake_loss("hinge", LOGITS, LOGITS) == pytest.approx((3 + 1 + 0) / 3)
    assert g_loss("hinge", LOGITS, LOGITS) == pytest.approx(0.0)
    assert g_loss("hinge", LOGITS + 1, LOGITS) == pytest.approx(-1.0)


def test_bce_is_the_seed_s_binary_cross_entropy_bit_for_bit():
    target = torch.full((3,), 0.9)
    for loss in (d_real_loss, d_fake_loss, g_loss):
        assert torch.equal(loss("bce", LOGITS, target), F.binary_cross_entropy_with_logits(LOGITS, target))


def test_r1_is_the_squared_gradient_norm_at_the_real_images():
    weight = torch.randn(1, 3, 4, 4)
    real = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (real * weight).sum(dim=[1, 2, 3]) + (real**2).sum(dim=[1, 2, 3])
    penalty = r1_penalty(logits, real)
    want = (weight + 2 * real).square().sum(dim=[1, 2, 3]).mean()
    assert penalty.item() == pytest.approx(want.item(), rel=1e-5)
    penalty.backward()  # it keeps its graph: D's parameters (here the images) get its gradient
    assert real.grad is not None and real.grad.abs().sum() > 0


def test_r1_runs_on_every_r1_every_th_step_only(monkeypatch, fake_split):
    calls: list[int] = []
    real_penalty = steps.r1_penalty

    def counted(logits, real):
        calls.append(1)
        return real_penalty(logits, real)

    monkeypatch.setattr(steps, "r1_penalty", counted)
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.epochs=1", "optim.r1_gamma=1", "optim.r1_every=3"])
    result = train_gan(cfg, fake_split)
    assert result.step >= 4 and len(calls) == -(-result.step // 3)  # steps 0, 3, ...
    calls.clear()
    train_gan(load_config(CONFIGS / "smoke.yaml", ["train.epochs=1"]), fake_split)
    assert calls == []


def test_each_worker_flips_the_images_one_process_would():
    real = torch.arange(4 * 2 * 2, dtype=torch.float32).reshape(4, 1, 2, 2)
    draws = torch.tensor([0.1, 0.9, 0.2, 0.8])
    one = mirrored(real, draws, 0, 1)
    assert torch.equal(one[[0, 2]], real[[0, 2]].flip(3)) and torch.equal(one[[1, 3]], real[[1, 3]])
    # Two workers: the sampler deals images 0, 2 to rank 0 and 1, 3 to rank 1.
    assert torch.equal(mirrored(real[[0, 2]], draws, 0, 2), one[[0, 2]])
    assert torch.equal(mirrored(real[[1, 3]], draws, 1, 2), one[[1, 3]])


def test_r1_with_cuda_graphs_forced_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="train.cuda_graphs: true with optim.r1_gamma=0.1; a step with the lazy R1"):
        load_config(
            CONFIGS / "smoke.yaml",
            ["train.cuda_graphs=true", "optim.r1_gamma=0.1", "scaling.use_gpu=true", "scaling.num_workers=1"],
        )


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_each_loss_trains_finite_with_r1_bf16_ema_and_spectral_norm(fake_split, loss):
    cfg = load_config(
        CONFIGS / "smoke.yaml",
        [
            "train.epochs=1",
            f"model.loss={loss}",
            "optim.r1_gamma=1",
            "optim.r1_every=2",
            "train.precision=bf16",
            "train.ema_decay=0.9",
            "model.d_norm=spectral",
        ],
    )
    result = train_gan(cfg, fake_split)
    assert result.step == 4
    assert all(torch.isfinite(p).all() for p in result.state.discriminator.parameters())
    assert all(torch.isfinite(p).all() for p in result.state.generator.parameters())


def test_r1_where_its_second_derivative_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match="torch.compile does not support R1's double backward"):
        load_config(CONFIGS / "smoke.yaml", ["train.compile=true", "optim.r1_gamma=1", "train.cuda_graphs=false"])
    with pytest.raises(ConfigError, match="the all-reduce of its statistics has no second derivative"):
        load_config(CONFIGS / "smoke.yaml", ["optim.r1_gamma=1", "model.sync_batchnorm=true", "scaling.num_workers=2"])
    load_config(  # spectral norm in D: fine
        CONFIGS / "smoke.yaml",
        ["optim.r1_gamma=1", "model.sync_batchnorm=true", "model.d_norm=spectral", "scaling.num_workers=2"],
    )


def test_a_resumed_run_keeps_its_loss_and_how_it_is_scored():
    from pipeline.distributed.prepare import check_resume_config

    cfg = load_config(CONFIGS / "smoke.yaml", ["model.loss=hinge"])
    saved = load_config(CONFIGS / "smoke.yaml").to_dict()
    with pytest.raises(
        ConfigError, match="model.loss: 'hinge' differs from the checkpoint's 'bce'.*set model.loss=bce"
    ):
        check_resume_config(cfg, saved, "ckpt")
    old = {**saved, "eval": {**saved["eval"], "num_samples": 10000}}  # a run from before the default was null
    with pytest.raises(ConfigError, match="eval.num_samples: 1000 differs .* set eval.num_samples=10000"):
        check_resume_config(load_config(CONFIGS / "smoke.yaml"), old, "ckpt")
    check_resume_config(load_config(CONFIGS / "smoke.yaml", ["optim.r1_gamma=1"]), saved, "ckpt")  # R1 may change
