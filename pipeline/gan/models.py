"""DCGAN generator and discriminator for square images whose side is a multiple of 4, of any number of channels
(the dataset's spec says which: MNIST's 1 x 28 x 28): as many stride-2 layers as the side allows
(:func:`network_plan`), so 32-128 px images get 3-5."""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

import torch
from torch import nn

from pipeline.config.schema import ModelConfig

T = TypeVar("T")
ImageShape = tuple[int, int, int]  # (channels, height, width)


def network_plan(image_shape: ImageShape) -> tuple[int, int]:
    """(side of the networks' smallest feature map, stride-2 layers between it and the image): the image's side
    halved while it stays even and its half is at least 3, at least twice. MNIST's 28: (7, 2); 32: (4, 3);
    64: (4, 4); 128: (4, 5)."""
    channels, height, width = image_shape
    if height != width or height % 4:
        raise ValueError(f"images of {height}x{width} pixels: the networks need a square whose side divides by 4")
    side, layers = height, 0
    while layers < 2 or (side % 2 == 0 and side // 2 >= 3):
        side, layers = side // 2, layers + 1
    return side, layers


class Generator(nn.Module):
    """Latent vector (B, latent_dim) -> image (B, C, S, S) in [-1, 1]: 1x1 -> the smallest side, then doubling to
    S (:func:`network_plan`; MNIST: 7, 14, 28; 64 px: 4, 8, 16, 32, 64). The hidden widths halve from
    ``channels * 2**layers`` to ``channels * 2`` (MNIST: 4c, 2c).

    ``extra_layers`` adds 3x3 convolutions (BatchNorm, ReLU) at S/2 before the last layer: a deeper G,
    each doubling its FLOPs at the default width.

    Conditional (``class_weights``: the training set's class frequencies, one per class): its input carries each
    image's class index as one last column, (B, latent_dim + 1) (:func:`with_classes`). ``conditioning``
    "embedding": the class's learnt embedding (latent_dim values) is concatenated to the noise; "batchnorm":
    conditional BatchNorm, each BatchNorm followed by the class's own gain and shift (:class:`ClassAffine`). One
    tensor in: exported and sampled as any G is. The frequencies are a buffer: what a conditional sample draws its
    classes from (pipeline.gan.sampling).
    """

    def __init__(
        self,
        latent_dim: int,
        channels: int,
        extra_layers: int,
        image_shape: ImageShape,
        class_weights: torch.Tensor | None = None,
        conditioning: str = "embedding",
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.classes = 0 if class_weights is None else len(class_weights)
        embedded = self.classes > 0 and conditioning == "embedding"
        if self.classes:
            self.register_buffer("class_weights", class_weights.double())
        if embedded:
            self.embed = nn.Embedding(self.classes, latent_dim)
        side, layers = network_plan(image_shape)
        widths = [channels * 2 ** (layers - i) for i in range(layers)]

        def block(conv: nn.Module) -> list[nn.Module]:
            affine = [ClassAffine(self.classes, conv.out_channels)] if self.classes and not embedded else []
            return [conv, nn.BatchNorm2d(conv.out_channels), *affine, nn.ReLU(True)]

        self.net = nn.Sequential(
            *block(nn.ConvTranspose2d(latent_dim * (2 if embedded else 1), widths[0], side, 1, 0, bias=False)),
            *[m for a, b in itertools.pairwise(widths) for m in block(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False))],
            *[m for _ in range(extra_layers) for m in block(nn.Conv2d(widths[-1], widths[-1], 3, 1, 1, bias=False))],
            nn.ConvTranspose2d(widths[-1], image_shape[0], 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.classes:
            return self.net(z.reshape(z.shape[0], -1, 1, 1))
        labels, z = z[:, self.latent_dim].long(), z[:, : self.latent_dim]  # the class index rides in the last column
        if hasattr(self, "embed"):
            z = torch.cat([z, self.embed(labels)], dim=1)
        x = z.reshape(z.shape[0], -1, 1, 1)
        for layer in self.net:
            x = layer(x, labels) if isinstance(layer, ClassAffine) else layer(x)
        return x


class ClassAffine(nn.Module):
    """Conditional BatchNorm's class part (de Vries et al. 2017; Miyato & Koyama 2018), after a plain BatchNorm:
    each class's own gain and shift of the normalised features, x * (1 + gain[y]) + shift[y]. Both start at 0, so a
    fresh G is the unconditional one and learns what each class changes."""

    def __init__(self, classes: int, features: int):
        super().__init__()
        self.gain = nn.Embedding(classes, features)
        self.shift = nn.Embedding(classes, features)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.gain(labels))[:, :, None, None] + self.shift(labels)[:, :, None, None]


def with_classes(z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """A conditional generator's input: the noise with each row's class index as one last column (``labels`` None:
    the noise as it is, for an unconditional one)."""
    return z if labels is None else torch.cat([z, labels.to(z.dtype)[:, None]], dim=1)


class Discriminator(nn.Module):
    """Image (B, C, S, S) -> one logit per image (B,): halving S to the smallest side, then 1x1 (MNIST: 28, 14, 7,
    1); the widths double from ``channels`` (MNIST: c, 2c).

    ``norm``: "batch" (the seed's BatchNorm after every hidden layer but the first), "spectral" (spectral
    normalisation of every layer's weight, Miyato et al. 2018; no BatchNorm) or "none". ``dropout`` follows each
    hidden layer. ``extra_layers`` adds 3x3 convolutions at the smallest side before the last layer (a deeper D
    judges the image's global shape with more than one linear layer).

    With ``classes``, a projection discriminator (Miyato & Koyama 2018): the logit gains the inner product of the
    class's learnt embedding with the last hidden features summed over their positions; forward takes the labels.
    """

    def __init__(
        self, channels: int, norm: str, dropout: float, extra_layers: int, image_shape: ImageShape, classes: int = 0
    ):
        super().__init__()
        side, layers = network_plan(image_shape)
        widths = [channels * 2**i for i in range(layers)]
        wrap = nn.utils.parametrizations.spectral_norm if norm == "spectral" else identity

        def block(conv: nn.Conv2d, batch_norm: bool) -> list[nn.Module]:
            return [
                wrap(conv),
                *([nn.BatchNorm2d(conv.out_channels)] if batch_norm and norm == "batch" else []),
                nn.LeakyReLU(0.2, inplace=True),
                *([nn.Dropout(dropout)] if dropout > 0 else []),
            ]

        last = widths[-1]
        self.net = nn.Sequential(
            *block(nn.Conv2d(image_shape[0], widths[0], 4, 2, 1, bias=False), batch_norm=False),
            *[m for a, b in itertools.pairwise(widths) for m in block(nn.Conv2d(a, b, 4, 2, 1, bias=False), True)],
            *[m for _ in range(extra_layers) for m in block(nn.Conv2d(last, last, 3, 1, 1, bias=False), True)],
            wrap(nn.Conv2d(last, 1, side, 1, 0, bias=False)),
        )
        self.embed = wrap(nn.Embedding(classes, last)) if classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is None:
            return self.net(x).flatten()
        features = self.net[:-1](x)
        projection = (self.embed(labels) * features.sum(dim=(2, 3))).sum(dim=1)
        return self.net[-1](features).flatten() + projection


def identity(x: T) -> T:
    """Its argument, unchanged: the no-op in place of an optional wrapper (spectral norm, DDP, compile)."""
    return x


def parametrized_weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight as stored: a spectrally normalised layer keeps its raw weight under parametrizations
    (rescaled in forward)."""
    if nn.utils.parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def init_weights(module: nn.Module) -> None:
    """DCGAN init (Radford et al.): conv weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(parametrized_weight(module), 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are over the global batch of every data-parallel worker, on any device.

    torch's ``nn.SyncBatchNorm`` does this on GPUs only (its forward refuses CPU tensors), so CPU workers (gloo)
    use this: per channel, the sum and count of the activations and then their squared deviations are summed over
    the workers with an all-reduce whose backward sums the gradients the same way (:class:`AllReduceSum`). Alone, or
    in eval mode, it is plain BatchNorm; its state_dict is BatchNorm's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least, as autocast keeps BN
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        total = AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = AllReduceSum.apply(centred.square().sum(dims)) / n
        with torch.no_grad():  # running statistics as BatchNorm keeps them (an unbiased variance)
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), factor)
        return centred * torch.rsqrt(var + self.eps).view(shape) * self.weight.view(shape) + self.bias.view(shape)


class AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over all workers, differentiable: the gradient of each worker's input is the sum of
    the workers' output gradients (torch.distributed.nn.functional.all_reduce, now deprecated, did this)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with each BatchNorm2d computing its statistics over all workers (``model.sync_batchnorm``): torch's
    SyncBatchNorm on a CUDA device, :class:`GlobalBatchNorm` elsewhere. Parameters and buffers are the same
    tensors (optimizers built on them go on), and state_dict keys stay BatchNorm's."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d and child.affine and child.track_running_stats:  # as the networks make them
            norm = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, True)
            norm.weight, norm.bias = child.weight, child.bias
            norm.running_mean, norm.running_var = child.running_mean, child.running_var
            norm.num_batches_tracked = child.num_batches_tracked
            norm.train(child.training)
            setattr(module, name, norm)
        else:
            sync_batchnorm(child, device)
    return module


# The model.* keys that decide the networks' parameters (model.d_dropout and model.sync_batchnorm do not).
SHAPE_KEYS = (
    "latent_dim",
    "g_channels",
    "g_extra_layers",
    "d_channels",
    "d_norm",
    "d_extra_layers",
    "conditional",
    "g_conditioning",
)


def network_shape(cfg: ModelConfig) -> dict[str, int | str]:
    """What a network of ``cfg`` is, as its weights need it: the values of :data:`SHAPE_KEYS`."""
    return {key: getattr(cfg, key) for key in SHAPE_KEYS}


def build_generator(cfg: ModelConfig, image_shape: ImageShape, class_weights: torch.Tensor | None = None) -> Generator:
    """The generator ``cfg`` describes for images of ``image_shape``, uninitialised (to load a state dict into);
    conditional on the classes of ``class_weights`` where ``cfg.conditional``."""
    weights = class_weights if cfg.conditional else None
    return Generator(cfg.latent_dim, cfg.g_channels, cfg.g_extra_layers, image_shape, weights, cfg.g_conditioning)


def build_models(
    cfg: ModelConfig, image_shape: ImageShape, class_weights: torch.Tensor | None = None
) -> tuple[Generator, Discriminator]:
    """Fresh, initialised G and D for images of ``image_shape`` (seed the RNG first for reproducible weights);
    conditional ones (``cfg.conditional``) need the training set's ``class_weights``."""
    if cfg.conditional and (class_weights is None or len(class_weights) < 2):
        raise ValueError("model.conditional needs the training set's class frequencies, of two classes or more")
    generator = build_generator(cfg, image_shape, class_weights)
    classes = generator.classes
    discriminator = Discriminator(cfg.d_channels, cfg.d_norm, cfg.d_dropout, cfg.d_extra_layers, image_shape, classes)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    if discriminator.embed is not None:  # the projection starts as small as the convolutions' weights
        nn.init.normal_(parametrized_weight(discriminator.embed), 0.0, 0.02)
    return generator, discriminator
