"""HEIC and AVIF: telling them apart by their `ftyp` brands, our HEIF opener registered with
Pillow when this module is imported (where pillow-heif is installed; pillow-heif itself is
imported on the first HEIC file) and kept in place, and why a HEIC or AVIF file cannot be
read here (no decoder installed).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

HEIF_SUFFIXES = (".heic", ".heif", ".hif", ".heics", ".heifs")
AVIF_SUFFIXES = (".avif", ".avifs")
NO_HEIC = "no HEIC decoder installed (pip install pillow-heif)"
NO_AVIF = "no AVIF decoder installed (pip install -U pillow: its wheels read AVIF from 11.3 on)"
# ISO-BMFF brands (the `ftyp` box) of HEVC-coded HEIF images (HEIC) and of AVIF images
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")
AVIF_BRANDS = (b"avif", b"avis")


def ftyp_brands(head: bytes) -> list[bytes]:
    """The brands of an ISO-BMFF file's `ftyp` box (major first, then the compatible ones) from
    its first bytes; [] for any other file."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return []
    end = min(len(head), max(16, int.from_bytes(head[:4], "big")))
    return [head[8:12]] + [head[i:i + 4] for i in range(16, end - 3, 4)]


def image_kind(head: bytes) -> str | None:
    """'heic' or 'avif' for the first bytes of a HEIF file coded in HEVC or AV1, else None."""
    brands = ftyp_brands(head)
    if not brands:
        return None
    if brands[0] in AVIF_BRANDS or (any(b in AVIF_BRANDS for b in brands)
                                    and not any(b in HEIF_BRANDS for b in brands)):
        return "avif"
    return "heic" if any(b in HEIF_BRANDS for b in brands) else None


_HEIF_LOCK = threading.Lock()
_heif_class: Any = None  # pillow_heif's HeifImageFile, once imported


def _heif_accept(prefix: bytes) -> bool:
    """Pillow's first look (16 bytes): a HEIF major brand, or a generic one (mif1 / msf1) that
    `_heif_open` tells apart from AVIF by the compatible brands."""
    return prefix[4:8] == b"ftyp" and (prefix[8:12] in HEIF_BRANDS or prefix[8:12] in (b"mif1", b"msf1"))


def heif_plugin() -> Any:
    """pillow_heif's image class, imported and registered with Pillow (opener, saver) on first
    use; None where pillow-heif is not installed."""
    global _heif_class
    if _heif_class is None:
        with _HEIF_LOCK:
            if _heif_class is None:
                try:
                    import pillow_heif
                except ImportError:
                    return None
                from PIL import Image

                pillow_heif.register_heif_opener()  # its saver, extensions and MIME type
                cls = pillow_heif.HeifImageFile
                Image.register_open(cls.format, _heif_open, _heif_accept)  # ours: AVIF is left to Pillow
                _heif_class = cls
    return _heif_class


def _heif_open(fp: Any, filename: Any = None) -> Any:
    """Pillow's opener for HEIC: pillow-heif's, imported on the first HEIC file (importing it
    costs ~20 ms, so it is not imported with this module). An AVIF file under a generic brand is
    refused with a SyntaxError, which sends Pillow on to its own AVIF plugin."""
    head = fp.read(64)
    fp.seek(0)
    if image_kind(head) != "heic":
        raise SyntaxError("not a HEVC-coded HEIF image")
    cls = heif_plugin()
    if cls is None:  # pragma: no cover - registered only where pillow-heif is installed
        raise SyntaxError(NO_HEIC)
    return cls(fp, filename)


def _register_heif() -> None:
    """Register the HEIC opener with Pillow where pillow-heif is installed, without importing it
    (`_heif_open` does, on the first HEIC file): a folder walk then takes .heic / .heif files."""
    from importlib.util import find_spec

    from PIL import Image

    if find_spec("pillow_heif") is None:
        return
    if "HEIF" not in Image.OPEN:
        Image.register_open("HEIF", _heif_open, _heif_accept)
        Image.register_save("HEIF", _heif_save)
        Image.register_extensions("HEIF", list(HEIF_SUFFIXES))
        Image.register_mime("HEIF", "image/heif")
    ensure_heif_opener()


def ensure_heif_opener() -> None:
    """Keep our HEIF opener in place: a library that registers pillow-heif's own (imageio's Pillow
    plugin does, on import) would send an AVIF under a generic brand to pillow-heif, which has no
    AV1 decoder. A dict lookup when nothing changed; called before every open."""
    from PIL import Image

    entry = Image.OPEN.get("HEIF")
    if entry is not None and entry[0] is not _heif_open:
        Image.register_open("HEIF", _heif_open, _heif_accept)


def _heif_save(im: Any, fp: Any, filename: Any) -> None:
    """Pillow's saver for HEIC until pillow-heif is imported: it imports it and hands over."""
    from PIL import Image

    heif_plugin()
    handler = Image.SAVE.get("HEIF")
    if handler is None or handler is _heif_save:
        raise OSError("no HEIC encoder here (pillow-heif without one); write the crops as JPEG: --format jpg")
    handler(im, fp, filename)


_register_heif()


def missing_decoder(name: str, head: bytes = b"") -> str | None:
    """Why Pillow cannot read an image that is a HEIC or AVIF file (by its first bytes, else its
    name's suffix) here: no decoder installed; None for anything else."""
    from PIL import Image, features

    kind = image_kind(head) or {**dict.fromkeys(HEIF_SUFFIXES, "heic"), **dict.fromkeys(AVIF_SUFFIXES, "avif")}.get(
        Path(name).suffix.lower() if name else "")
    if kind == "heic" and "HEIF" not in Image.OPEN:
        return NO_HEIC
    if kind == "avif":
        try:
            ok = bool(features.check("avif"))
        except (ValueError, ImportError):
            ok = False
        if not ok:
            return NO_AVIF
    return None

