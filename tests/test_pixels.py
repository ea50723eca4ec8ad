"""Image files as a viewer shows them (pipeline.data.pixels), made here in the test: a phone's rotation tag, 16-bit
and float values, transparency on a chosen background, palettes and CMYK, colour profiles, the decoder the
extension names and the pixel cap; and a file that cannot be read (pipeline.data.images) fails the preparation
naming it, nothing recorded as skipped, where a passing fault is retried through."""

import io
import json
import os

import numpy as np
import pytest

from pipeline.data import pixels
from pipeline.data.images import prepare_folder
from pipeline.data.pixels import MAX_PIXELS, decode
from pipeline.data.shard_making import read_image_file
from pipeline.data.shards import MANIFEST, ImageFolderError, Preparation, iter_shards
from tests.conftest import run_cli


def encoded(image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_a_phone_photo_is_turned_upright_by_its_exif_orientation():
    from PIL import Image

    stored = np.zeros((32, 64, 3), np.uint8)  # as the sensor stored it: a red left half, blue right half
    stored[:, :32, 0] = 255
    stored[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show": the left half is shown on top
    shown = decode(encoded(Image.fromarray(stored), "JPEG", exif=exif, quality=95), "p.jpg", 16, 3)
    assert shown.shape == (3, 16, 16)
    top, bottom = shown[:, :8].reshape(3, -1).mean(1), shown[:, 8:].reshape(3, -1).mean(1)
    assert top[0] > 200 and top[2] < 50, top  # red above
    assert bottom[2] > 200 and bottom[0] < 50, bottom  # blue below


def test_16_bit_and_float_images_are_scaled_not_clipped():
    from PIL import Image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    grey16 = Image.fromarray(ramp)
    assert grey16.mode == "I;16"
    got = decode(encoded(grey16), "deep.png", 32, 1)[0].astype(int)
    assert abs(got.mean() - 127.5) < 3 and got.min() <= 2 and got.max() >= 253  # Pillow alone: nearly all 255
    floats = Image.fromarray((ramp / 65535.0).astype(np.float32), "F")
    assert abs(decode(encoded(floats, "TIFF"), "deep.tif", 32, 1)[0].mean() - 127.5) < 3


def test_32_bit_values_are_scaled_from_their_range_and_a_16_bit_grey_keeps_its_transparent_value():
    from PIL import Image

    deep = np.linspace(0, 2**31 - 1, 32 * 32).reshape(32, 32).astype(np.int32)
    got = decode(encoded(Image.fromarray(deep, "I"), "TIFF"), "deep.tif", 32, 1)[0].astype(int)
    assert abs(got.mean() - 127.5) < 3 and got.max() >= 253 and got.min() <= 2  # not clipped at 65535
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    ramp[:, :8] = 1000  # the left half: the transparent value, and near it (1001: scales to the same 8 bits)
    ramp[0, 0] = 1001
    keyed = Image.fromarray(ramp)
    shown = decode(encoded(keyed, transparency=1000), "key.png", 16, 3, background="#ff0000")
    assert (shown[:, 1:, :8] == np.array([255, 0, 0])[:, None, None]).all()  # the red background shows through
    assert shown[0, 0, 0] == shown[1, 0, 0] == shown[2, 0, 0]  # 1001 is not the transparent value: grey, opaque
    assert (shown[1:, :, 8:] > 0).any() and (shown[0, :, 8:] == shown[1, :, 8:]).all()  # the right half: grey


def test_a_folder_says_which_files_it_leaves_out_for_their_format(tmp_path):
    from PIL import Image

    from pipeline.data.images import list_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.jpg")
    for name in ("b.heic", "c.HEIC", "d.avif", "notes.txt"):
        (folder / name).write_bytes(b"not decoded here")
    assert list_folder(str(folder)).left_out == {".heic": 2, ".avif": 1}  # the text file is no image at all
    said = []
    prepare_folder(Preparation(str(folder), str(tmp_path / "out"), 8, 3, 0.0), said.append, workers=1)
    assert (
        "photos: 1 images, but 1 .avif, 2 .heic file(s) in formats not decoded here; convert them to JPEG" in (said[0])
    )
    for name in ("a.jpg",):
        (folder / name).unlink()
    with pytest.raises(ImageFolderError, match=r"holds no images .*, but 1 \.avif, 2 \.heic file\(s\) in formats"):
        list_folder(str(folder))


def test_transparency_is_composited_on_the_background_chosen():
    from PIL import Image

    rgba = np.zeros((16, 16, 4), np.uint8)  # transparent everywhere, its hidden colour red; one opaque green pixel
    rgba[..., 0] = 255
    rgba[8, 8] = (0, 255, 0, 255)
    blob = encoded(Image.fromarray(rgba, "RGBA"))
    white = decode(blob, "t.png", 16, 3)
    assert tuple(white[:, 0, 0]) == (255, 255, 255) and tuple(white[:, 8, 8]) == (0, 255, 0)
    assert tuple(decode(blob, "t.png", 16, 3, "black")[:, 0, 0]) == (0, 0, 0)
    assert tuple(decode(blob, "t.png", 16, 3, "#336699")[:, 0, 0]) == (0x33, 0x66, 0x99)
    palette = Image.new("P", (16, 16), 1)  # a GIF whose background index is transparent
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((8, 8), 0)
    gif = decode(encoded(palette, "GIF", transparency=1), "t.gif", 16, 3)
    assert tuple(gif[:, 0, 0]) == (255, 255, 255) and tuple(gif[:, 8, 8]) == (255, 0, 0)
    with pytest.raises(ValueError, match="'nosuch' is no colour"):
        decode(blob, "t.png", 16, 3, "nosuch")


def test_cmyk_and_colour_profiles_are_converted():
    from PIL import Image, ImageCms

    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    assert tuple(decode(encoded(cyan, "JPEG", quality=95), "c.jpg", 8, 3)[:, 4, 4]) == (0, 255, 255)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = Image.new("RGB", (16, 16), (200, 100, 50))
    assert tuple(decode(encoded(plain, icc_profile=srgb), "s.png", 8, 3)[:, 4, 4]) == (200, 100, 50)
    assert tuple(decode(encoded(plain, icc_profile=b"not a profile"), "s.png", 8, 3)[:, 4, 4]) == (200, 100, 50)


def test_a_file_is_decoded_only_as_its_extension_says_and_within_the_pixel_cap():
    from PIL import Image

    png = encoded(Image.new("RGB", (16, 16), "red"))
    assert decode(png, "a.PNG", 8, 3).shape == (3, 8, 8)
    with pytest.raises(Exception, match="cannot identify"):  # a PNG named .jpg is not what it claims
        decode(png, "a.jpg", 8, 3)
    huge = encoded(Image.new("1", (16385, 8193)))  # 134,242,305 pixels, a few kB compressed
    assert MAX_PIXELS < 16385 * 8193
    with pytest.raises(ValueError, match=f"16385x8193 pixels, over the cap of {MAX_PIXELS:,}"):
        decode(huge, "huge.png", 8, 1)


def test_the_background_is_a_setting_of_the_preparation(tmp_path):
    from PIL import Image

    folder = tmp_path / "icons"
    folder.mkdir()
    for i in range(4):
        Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "prepared"
    prepared = prepare_folder(Preparation(str(folder), str(out), 32, 3, 0.0, "black"), lambda _: None, workers=1)
    assert json.loads((out / MANIFEST).read_text())["background"] == "#000000"
    images, _ = next(iter_shards(prepared, "train"))
    assert images.shape == (4, 3, 32, 32) and not images.any()  # black, not the hidden red
    done = run_cli("data", "prepare", "--dataset", "images", "--path", str(folder), "--image-size", "32",
                   "--background", "nosuch", "--out", str(tmp_path / "other"))  # fmt: skip
    assert done.returncode != 0 and "--background: 'nosuch' is no colour" in done.stderr, done.stderr
    assert not (tmp_path / "other").exists()  # refused before any work


class FlakyFilesystem:
    """A filesystem whose reads fail: each file in ``fails`` raises OSError that many times, then reads."""

    def __init__(self, fails: dict[str, int]):
        self.fails = dict(fails)

    def open_input_stream(self, path: str):
        if self.fails.get(path, 0) > 0:
            self.fails[path] -= 1
            raise OSError("503 Slow Down")
        return io.BytesIO(b"bytes of " + path.encode())


def test_a_passing_read_fault_is_retried_and_a_lasting_one_names_the_file():
    fs = FlakyFilesystem({"/b/ok.png": 2, "/b/gone.png": 99})
    assert read_image_file(fs, "/b", "ok.png", "s3://b") == b"bytes of /b/ok.png"  # the third try reads
    with pytest.raises(ImageFolderError, match=r"s3://b/gone\.png is unavailable: 4 reads failed \(OSError: 503"):
        read_image_file(fs, "/b", "gone.png", "s3://b")


def test_an_unreadable_file_fails_the_preparation_and_is_not_recorded_as_skipped(tmp_path):
    """A real read error (EIO from /proc/self/mem, which stats as an empty regular file) in a decoding process."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(folder / f"{i}.png")
    os.symlink("/proc/self/mem", folder / "unreadable.png")
    out = tmp_path / "prepared"
    job = Preparation(str(folder), str(out), 32, 3, 0.0)
    with pytest.raises(ImageFolderError, match=r"photos/unreadable\.png is unavailable: 4 reads failed \(OSError"):
        prepare_folder(job, lambda _: None, workers=1)
    assert not (out / MANIFEST).exists()  # so the next preparation does the work again
    (folder / "unreadable.png").unlink()
    said: list = []
    prepared = prepare_folder(job, said.append, workers=1)
    assert prepared.count("train") == 3 and prepared.manifest["skipped"] == 0
    assert not any("nothing to do" in line for line in said)


def test_the_transform_cache_leaves_srgb_alone():
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert pixels._transform(srgb, "RGB", "RGB") is None
    assert pixels._transform(b"junk", "RGB", "RGB") is None
