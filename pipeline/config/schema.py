"""The config's sections as typed dataclasses: every key, its default and a one-line doc (``doc`` in the field's
metadata; docs/config.md is generated from them), with its range (``gt``, ``ge``, ``lt``, ``le``) or the registry
its value must name (``one_of``). pipeline.config.load builds them from YAML; pipeline.config.checks checks them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.data.folder import IMAGE_SIZES
from pipeline.data.kinds import DEFAULT_DATASET, source_names

DIFFAUGMENT_KINDS = ("color", "translation", "cutout")  # train.diffaugment's (pipeline.gan.augment)


def _f(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field with its doc and range checks (``gt``, ``ge``, ``le``, ``lt``) as metadata."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **checks})
    return field(default=default, metadata={"doc": doc, **checks})


@dataclass
class DataConfig:
    dataset: str = _f(
        DEFAULT_DATASET,
        f"which data to train on: {', '.join(source_names())} (a folder of your own)",
        one_of=source_names,
    )
    root: str | None = _f(None, "data directory; null = $PIPELINE_DATA_ROOT, else ~/.cache/gan-pipeline/data")
    limit: int | None = _f(None, "train on the first N training images only; null = all", ge=1)
    path: str | None = _f(
        None,
        "the data's folder, for kinds that read one (images: a directory or s3://bucket/prefix, one subfolder per "
        "class)",
    )
    image_size: int | None = _f(None, f"images only: the side they are prepared at: {', '.join(map(str, IMAGE_SIZES))}")
    channels: int = _f(1, "images only: 1 (grey) or 3 (RGB)", ge=1, le=3)
    prepared: str | None = _f(None, "images only: where the prepared shards go; null = <path>.prepared/<side>px-<c>ch")
    test_fraction: float = _f(0.1, "images only: the share held out (by a hash of each path)", ge=0.0, lt=1.0)
    background: str = _f(
        "white",
        "images only: the colour transparent areas are shown on when prepared (a name such as white, black, grey "
        "or #rrggbb)",
    )
    stream: bool | None = _f(
        None,
        "images only: each worker streams its part of the shards (a bounded buffer) instead of holding the whole "
        "set; null = stream when the training images pass data.stream_above_mb",
    )
    stream_above_mb: int = _f(1024, "images only: with data.stream null, stream sets above this many MB (pixels)", ge=0)
    flip: bool = _f(False, "mirror each real image left-right at even odds as it is trained on (not for digits)")
    evaluator: Literal["auto", "classifier", "rotation"] = _f(
        "auto",
        "the network whose features score this data (docs/scores.md): auto = a classifier of its classes where it "
        "has them (FID, IS, KID, precision/recall), else a rotation extractor trained without labels (no IS); "
        "rotation on data with classes too (no IS; its precision falls under heavy blur, a classifier's rises)",
    )


@dataclass
class ModelConfig:
    latent_dim: int = _f(100, "size of the generator's noise vector", ge=1)
    g_channels: int = _f(64, "generator width: channels of its last hidden layer", ge=1)
    g_extra_layers: int = _f(
        0, "3x3 conv layers the generator adds at half the image side (MNIST: 14x14) before its last layer", ge=0
    )
    d_channels: int = _f(64, "discriminator width: channels of its first layer", ge=1)
    d_norm: Literal["batch", "spectral", "none"] = _f(
        "batch", "discriminator normalisation: BatchNorm (the seed's), spectral norm on every layer, or none"
    )
    d_dropout: float = _f(0.0, "dropout after each hidden discriminator layer; 0 = off, e.g. 0.3", ge=0.0, lt=1.0)
    d_extra_layers: int = _f(
        0, "3x3 conv layers the discriminator adds at its smallest side (MNIST: 7x7) before its last layer", ge=0
    )
    loss: Literal["bce", "hinge"] = _f(
        "bce",
        "the GAN loss (pipeline/gan/losses.py): bce = the seed's binary cross-entropy, i.e. the non-saturating "
        "logistic loss (with optim.r1_gamma: StyleGAN2's); hinge = SAGAN/BigGAN's",
    )
    conditional: bool = _f(
        False,
        "class-conditional GAN, for data with classes: G takes its class (model.g_conditioning), D projects "
        "its features onto the class's embedding (Miyato & Koyama 2018); generated classes follow the training "
        "set's class frequencies; sample --class K asks for one",
    )
    g_conditioning: Literal["embedding", "batchnorm"] = _f(
        "embedding",
        "how a conditional G takes its class: embedding = a learnt class vector concatenated to the noise; "
        "batchnorm = conditional BatchNorm (each G BatchNorm gets the class's own gain and shift)",
    )
    sync_batchnorm: bool = _f(
        False,
        "with several workers, BatchNorm statistics over the global batch (SyncBatchNorm: one process's "
        "numbers); false = each worker normalises over its own shard (no extra all-reduce per layer)",
    )


@dataclass
class OptimConfig:
    lr_g: float = _f(2e-4, "generator Adam learning rate", gt=0.0)
    lr_d: float = _f(2e-4, "discriminator Adam learning rate", gt=0.0)
    beta1: float = _f(0.5, "Adam beta1 (both networks)", ge=0.0, lt=1.0)
    beta2: float = _f(0.999, "Adam beta2 (both networks)", ge=0.0, lt=1.0)
    lr_final_scale: float = _f(
        1.0,
        "both learning rates fall linearly to this fraction of their value by the last step; 1 = constant",
        ge=0.0,
        le=1.0,
    )
    r1_gamma: float = _f(
        0.0, "R1 penalty on D's gradient at real images, gamma/2 |grad|^2; 0 = off, e.g. 0.1 at 32-64 px", ge=0.0
    )
    r1_every: int = _f(16, "with optim.r1_gamma: the penalty every N D steps, weighted N times (lazy R1)", ge=1)
    fused: bool = _f(True, "Adam's fused kernel: one pass over all parameters; false = PyTorch's per-tensor loop")


@dataclass
class TrainConfig:
    epochs: int = _f(5, "passes over the (limited) training set", ge=1)
    batch_size: int = _f(128, "global batch size: split evenly across workers", ge=1)
    seed: int = _f(0, "seed for weights, shuffling and noise; same seed, same run", ge=0)
    g_fresh_noise: bool = _f(
        True, "generator step draws fresh noise (true) or reuses the D step's fakes (false, one G forward)"
    )
    ema_decay: float = _f(
        0.0,
        "exponential moving average of G's weights for sampling and evaluation; 0 = off, e.g. 0.999",
        ge=0.0,
        lt=1.0,
    )
    diffaugment: str = _f(
        "",
        "DiffAugment (pipeline/gan/augment.py) of every image D sees, real and generated, in D's and G's steps: "
        "comma-separated kinds of color, translation, cutout; empty = off; e.g. color,translation,cutout",
    )
    augment_p: float = _f(
        1.0,
        "with train.diffaugment: the probability each kind applies to an image (with train.augment_target: where "
        "it starts)",
        ge=0.0,
        le=1.0,
    )
    augment_target: float | None = _f(
        None,
        "with train.diffaugment: adapt the probability as ADA does (Karras et al. 2020): every 4 steps it rises "
        "while r_t = E[sign D(x)] over real images is above this and falls while below (0.6: D rates about 80% of "
        "them real); logged as augment_p; null = fixed train.augment_p; e.g. 0.6 with train.augment_p=0",
        gt=0.0,
        lt=1.0,
    )
    augment_speed: int = _f(
        100_000,
        "with train.augment_target: training images over which the probability can move by 1 (ADA's 500k suits "
        "runs of millions of images)",
        ge=1,
    )

    @property
    def diffaugment_kinds(self) -> tuple[str, ...]:
        """The kinds ``diffaugment`` names (applied colour, translation, cutout, in that order)."""
        return tuple(kind for kind in self.diffaugment.split(",") if kind)

    real_label: float = _f(1.0, "D's target for real images; 0.9 = one-sided label smoothing", gt=0.0, le=1.0)
    top_k_final: float = _f(
        1.0,
        "top-k generator training: G learns only from the fakes D rates most real, a share of each batch "
        "falling linearly from 1 to this by the last step; 1 = off, e.g. 0.5",
        gt=0.0,
        le=1.0,
    )
    precision: Literal["fp32", "bf16", "auto"] = _f(
        "fp32",
        "bf16 = bfloat16 autocast for forward passes; auto = bf16 where the device computes it natively (a GPU "
        "with bf16, a CPU with AVX512-BF16 or AMX, as Linux lists its flags), else fp32",
    )
    channels_last: bool = _f(False, "NHWC memory layout for images and conv weights")
    compile: bool = _f(False, "torch.compile G and D (first steps pay the compilation)")
    cuda_graphs: Literal["auto", "true", "false"] = _f(
        "false",
        "capture each training step (D and G updates) as a CUDA graph and replay it: one launch instead of "
        "hundreds (small models at small batches on a GPU); true = one-worker runs on a CUDA GPU, refused "
        "elsewhere; auto = where a run has one worker on a CUDA GPU, plain steps elsewhere",
    )
    storage_path: str | None = _f(
        None, "where Ray Train keeps runs and checkpoints; null = <project>/runs; shared storage on a cluster"
    )
    keep_checkpoints: int = _f(2, "latest checkpoints kept per run (Ray Train's num_to_keep)", ge=1)
    max_failures: int = _f(2, "worker-group restarts from the last checkpoint before a run fails", ge=0)


@dataclass
class EvalConfig:
    every_epochs: int = _f(1, "score the generator every N epochs (and after the last); 0 = never", ge=0)
    num_samples: int | None = _f(
        None,
        "generated images scored per evaluation; null = as many as the held-out images they are compared with (at "
        "most 10,000: MNIST's test split), so that scoring costs the same small share of an epoch on any folder",
        ge=4,
    )
    inception_weights: str | None = _f(
        None,
        "the TF-FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth) for the standard Inception FID: a "
        "path, an http(s) URL, or 'download' (pytorch-fid's release); looked for first on this host and in the "
        "tracking store (by their SHA-256), else fetched, checked and shared there; null = no Inception FID",
    )
    inception_sha256: str | None = _f(
        None, "the SHA-256 the Inception weights must have; null = the published file's (its digest starts 6726825d)"
    )
    inception_samples: int = _f(
        2_000,
        "generated (and held-out) images the Inception FID compares at each evaluation; papers use 50,000, which "
        "takes hours on a CPU",
        ge=4,
    )


@dataclass
class ScalingConfig:
    num_workers: int = _f(
        1, "data-parallel workers (Ray Train); [min, max] makes a sweep's trials elastic (sets max_workers)", ge=1
    )
    max_workers: int | None = _f(
        None,
        "elastic trials: a sweep's trial grows to this many workers while CPUs/GPUs are free and shrinks back "
        "to num_workers when other trials need them; null = a fixed num_workers",
        ge=1,
    )
    elastic_grow_min_s: float = _f(
        60.0,
        "elastic trials: grow only when the training left would take at least this long at the trial's pace "
        "(growing restarts the trial's workers from a checkpoint, about one trial start)",
        ge=0.0,
    )
    cpus_per_worker: int | None = _f(
        None,
        "CPUs per worker, also its torch threads; null = local CPUs / num_workers, 1 in a sweep or on a cluster; "
        "[min, max] makes a sweep's one-worker CPU trials grow their threads (sets max_cpus_per_worker)",
        ge=1,
    )
    max_cpus_per_worker: int | None = _f(
        None,
        "a sweep's one-worker trials on CPUs: a trial's torch threads grow to this many while its node's CPUs are "
        "free (no restart) and fall back to cpus_per_worker when trials wait to start; null = fixed",
        ge=1,
    )
    use_gpu: Literal["auto", "true", "false"] = _f("auto", "auto = use GPUs when the cluster has them")
    gpus_per_worker: float = _f(
        1.0,
        "share of a GPU each worker reserves when GPUs are used; below 1 (e.g. 0.25) packs several one-worker "
        "trials onto one GPU (pays for small, launch-bound models: docs/performance.md, 'Several trials per GPU')",
        gt=0.0,
        le=1.0,
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = _f(
        "PACK",
        "how Ray places a run's workers: PACK on as few nodes as fit, SPREAD over as many, STRICT_SPREAD one per node",
    )
    resource_wait_s: float = _f(
        600.0,
        "seconds a run waits for its workers' CPUs/GPUs (at the start, and for a lost node's replacement) "
        "before it fails",
        gt=0.0,
    )


@dataclass
class TuneConfig:
    name: str | None = _f(None, "sweep name: its directory under train.storage_path; null = <dataset>-sweep-<time>")
    num_samples: int = _f(4, "trials to sample (with grid axes: repeats of the whole grid)", ge=1)
    metric: str | None = _f(
        None,
        "what a sweep ranks trials by (its schedulers compare it; the best trial has the best): a metric that can "
        "rank (docs/config.md lists them); null = FID",
    )
    mode: Literal["min", "max"] | None = _f(None, "min or max: which way tune.metric is better; null = the metric's")
    search_alg: Literal["random", "optuna"] = _f("random", "random sampling, or Optuna's TPE")
    scheduler: str = _f(
        "asha",
        "asha (stops weak trials early: tune.grace_period, tune.reduction_factor), pbt (population based training: "
        "copies strong trials' weights into weak ones and perturbs their hyperparameters) or none (every trial to "
        "its end)",
    )
    report_every_steps: int | None = _f(
        None,
        "also report (FID and IS, a checkpoint) every N optimizer steps inside an epoch, so schedulers decide "
        "more often than once an epoch; null = at epoch ends only",
        ge=1,
    )
    grace_period: int = _f(1, "ASHA: epochs every trial runs before it may be stopped", ge=1)
    reduction_factor: int = _f(2, "ASHA: the best 1/N of trials go on at each rung", ge=2)
    pbt_interval: float = _f(
        1.0, "PBT: epochs of training between exploit/explore decisions (0.5 needs tune.report_every_steps)", gt=0.0
    )
    pbt_mutate: list[str] | None = _f(
        None,
        "PBT: the searched keys whose values are perturbed at each exploit; null = every searched optim.* and "
        "train.* key PBT can change mid-run (model.* and train.batch_size never)",
    )
    pbt_factors: list[float] = _f(
        [0.8, 1.2], "PBT: a perturbed number is multiplied by one of these (clipped to its search range)"
    )
    pbt_quantile: float = _f(
        0.25, "PBT: the bottom share of trials that copy one of the top share at each decision", gt=0.0, le=0.5
    )
    pbt_resample_probability: float = _f(
        0.25, "PBT: chance that a perturbed key is drawn afresh from its search range instead", ge=0.0, le=1.0
    )
    max_concurrent_trials: int | None = _f(None, "null = what the cluster's CPUs/GPUs allow for one trial", ge=1)
    search_space: dict[str, Any] = _f(
        {}, "dotted key -> {uniform|loguniform|randint: [low, high]} or {choice|grid: [values]}"
    )


@dataclass
class TrackingConfig:
    uri: str | None = _f(None, "MLflow tracking URI; $MLFLOW_TRACKING_URI wins; null = <project>/mlflow.db")
    experiment: str = _f("gan-pipeline", "MLflow experiment name")
    log_every: int = _f(50, "every N global steps, log the losses' mean over those N steps of every worker", ge=1)
    registered_model: str | None = _f(
        None,
        "Model Registry name for the best generator of each train/tune (alias `champion` = the best "
        "tracking.champion_metric); null = gan-<dataset>, '' = do not register",
    )
    champion_metric: str | None = _f(
        None,
        "the metric that moves the registry's `champion` alias and picks the checkpoints Ray Train keeps besides the "
        "latest: any metric that can rank (docs/config.md lists them, with their direction); null = FID",
    )
    system_metrics_s: float = _f(10.0, "seconds between MLflow system-metrics samples (CPU, memory, GPU); 0 off", ge=0)


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def without_secrets(self) -> PipelineConfig:
        """This config with the tracking URI's password masked: what may be kept where it could be read (a
        checkpoint, a results file, a callback Ray Tune pickles into its records)."""
        from pipeline.core.secrets import masked_uri

        return dataclasses.replace(self, tracking=dataclasses.replace(self.tracking, uri=masked_uri(self.tracking.uri)))

    def to_record(self) -> dict[str, Any]:
        """:meth:`to_dict` as a record keeps it: :meth:`without_secrets`."""
        return self.without_secrets().to_dict()

    def flat(self) -> dict[str, Any]:
        """``{"data.dataset": "mnist", ...}``: every leaf under its dotted key."""
        return {
            f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()
        }
