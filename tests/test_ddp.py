"""Data parallelism proven over many steps: two DDP workers (gloo, one process each) train what one process trains
on the same global batches, every tensor of G, D and both Adams compared on every rank.

The loop's contract makes that comparison possible: every worker draws the same global batch of noise and keeps
its rank's rows, and DistributedSampler's shards of one shuffled order together make the global batch. What can
still differ is BatchNorm (per worker unless ``model.sync_batchnorm``) and the order of float sums.

Adam's update is almost blind to the scale of the gradient (m / sqrt(v)), so summed instead of averaged
gradients barely move the weights: the optimizer states, which double and quadruple, are what show it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pipeline.config.load import load_config
from pipeline.data.kinds import load
from pipeline.data.split import Split
from pipeline.distributed.hooks import Tracking
from pipeline.gan.hooks import On
from pipeline.gan.loop import train_gan
from pipeline.gan.steps import Runtime, all_reduce_mean
from tests.conftest import CONFIGS

WORLD = 2
# 2 epochs of 10 steps (640 images, global batch 64): the epoch's reshuffle and new noise are crossed too.
SETTINGS = ["data.limit=640", "train.batch_size=64", "train.epochs=2", "eval.every_epochs=0", "scaling.num_workers=2"]
# In float64 the order of float sums (two shards' gradients averaged vs one batch's) stays invisible over these 20
# steps: measured 5e-15 relative. (In float32 the same GAN turns a 1e-7 nudge of G's initial weights into
# differences of 4e-2 after 9 steps, in one process alone: float32 cannot tell a DDP bug from that chaos.)
TOLERANCE = 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sum_gradients(state, bucket):  # DDP checks a hook's annotations: none, or its own types
    """A DDP communication hook that sums the workers' gradients instead of averaging them (the injected bug)."""
    import torch.distributed as dist

    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def _wrap(summed: bool):
    """What Ray Train's ``prepare_model`` does on a CPU (DistributedDataParallel(module)), with the bug if asked."""

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        if summed:
            ddp.register_comm_hook(None, _sum_gradients)
        return ddp

    return wrap


def everything(result: Any) -> dict[str, torch.Tensor]:
    """Every tensor a run's result holds: G's and D's parameters and buffers, both Adams' state per parameter, and
    ADA's state where it adapts."""
    state = result.state
    tensors = {f"G.{k}": v for k, v in state.generator.state_dict().items()}
    tensors |= {f"D.{k}": v for k, v in state.discriminator.state_dict().items()}
    for name, optimizer in (("adam_g", state.opt_g), ("adam_d", state.opt_d)):
        for index, per_param in optimizer.state_dict()["state"].items():
            tensors |= {f"{name}.{index}.{k}": v for k, v in per_param.items()}
    if state.ada is not None:  # ADA's probability and its last r_t (over every worker's real images)
        tensors |= {"ada.p": state.ada.p, "ada.r_t": state.ada.r_t}
    return {k: v.detach().clone().double() for k, v in tensors.items()}


def _worker(
    rank: int, port: int, overrides: list[str], data: Split, summed: bool, out: str, run: tuple[str, str] | None
) -> None:
    """One DDP worker: trains, then saves every tensor and its own per-step losses. With ``run`` (an MLflow
    store and run id) rank 0 logs into that run, as a Ray Train worker's rank 0 does."""
    from pipeline.tracking.tracker import MLflowTracker, NullTracker

    with _process_group(rank, port, summed) as runtime:
        cfg = load_config(CONFIGS / "smoke.yaml", overrides)
        tracker = MLflowTracker(*run) if run and rank == 0 else NullTracker()
        steps: dict[int, dict[str, float]] = {}
        hooks = [On(step=lambda st: steps.update({st.number: st.loss_values()})), Tracking(tracker)]
        result = train_gan(cfg, data, runtime, hooks)
        saved = {"step": result.step, "tensors": everything(result), "losses": steps}
        torch.save(saved, f"{out}/rank{rank}.pt")


@contextlib.contextmanager
def _process_group(rank: int, port: int, summed: bool = False) -> Iterator[Runtime]:
    """A spawned worker's gloo process group (one thread, float64), its Runtime inside, destroyed at the end."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield Runtime(rank, WORLD, torch.device("cpu"), _wrap(summed), all_reduce_mean)
    finally:
        dist.destroy_process_group()


def data_parallel(
    tmp_path, overrides: list[str], data: Split, summed: bool = False, run: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """Train ``overrides`` with two DDP workers; what each rank ended with."""
    out = tmp_path / f"{'summed' if summed else 'averaged'}-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    torch.multiprocessing.spawn(_worker, (_free_port(), overrides, data, summed, str(out), run), nprocs=WORLD)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def largest_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the largest absolute difference relative to the reference's largest magnitude."""
    assert got.keys() == want.keys()
    return {k: float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-300)) for k in want}


def disagreeing(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> list[str]:
    """The tensors of ``got`` that differ from ``want`` by more than :data:`TOLERANCE`; prints the largest."""
    differences = largest_differences(got, want)
    worst = max(differences, key=differences.__getitem__)
    print(f"{label}: largest relative difference {differences[worst]:.2e} ({worst})")
    return [k for k, v in differences.items() if v > TOLERANCE]


@pytest.fixture(scope="module")
def images() -> Split:
    cfg = load_config(CONFIGS / "smoke.yaml", SETTINGS)
    return load(cfg.data)


def single_process(overrides: list[str], data: Split, steps: int = 20) -> dict[str, torch.Tensor]:
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result = train_gan(cfg, data)
    finally:
        torch.set_default_dtype(before)
    assert result.step == steps
    return everything(result)


@pytest.mark.slow
def test_two_workers_train_what_one_process_trains_and_a_summed_gradient_is_caught(tmp_path, images):
    overrides = [*SETTINGS, "model.sync_batchnorm=true"]
    reference = single_process(overrides, images)
    for rank, got in enumerate(data_parallel(tmp_path, overrides, images)):
        assert got["step"] == 20
        assert disagreeing(got["tensors"], reference, f"rank {rank}, gradients averaged") == []

    summed = data_parallel(tmp_path, overrides, images, summed=True)
    for rank, got in enumerate(summed):
        wrong = disagreeing(got["tensors"], reference, f"rank {rank}, gradients summed")
        # Adam's moments of every parameter (twice the mean gradient, four times its square) give it away.
        moments = [k for k in reference if k.endswith(("exp_avg", "exp_avg_sq"))]
        assert set(moments) <= set(wrong)


@pytest.mark.slow
def test_batchnorm_nets_match_one_process_only_with_sync_batchnorm(tmp_path, images):
    """The seed's nets (BatchNorm in G and D): without model.sync_batchnorm each worker normalises over its
    shard, which one process over the global batch does not; with it they agree (the test above)."""
    reference = single_process(SETTINGS, images)
    per_shard = data_parallel(tmp_path, SETTINGS, images)
    assert len(disagreeing(per_shard[0]["tensors"], reference, "BatchNorm per worker")) > len(reference) / 2
    # The workers agree with each other on what DDP keeps equal: the weights and both Adams.
    kept = {k: v for k, v in per_shard[0]["tensors"].items() if ".running_" not in k and "num_batches" not in k}
    assert disagreeing({k: per_shard[1]["tensors"][k] for k in kept}, kept, "rank 1 vs rank 0") == []


def test_mlflow_holds_the_mean_of_every_workers_losses(tmp_path, images):
    """The two shards are made to differ (one worker's real images all black, the other's as they are), so the
    workers' losses differ; every logged figure is the mean over both workers' steps since the last log, and the
    epoch's means are there too."""
    from torch.utils.data import DistributedSampler

    from pipeline.tracking.store import start_run
    from pipeline.tracking.tracker import MLflowTracker

    overrides = [*SETTINGS, "train.epochs=1", "tracking.log_every=2"]
    first = DistributedSampler(range(len(images)), num_replicas=WORLD, rank=0, shuffle=True, seed=0, drop_last=True)
    first.set_epoch(0)
    darkened = images.images.clone()
    darkened[list(first)] = 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "ddp", "two-workers")
    ranks = data_parallel(tmp_path, overrides, Split(darkened, images.labels), run=(uri, run_id))
    per_rank = [ranks[r]["losses"] for r in range(WORLD)]
    assert sorted(per_rank[0]) == sorted(per_rank[1]) == list(range(1, 11))
    tracker = MLflowTracker(uri, run_id)
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):
        apart = [abs(per_rank[0][s][key] - per_rank[1][s][key]) for s in range(1, 11)]
        if key == "d_real":
            assert sum(apart) / len(apart) > 0.01, apart  # the shards differ: rank 0's alone would show
        logged = tracker.metric_history(key)
        expected = [
            (s, sum(per_rank[r][t][key] for r in range(WORLD) for t in (s - 1, s)) / 4) for s in (2, 4, 6, 8, 10)
        ]
        assert [step for step, _ in logged] == [step for step, _ in expected]
        for (_, got), (_, want) in zip(logged, expected, strict=True):
            assert got == pytest.approx(want, rel=1e-9), key
        epoch_mean = sum(per_rank[r][s][key] for r in range(WORLD) for s in range(1, 11)) / 20
        assert tracker.metric_history(f"epoch_{key}") == [(10, pytest.approx(epoch_mean, rel=1e-9))]


@pytest.mark.slow
def test_hinge_r1_flips_and_diffaugment_train_under_ddp_what_one_process_trains(tmp_path, images):
    """R1's double backward through a DDP-wrapped, spectrally normalised D, the hinge loss, the flips of real images
    and DiffAugment (each worker keeping its rows of the global batch's draws) at ADA's adaptive probability (its
    sums reduced over the workers): two workers end where one process
    does (R1 on every other step, so both kinds of step are crossed; one epoch of 10 steps, for CI's time)."""
    base = [*SETTINGS, "train.epochs=1", "model.sync_batchnorm=true", "model.d_norm=spectral"]
    overrides = [
        *base,
        "model.loss=hinge",
        "optim.r1_gamma=1.0",
        "optim.r1_every=2",
        "data.flip=true",
        "train.diffaugment=color,translation,cutout",
        "train.augment_p=0.5",
        # ADA: the signs of D's real logits summed over both workers move p by 0.25 every 4 steps
        "train.augment_target=0.6",
        "train.augment_speed=1024",
    ]
    reference = single_process(overrides, images, steps=10)
    plain = single_process(base, images, steps=10)
    networks = {k: v for k, v in reference.items() if not k.startswith("ada.")}
    assert len(disagreeing(plain, networks, "without hinge, R1, flips and DiffAugment")) > len(networks) / 2
    for rank, got in enumerate(data_parallel(tmp_path, overrides, images)):
        assert got["step"] == 10
        assert disagreeing(got["tensors"], reference, f"rank {rank}, hinge + R1 + flips + DiffAugment") == []


@pytest.mark.slow
@pytest.mark.parametrize("conditioning", ["embedding", "batchnorm"])
def test_a_conditional_gan_trains_under_ddp_what_one_process_trains(tmp_path, images, conditioning):
    """Each worker's real images with their own labels (rows rank::world of the global batch) and its generated
    images' classes (its rows of the global draw, as its noise): two workers end where one process does, with the
    class embedded beside the noise or in G's BatchNorms."""
    overrides = [
        *SETTINGS,
        "train.epochs=1",
        "model.sync_batchnorm=true",
        "model.conditional=true",
        f"model.g_conditioning={conditioning}",
    ]
    reference = single_process(overrides, images, steps=10)
    g_class = "G.embed.weight" if conditioning == "embedding" else "G.net.2.gain.weight"
    assert g_class in reference and "D.embed.weight" in reference
    for rank, got in enumerate(data_parallel(tmp_path, overrides, images)):
        assert got["step"] == 10
        assert disagreeing(got["tensors"], reference, f"rank {rank}, conditional by {conditioning}") == []


def _resumable_worker(rank: int, port: int, overrides: list[str], data: Split, out: str, resume: str | None) -> None:
    """One DDP worker that saves rank 0's checkpoint of the first report inside the epoch and, with ``resume``,
    continues from such a checkpoint; saves every tensor it ends with."""
    import copy

    from pipeline.core import checkpoint

    with _process_group(rank, port) as runtime:
        cfg = load_config(CONFIGS / "smoke.yaml", overrides)
        kept: list = []
        hooks = [On(report=lambda r: kept.append(copy.deepcopy(r.checkpoint)) if r.checkpoint else None)]
        result = train_gan(cfg, data, runtime, hooks, resume=checkpoint.load(resume) if resume else None)
        if rank == 0 and not resume:
            checkpoint.save(f"{out}/inside.pt", next(c for c in kept if c["epoch_partial"] is not None))
        torch.save({"step": result.step, "tensors": everything(result)}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_an_adaptive_run_resumed_under_ddp_inside_an_adjustment_interval_goes_on_exactly(tmp_path, images):
    """ADA's sums since its last adjustment (every 4 steps) are every worker's own until the adjustment reduces
    them: at a report they are shared first, so rank 0's checkpoint holds what every worker goes on from. A
    checkpoint at step 18 (2 steps into the last interval) resumed by two workers ends where the straight run does,
    its last r_t (step 20's) included."""
    overrides = [
        *SETTINGS,
        "train.epochs=2",
        "tune.report_every_steps=18",
        "optim.lr_d=1.0e-6",  # D stays unsure: its real verdicts' signs differ between the workers' images
        "train.diffaugment=translation",
        "train.augment_p=0.5",
        "train.augment_target=0.6",
        "train.augment_speed=1024",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    torch.multiprocessing.spawn(_resumable_worker, (_free_port(), overrides, images, str(straight), None), nprocs=WORLD)
    torch.multiprocessing.spawn(
        _resumable_worker, (_free_port(), overrides, images, str(resumed), str(straight / "inside.pt")), nprocs=WORLD
    )
    saved = torch.load(straight / "inside.pt", weights_only=True)
    assert saved["step"] == 18 and saved["ada"]["sums"][1] == 2 * 64 / WORLD  # two steps, a worker's mean
    for rank in range(WORLD):
        want = torch.load(straight / f"rank{rank}.pt", weights_only=True)["tensors"]
        got = torch.load(resumed / f"rank{rank}.pt", weights_only=True)["tensors"]
        assert disagreeing(got, want, f"rank {rank}, ADA resumed at step 18") == []
