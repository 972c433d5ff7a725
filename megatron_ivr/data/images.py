"""Image loading and Qwen's resizing rules.

Qwen-VL sees an image as a grid of ``patch_size`` pixel patches merged ``merge_size`` x
``merge_size`` into one token, so both sides must be multiples of
``factor = patch_size * merge_size`` (28 for Qwen2.5-VL, 32 for Qwen3-VL) and the pixel
count must lie in ``[min_pixels, max_pixels]``. The rule itself is transformers'
``smart_resize``; this module only decodes, converts to RGB and applies it.
"""

from __future__ import annotations

import base64
import io
import os
import stat
from pathlib import Path
from typing import Any

from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

QWEN2_5_VL_FACTOR = 28  # patch 14 x merge 2
QWEN3_VL_FACTOR = 32  # patch 16 x merge 2


# Pixels an image may have before it is decoded (read from its header): a 492 kB PNG can
# declare 169 Mpixel and take 1.3 GB to decode. 64 Mpixel (8192 x 8192) is far above what
# Qwen-VL keeps (``max_pixels`` resizes down) and below PIL's own decompression-bomb limit.
MAX_SOURCE_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """An image could not be read or decoded."""


def regular_file(path: Path, what: str = "file") -> Path:
    """``path`` if it is a regular file (after links); an error naming it otherwise (a FIFO
    would block the reader forever, a folder or device is no image)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(2, f"{what} not found", str(path)) from None
    if not stat.S_ISREG(mode):
        raise IsADirectoryError(21, f"{what} is not a regular file", str(path)) if stat.S_ISDIR(mode) else \
            OSError(22, f"{what} is not a regular file (a pipe, socket or device)", str(path))
    return path


def decode_image(source: Any, root: Path | None = None, allow_outside_root: bool = True,
                 max_source_pixels: int = MAX_SOURCE_PIXELS) -> Image.Image:
    """Decode an image given as a path, raw bytes, a base64/data URI string, a PIL image,
    or the ``{"bytes": ..., "path": ...}`` dict that Parquet datasets use. With
    ``allow_outside_root=False`` a path must stay inside ``root`` (no ``..``, no absolute
    path elsewhere, no symlink out): a dataset file cannot make the trainer open any file.
    Only regular files are opened, and an image whose header declares more than
    ``max_source_pixels`` is refused before it is decoded."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, dict):
            if source.get("bytes"):
                return decode_image(source["bytes"], root, allow_outside_root, max_source_pixels)
            if source.get("path"):
                return decode_image(source["path"], root, allow_outside_root, max_source_pixels)
            raise ImageError("image entry has neither 'bytes' nor 'path'")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
        elif isinstance(source, str):
            if source.startswith("data:image"):
                image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
            else:
                path = Path(source)
                if not path.is_absolute() and root is not None:
                    path = root / path
                if not allow_outside_root and root is not None and not _inside(path, root):
                    raise ImageError(f"image path {source!r} leaves the dataset folder {root} "
                                     "(set data.allow_outside_root=true to allow it)")
                try:
                    regular_file(path, "image file")
                except OSError as exc:
                    raise ImageError(f"{exc.strerror}: {path}") from None
                image = Image.open(path)
        else:
            raise ImageError(f"unsupported image value of type {type(source).__name__}")
        if image.width * image.height > max_source_pixels:  # from the header: nothing decoded yet
            raise ImageError(f"image of {image.width} x {image.height} pixels is over the limit of "
                             f"{max_source_pixels} (data.max_source_pixels); not decoded")
        image.load()  # force a full decode: a truncated file fails here, not later
        return image.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageError(f"cannot decode image: {exc}") from exc


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` names a file under ``root`` as written (``..`` and absolute paths
    elsewhere are outside). Links are not followed: an images folder linked into the dataset
    folder by whoever set it up counts as inside, as datasets on shared storage often are."""
    return Path(os.path.normpath(os.path.abspath(path))).is_relative_to(os.path.normpath(os.path.abspath(root)))


def resize_for_qwen(image: Image.Image, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    """Resize so both sides are multiples of ``factor`` and the area fits the bounds."""
    height, width = smart_resize(image.height, image.width, factor=factor,
                                 min_pixels=min_pixels, max_pixels=max_pixels)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def image_to_png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def blank_like(image: Image.Image) -> Image.Image:
    """The image with nothing on it: its size and mode, filled with its most common colour (the
    empty board of a synthetic scene, the background of a chart). The image-blanked control of
    evaluation: what a policy scores when the image shows nothing."""
    small = image.convert("RGB").resize((64, 64), Image.Resampling.NEAREST)
    _, colour = max(small.getcolors(64 * 64))
    return Image.new("RGB", image.size, colour).convert(image.mode)
