"""The data-parallel scaling model (pipeline.tools.scaling): its gradient bytes are what DDP really all-reduces in a
training step, its all-reduce time is the ring formula, and its efficiencies move the way they must."""

import os

import pytest
import torch
import torch.distributed as dist

from pipeline.config.load import load_config
from pipeline.gan.loop import train_gan
from pipeline.gan.steps import Runtime
from pipeline.tools.scaling import LINKS, Measured, allreduce_s, efficiency, gradient_bytes, predictions
from tests.conftest import CONFIGS


@pytest.fixture
def one_rank_group(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_gradient_bytes_are_what_ddp_all_reduces_per_step(one_rank_group, fake_split):
    """One process in a gloo group of one, G and D in DistributedDataParallel as Ray Train wraps them on a CPU,
    a comm hook counting every bucket it is asked to reduce: two epochs of steps, the same bytes each step."""
    cfg = load_config(CONFIGS / "smoke.yaml", ["eval.every_epochs=0"])
    reduced: list[int] = []

    def counting(state, bucket):
        reduced.append(bucket.buffer().numel() * bucket.buffer().element_size())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    def wrap(module):
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        ddp.register_comm_hook(None, counting)
        return ddp

    runtime = Runtime(0, 1, torch.device("cpu"), wrap)
    result = train_gan(cfg, fake_split, runtime, [])
    assert sum(reduced) == result.step * gradient_bytes(cfg)


def test_the_all_reduce_is_a_ring_and_efficiency_falls_with_gpus_and_rises_with_the_batch():
    bandwidth, latency = LINKS["100 Gb/s"]
    assert allreduce_s(1_000_000, 4, "100 Gb/s") == pytest.approx(2 * 3 / 4 * 1e6 / bandwidth + 6 * latency)
    assert efficiency(1.0, 0.5, overlap=False) == pytest.approx(1 / 1.5)
    assert efficiency(1.0, 0.5, overlap=True) == 1.0  # hidden behind a backward of 2/3
    assert efficiency(1.0, 1.0, overlap=True) == pytest.approx(1 / (1 + 1 / 3))
    m = Measured(flops_per_image=1e9, cpu_s_per_image=1e-2, gradient_bytes=64 << 20, gpu_flops_per_s=3e13)
    small, large = predictions(m, 32, m.gpu_s_per_image), predictions(m, 256, m.gpu_s_per_image)
    for link in LINKS:
        rows = [small[link][g][0] for g in sorted(small[link])]
        assert rows == sorted(rows, reverse=True), link  # more GPUs, a longer ring
        assert all(large[link][g][0] > small[link][g][0] for g in small[link]), link
        assert all(with_overlap >= without for without, with_overlap in small[link].values())
    assert 16 not in small["NVLink"]  # one NVLink domain holds 8
