"""Images in and out of the pipeline for scoring elsewhere or here: samples read from an ``.npz`` array or a folder of
image files (``evaluate --samples``), and samples written as a folder of PNG files (``sample --out DIR``) to hand to
clean-fid or torch-fidelity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import ConfigError
from pipeline.data.pixels import EXTENSIONS, decode


def read_samples(path: str, image_shape: tuple[int, int, int], flag: str = "--samples") -> torch.Tensor:
    """uint8 images shaped as the networks see ``image_shape``'s data ((N, H, W) grey, (N, C, H, W) colour) from
    an ``.npz`` (key ``images``: (N, H, W) or (N, C, H, W) uint8) or a folder of image files (each decoded,
    centre-cropped and resized as a prepared folder's are)."""
    where = Path(path).expanduser()
    if where.is_dir():
        images = _read_folder(where, image_shape, flag)
    elif where.is_file():
        images = _read_npz(where, flag)
    else:
        raise ConfigError(f"{flag}: {path!r} not found; give an .npz written by `sample` or a folder of images")
    channels, height, width = image_shape
    if images.ndim == 4 and images.shape[1] == 1 and channels == 1:
        images = images[:, 0]
    want = (height, width) if channels == 1 else (channels, height, width)
    if images.dtype != np.uint8 or images.shape[1:] != want:
        raise ConfigError(
            f"{flag}: images must be uint8 of shape (N, {', '.join(map(str, want))}) for this data, got "
            f"{images.dtype} {images.shape}"
        )
    if len(images) < 4:
        raise ConfigError(f"{flag}: {len(images)} image(s); scoring needs at least 4")
    return torch.from_numpy(np.ascontiguousarray(images))


def _read_npz(path: Path, flag: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["images"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{flag}: {str(path)!r} is not an .npz with an `images` array ({exc})") from None


def _read_folder(folder: Path, image_shape: tuple[int, int, int], flag: str) -> np.ndarray:
    channels, side, _ = image_shape
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise ConfigError(f"{flag}: {str(folder)!r} holds no image files ({', '.join(sorted(EXTENSIONS))})")
    decoded = []
    for file in files:
        try:
            decoded.append(decode(file.read_bytes(), file.name, side, channels))
        except Exception as exc:  # noqa: BLE001 - whatever Pillow raises for a file that is no image
            raise ConfigError(f"{flag}: {file} does not decode as an image ({type(exc).__name__}: {exc})") from None
    images = np.stack(decoded)
    return images[:, 0] if channels == 1 else images


def write_pngs(images: torch.Tensor, folder: Path) -> list[Path]:
    """uint8 images (N, H, W) or (N, C, H, W) as ``folder/00000.png`` ...; a folder that already holds files is
    refused (nothing there is overwritten)."""
    from PIL import Image

    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"--out: {str(folder)!r} exists and is not an empty folder; give a new or empty one")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(images.numpy()):
        pixels = image if image.ndim == 2 else (image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        path = folder / f"{i:05d}.png"
        Image.fromarray(np.ascontiguousarray(pixels)).save(path)
        written.append(path)
    return written


def write_walk(  # noqa: PLR0913 - sample's options, once
    generator: torch.nn.Module, facts: dict, steps: int, seed: int, psi: float, out: Path, label: int | None = None
) -> str:
    """``sample --interpolate``: latent walks (pipeline.gan.views) as a .png grid (8 rows of ``steps``) or a looping
    .gif (an 8x8 grid through 4 points and back, ``steps`` frames between each two), a conditional generator's
    each walk in one class (``label``, or drawn as its training set's); what was written, as a line."""
    from pipeline.core.pictures import save_image_grid
    from pipeline.gan.models import with_classes
    from pipeline.gan.sampling import sample_images
    from pipeline.gan.views import gif, walk

    latent_dim, weights = facts["latent_dim"], facts.get("class_weights")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        classes = checked_classes(generator, 8, seed, weights, label)
        z = with_classes(
            walk(8, steps, latent_dim, seed, psi), classes.repeat_interleave(steps) if classes is not None else None
        )
        save_image_grid(sample_images(generator, z), str(out), nrow=steps)
        return f"wrote 8 latent walks of {steps} steps to {out}"
    frames = walk(64, steps, latent_dim, seed, psi, loop=4)
    classes = checked_classes(generator, 64, seed, weights, label)
    gif([sample_images(generator, with_classes(z, classes)) for z in frames], str(out), nrow=8)
    return f"wrote a looping walk of {len(frames)} frames (8x8 samples through 4 points) to {out}"


def write_samples(  # noqa: PLR0913 - sample's options, once
    generator: torch.nn.Module,
    facts: dict,
    out: Path,
    num: int,
    seed: int,
    psi: float,
    label: int | None,
    grid: str | None,
) -> list[str]:
    """``sample``: ``num`` images (of class ``label`` where given) as an .npz or a folder of PNG files, and a grid of
    the first 64 where asked; what was written, as lines."""
    from pipeline.core.pictures import save_image_grid
    from pipeline.gan.sampling import generate_images

    weights = facts.get("class_weights")
    checked_classes(generator, 1, seed, weights, label)
    images = generate_images(generator, num, facts["latent_dim"], seed, torch.device("cpu"), psi, weights, label)
    if out.suffix != ".npz":
        write_pngs(images, out)
        lines = [f"wrote {num} samples as PNG files {out}/00000.png ... (each {tuple(images.shape[1:])} uint8)"]
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, images=images.numpy())
        lines = [f"wrote {num} samples {tuple(images.shape)} uint8 to {out}"]
    if grid:
        save_image_grid(images[:64], grid)
        lines.append(f"wrote grid of {min(num, 64)} to {grid}")
    return lines


def checked_classes(
    generator: torch.nn.Module, num: int, seed: int, weights: list[float] | None, label: int | None
) -> torch.Tensor | None:
    """:func:`pipeline.gan.sampling.sample_classes`, a class the generator does not know a ConfigError for --class."""
    from pipeline.gan.sampling import sample_classes

    try:
        return sample_classes(generator, num, seed, weights, label)
    except ValueError as exc:
        raise ConfigError(f"--class: {exc}") from None
