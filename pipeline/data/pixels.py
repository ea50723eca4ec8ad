"""An image file's pixels as an image viewer shows them: decoded only by the formats its extension names, within a
stated pixel cap, turned upright by its EXIF orientation, converted to sRGB by its embedded colour profile, 16-bit
and float values scaled (not clipped) to 8 bits, transparency composited on a background colour, palette and CMYK
converted; then centre-cropped to a square and resized. pipeline.data.images prepares folders with it.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import PurePosixPath
from typing import Any

import numpy as np

# The decoders each extension may use: a file is never decoded as a format its name does not claim. JPEG's opens the
# multi-picture JPEGs many phones write (as MPO); "DIB" is the headerless bitmap Pillow reads .bmp as.
FORMATS = {
    ".png": ("PNG",),
    ".jpg": ("JPEG",),
    ".jpeg": ("JPEG",),
    ".bmp": ("BMP", "DIB"),
    ".gif": ("GIF",),
    ".webp": ("WEBP",),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
}
EXTENSIONS = frozenset(FORMATS)
# Image formats a folder may hold that are not decoded here (Pillow has no decoder for them without plug-ins): a
# listing counts them and the preparation says so, rather than leaving them out unsaid.
UNDECODED = frozenset({".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw"})
MAX_PIXELS = 2**27  # 134,217,728 pixels: a 108 MP phone photo passes; above, a file is skipped as too large
WHITE = "#ffffff"
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def background_rgb(colour: str) -> tuple[int, int, int]:
    """``data.background`` as RGB: a colour name (white, black, grey...) or #rrggbb; a ValueError naming it if
    Pillow knows no such colour."""
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(colour)
    except ValueError:
        raise ValueError(f"{colour!r} is no colour: give a name (white, black, grey) or #rrggbb") from None
    return rgb[0], rgb[1], rgb[2]


def background_hex(colour: str) -> str:
    """``data.background`` as #rrggbb: what a manifest records (white and #FFFFFF are one preparation)."""
    return "#{:02x}{:02x}{:02x}".format(*background_rgb(colour))


def decode(blob: bytes, name: str, image_size: int, channels: int, background: str = WHITE) -> np.ndarray:
    """The encoded image ``blob`` of the file ``name`` -> uint8 (channels, image_size, image_size), as a viewer
    shows it (the module's doc), centre-cropped to a square and resized (Pillow's antialiased bicubic). Raises
    whatever Pillow raises for a file that does not decode, and a ValueError for one over :data:`MAX_PIXELS`."""
    from PIL import Image

    formats = FORMATS.get(PurePosixPath(name).suffix.lower())
    with warnings.catch_warnings():  # the cap below is the one that counts, stated and tested
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(blob), formats=formats)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"over the cap of {MAX_PIXELS:,} pixels ({exc})") from None
    with image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{image.width}x{image.height} pixels, over the cap of {MAX_PIXELS:,}")
        # A JPEG decodes at 1/2-1/8 scale when even that leaves twice the side: several times faster on photos.
        image.draft("RGB" if channels == 3 else "L", (2 * image_size, 2 * image_size))
        image.load()  # a truncated file fails here, not half-read
        picture = as_viewed(image, channels, background)
    width, height = picture.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Cropped first: resizing with a box would let the filter reach past the crop's edges.
    picture = picture.crop((left, top, left + side, top + side))
    picture = picture.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy()


def as_viewed(image: Any, channels: int, background: str) -> Any:
    """A loaded Pillow image as a viewer shows it, in "RGB" (``channels`` 3) or "L" (1)."""
    from PIL import ImageOps

    picture = ImageOps.exif_transpose(image)  # a copy, upright: phones store the sensor's rows and a rotation tag
    picture = _to_srgb(picture)
    picture = _to_8_bits(picture)
    if picture.mode in _ALPHA_MODES or "transparency" in picture.info:
        picture = _composited(picture, background)
    return picture.convert("RGB" if channels == 3 else "L")


def _to_8_bits(picture: Any) -> Any:
    """16-bit integer images scaled from 0-65535 to 0-255, 32-bit ones from 0-2^31-1 when a value passes 65535 (else
    they hold 16-bit values, as Pillow reads 16-bit PNGs), float ones from 0-1, each clipped to its range: Pillow's
    own conversion clips every value above 255, so a 16-bit PNG comes out almost white. A grey image's transparent
    value (a PNG's tRNS) becomes an alpha channel, matched on the full values before they are scaled."""
    from PIL import Image

    raw = np.asarray(picture)
    if picture.mode.startswith("I;16"):
        values = raw.astype(np.float64) / 257.0
    elif picture.mode == "I":
        values = raw.astype(np.float64) / (257.0 if raw.size == 0 or raw.max() <= 65535 else (2**31 - 1) / 255.0)
    elif picture.mode == "F":
        values = raw.astype(np.float64) * 255.0
    else:
        return picture
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    transparent = picture.info.get("transparency")
    if isinstance(transparent, int):
        alpha = np.where(raw == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    return Image.fromarray(grey, "L")


def _composited(picture: Any, background: str) -> Any:
    """A transparent image (an alpha channel, or a palette's or a colour's transparency) over ``background``."""
    from PIL import Image

    rgba = picture.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background_rgb(background), 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _to_srgb(picture: Any) -> Any:
    """An RGB(A) or CMYK image with an embedded colour profile (a phone's Display P3, a print CMYK) converted to
    sRGB through it, as colour-managed viewers do; without one, or with one that is sRGB or unreadable, as it is."""
    profile = picture.info.get("icc_profile")
    if not profile or picture.mode not in ("RGB", "RGBA", "CMYK"):
        return picture
    out_mode = "RGBA" if picture.mode == "RGBA" else "RGB"
    transform = _transform(bytes(profile), picture.mode, out_mode)
    if transform is None:
        return picture
    from PIL import ImageCms

    converted = ImageCms.applyTransform(picture, transform)
    converted.info = {k: v for k, v in picture.info.items() if k != "icc_profile"}
    return converted


@functools.lru_cache(maxsize=32)
def _transform(profile: bytes, in_mode: str, out_mode: str) -> Any:
    """The colour transform from ``profile`` to sRGB (kept: photos of one camera share one profile), or None for
    an sRGB profile (nothing to do) or one littleCMS cannot read."""
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if in_mode != "CMYK" and "srgb" in ImageCms.getProfileDescription(source).lower():
            return None
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), in_mode, out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None
