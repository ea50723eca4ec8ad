import pytest
import torch

from pipeline import checkpoint
from pipeline.checkpoint import CheckpointError
from pipeline.config import load_config
from pipeline.train import train_gan
from tests.conftest import CONFIGS, run_cli


def quiet(_):
    pass


def test_losses_finite_and_parameters_move(smoke_cfg, fake_split):
    torch.manual_seed(smoke_cfg.train.seed)
    from pipeline.models import build_models

    initial_g, initial_d = build_models(smoke_cfg.model)  # train_gan builds the same from the seed
    steps = []
    result = train_gan(smoke_cfg, fake_split, on_step=lambda s, m: steps.append((s, m)), log=quiet)
    assert len(steps) == smoke_cfg.train.epochs * (len(fake_split) // smoke_cfg.train.batch_size)
    for _, metrics in steps:
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
        assert 0 <= metrics["d_real"] <= 1 and 0 <= metrics["d_fake"] <= 1
    final = dict(result.generator.named_parameters())
    for name, before in initial_g.named_parameters():
        assert not torch.equal(before, final[name]), f"generator parameter {name} did not move"
    assert result.epoch == smoke_cfg.train.epochs and result.step == len(steps)


def test_same_seed_same_weights(smoke_cfg, fake_split):
    a = train_gan(smoke_cfg, fake_split, log=quiet).generator.state_dict()
    b = train_gan(smoke_cfg, fake_split, log=quiet).generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fresh", [True, False])
def test_resume_is_exact(smoke_cfg, fake_split, tmp_path, fresh):
    """2 epochs straight == 1 epoch, save, load, 1 more epoch (bit for bit)."""
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.epochs=2", f"train.g_fresh_noise={str(fresh).lower()}"])
    straight_states = []
    straight = train_gan(cfg, fake_split, report=lambda m, s: straight_states.append(s), log=quiet)

    first = load_config(CONFIGS / "smoke.yaml", ["train.epochs=1", f"train.g_fresh_noise={str(fresh).lower()}"])
    path = tmp_path / checkpoint.FILENAME
    train_gan(first, fake_split, report=lambda m, s: checkpoint.save(path, s), log=quiet)
    resumed_states = []
    resumed = train_gan(
        cfg, fake_split, resume=checkpoint.load(path), report=lambda m, s: resumed_states.append(s), log=quiet
    )
    assert resumed.epoch == 2 and resumed.step == straight.step
    for key in ("generator", "discriminator"):
        a, b = straight_states[-1][key], resumed_states[-1][key]
        assert all(torch.equal(a[k], b[k]) for k in a), key
    assert straight_states[-1]["opt_g"]["state"][0]["exp_avg"].equal(resumed_states[-1]["opt_g"]["state"][0]["exp_avg"])


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, smoke_cfg, fake_split):
    path = tmp_path / checkpoint.FILENAME
    train_gan(smoke_cfg, fake_split, report=lambda m, s: checkpoint.save(path, s), log=quiet)
    assert checkpoint.load(path)["epoch"] == smoke_cfg.train.epochs
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_checkpoint_holds_everything_needed(tmp_path, smoke_cfg, fake_split):
    states = []
    train_gan(smoke_cfg, fake_split, report=lambda m, s: states.append(s), log=quiet)
    path = checkpoint.save(tmp_path / "c.pt", states[-1])
    state = checkpoint.load(path)
    assert {"generator", "discriminator", "opt_g", "opt_d", "epoch", "step", "rng", "config"} <= set(state)
    assert state["config"]["model"]["latent_dim"] == smoke_cfg.model.latent_dim


@pytest.mark.slow
def test_cli_train_and_resume_on_real_mnist(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(
        "train",
        "-c",
        "configs/smoke.yaml",
        "--set",
        "train.epochs=1",
        "--set",
        f"train.checkpoint_dir={run_dir}",
    )
    assert first.returncode == 0, first.stderr
    assert "epoch 1/1" in first.stdout and (run_dir / "samples" / "epoch_001.png").is_file()
    again = run_cli("train", "-c", "configs/smoke.yaml", "--set", f"train.checkpoint_dir={run_dir}")
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr  # nothing overwritten
    resumed = run_cli("train", "-c", "configs/smoke.yaml", "--set", "train.epochs=2", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from epoch 1" in resumed.stdout and "epoch 2/2" in resumed.stdout
    assert checkpoint.load(run_dir)["epoch"] == 2
