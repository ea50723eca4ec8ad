"""What a run's workers need of the machine or cluster: CPUs per worker when not set (:func:`resolve_scaling`, the one
place that fills it in), the refusal of what the machine or cluster can never hold, whether GPUs are used, and what
one worker reserves."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import torch

from pipeline.core.errors import ConfigError
from pipeline.distributed.ray_runtime import init_ray

if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig


def resolve_scaling(cfg: PipelineConfig, *, sweep: bool = False) -> PipelineConfig:
    """Fill in ``scaling.cpus_per_worker`` when null (the one place that does): this machine's CPUs shared by
    one run's workers; 1 per worker in a sweep (trials share the machine) and on a cluster."""
    if cfg.scaling.cpus_per_worker is not None:
        return cfg
    alone = not sweep and not os.environ.get("RAY_ADDRESS")
    most = cfg.scaling.max_workers or cfg.scaling.num_workers
    cpus = max(1, (os.cpu_count() or 1) // most) if alone else 1
    return dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, cpus_per_worker=cpus))


def check_resources(cfg: PipelineConfig) -> None:
    """Refuse a request the machine, or the Ray cluster, can never satisfy (Ray would wait for it)."""
    import ray

    # A cluster: RAY_ADDRESS names one, or this process already runs inside Ray (a sweep's trial; a trial
    # process does not inherit RAY_ADDRESS).
    on_cluster = bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
    _check_spread(cfg, on_cluster)
    if on_cluster:
        return
    workers, cpus = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    have_cpus = os.cpu_count() or 1
    if workers * cpus > have_cpus:
        raise ConfigError(
            f"scaling.num_workers: {workers} workers x {cpus} CPU need {workers * cpus} CPUs but this machine has "
            f"{have_cpus}; lower scaling.num_workers or scaling.cpus_per_worker, or set RAY_ADDRESS to a cluster"
        )
    if cfg.scaling.use_gpu == "true" and torch.cuda.device_count() < workers:
        raise ConfigError(
            f"scaling.use_gpu: true with {workers} workers needs that many GPUs; this machine "
            f"has {torch.cuda.device_count()}; set scaling.use_gpu=auto or false, or RAY_ADDRESS to a cluster"
        )


def _check_spread(cfg: PipelineConfig, on_cluster: bool) -> None:
    import ray

    workers = cfg.scaling.num_workers
    if cfg.scaling.placement_strategy != "STRICT_SPREAD" or workers <= 1:
        return
    if on_cluster:
        init_ray()  # joins the running cluster: nothing is started or written
        nodes, where = sum(1 for node in ray.nodes() if node["Alive"]), "the Ray cluster"
    else:
        nodes, where = 1, "without RAY_ADDRESS this machine"
    if nodes < workers:
        raise ConfigError(
            f"scaling.placement_strategy: STRICT_SPREAD puts each of {workers} workers on a node of its own, "
            f"but {where} has {nodes} node(s); start more nodes or set RAY_ADDRESS to a cluster that has "
            "them, lower scaling.num_workers, or use PACK or SPREAD"
        )


def use_gpu(cfg: PipelineConfig) -> bool:
    """``auto``: GPUs when the cluster has them (call after init_ray); ConfigError for CUDA graphs without one."""
    if cfg.scaling.use_gpu != "auto":
        return cfg.scaling.use_gpu == "true"
    import ray

    gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if cfg.train.cuda_graphs == "true" and not gpu:
        raise ConfigError(
            "train.cuda_graphs: true, but the Ray cluster has no GPU (scaling.use_gpu=auto found none); set "
            "train.cuda_graphs=false or run on a cluster with GPUs"
        )
    return gpu


def worker_resources(cfg: PipelineConfig, gpu: bool) -> dict[str, float]:
    """What one worker reserves: its CPUs and, on GPUs, its share of one."""
    return {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": cfg.scaling.gpus_per_worker} if gpu else {})}


def world_size(cfg: PipelineConfig) -> str:
    """A run's worker count as its tag says it: a number, or an elastic run's range."""
    if cfg.scaling.max_workers:
        return f"{cfg.scaling.num_workers}-{cfg.scaling.max_workers}"
    return str(cfg.scaling.num_workers)
