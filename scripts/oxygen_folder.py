"""Build a folder of real RGB images, reproducibly: Debian's ``oxygen-icon-theme`` 128x128 icons, one copy of each
distinct image, composited on white, one subfolder per category (or, ``--flat``, all in one folder: the same images
without their classes).

    python scripts/oxygen_folder.py --out ~/data/oxygen            # 9 class subfolders
    python scripts/oxygen_folder.py --out ~/data/oxygen-flat --flat

The package is fetched with ``apt-get download`` (no install; any Debian/Ubuntu mirror) and unpacked with
``dpkg-deb -x`` into a temporary folder, unless ``--icons`` names an unpacked ``base/128x128`` folder. Of its 837
icons, 236 are symlinks to others (some across categories): each distinct file is kept once, in the category
where the file itself lives, and identical contents are kept once too. The output's file names are the
content's SHA-256 prefix, so building twice gives the same folder; a summary (counts per class, the digest
over all files) is printed and written beside the folder (``<out>.SOURCE.txt``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

PACKAGE = "oxygen-icon-theme"
ICONS = "usr/share/icons/oxygen/base/128x128"


def unpack(into: Path) -> Path:
    """The package's 128x128 icon folder, downloaded and unpacked under ``into``."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=into, check=True, capture_output=True)
    deb = next(into.glob(f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into / "root")], check=True)
    return into / "root" / ICONS


def distinct_icons(icons: Path) -> dict[str, tuple[str, bytes]]:
    """content SHA-256 -> (category, PNG bytes): each real file once, in the category it lives in."""
    found: dict[str, tuple[str, bytes]] = {}
    for path in sorted(icons.glob("*/*.png")):
        if path.is_symlink():
            continue  # a link to a file kept in its own category
        data = path.read_bytes()
        found.setdefault(hashlib.sha256(data).hexdigest(), (path.parent.name, data))
    return found


def on_white(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def build(icons: Path, out: Path, flat: bool) -> str:
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; give an empty or new folder")
    counts: dict[str, int] = {}
    digest = hashlib.sha256()
    for sha, (category, data) in sorted(distinct_icons(icons).items()):
        folder = out if flat else out / category
        folder.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        on_white(data).save(buffer, "PNG", optimize=False)
        (folder / f"{sha[:16]}.png").write_bytes(buffer.getvalue())
        digest.update(sha.encode())
        counts[category] = counts.get(category, 0) + 1
    lines = [f"{PACKAGE} {ICONS}: {sum(counts.values())} distinct icons, composited on white"]
    lines += [f"  {name}: {count}" for name, count in sorted(counts.items())]
    lines.append(f"  sha256 over the source files: {digest.hexdigest()}" + ("  (flat: no classes)" if flat else ""))
    (out.parent / f"{out.name}.SOURCE.txt").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the folder to create")
    parser.add_argument("--flat", action="store_true", help="no class subfolders")
    parser.add_argument("--icons", type=Path, help="an unpacked .../oxygen/base/128x128 folder (default: download)")
    args = parser.parse_args(argv)
    if args.icons:
        print(build(args.icons, args.out.expanduser(), args.flat))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(build(unpack(Path(tmp)), args.out.expanduser(), args.flat))


if __name__ == "__main__":
    sys.exit(main())
