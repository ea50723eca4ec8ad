"""Image folders the tests make themselves: coloured shapes (a class each) on coloured backgrounds, in the sizes
and formats people's folders have (PNG and JPEG, landscape and portrait, grey and RGB), plus broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle")


def draw(shape: str, rng: np.random.Generator, width: int, height: int):
    """One picture of ``shape``: a random colour on a random background, at a random place and size."""
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (width, height), background)
    pen = ImageDraw.Draw(image)
    side = min(width, height)
    r = int(rng.integers(side // 6, side // 3))
    cx = width // 2 + int(rng.integers(-side // 8, side // 8 + 1))
    cy = height // 2 + int(rng.integers(-side // 8, side // 8 + 1))
    colour = tuple(int(255 - v) for v in background)  # far from the background: the shape always shows
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def make_folder(root: Path, per_class: int, seed: int = 0, labelled: bool = True, broken: bool = True) -> Path:
    """``per_class`` pictures of each shape, one subfolder per shape (or all at the top when not ``labelled``),
    sides 48-120 px, every third a JPEG and every fifth grey; with ``broken``, one file that is no image and one
    truncated PNG. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        folder = root / shape if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = draw(shape, rng, int(rng.integers(48, 121)), int(rng.integers(48, 121)))
            if i % 5 == 4:
                image = image.convert("L")
            name = f"{shape}-{i:04d}"
            if i % 3 == 2:
                image.save(folder / f"{name}.jpg", quality=90)
            else:
                image.save(folder / f"{name}.png")
    if broken:
        where = root / SHAPES[0] if labelled else root
        (where / "notes.png").write_bytes(b"not an image at all")
        whole = (where / f"{SHAPES[0]}-0000.png").read_bytes()
        (where / "cut.png").write_bytes(whole[: len(whole) // 2])
    return root
