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
from pathlib import Path
from typing import Any

from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

QWEN2_5_VL_FACTOR = 28  # patch 14 x merge 2
QWEN3_VL_FACTOR = 32  # patch 16 x merge 2


class ImageError(ValueError):
    """An image could not be read or decoded."""


def decode_image(source: Any, root: Path | None = None, allow_outside_root: bool = True) -> Image.Image:
    """Decode an image given as a path, raw bytes, a base64/data URI string, a PIL image,
    or the ``{"bytes": ..., "path": ...}`` dict that Parquet datasets use. With
    ``allow_outside_root=False`` a path must stay inside ``root`` (no ``..``, no absolute
    path elsewhere, no symlink out): a dataset file cannot make the trainer open any file."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, dict):
            if source.get("bytes"):
                return decode_image(source["bytes"], root, allow_outside_root)
            if source.get("path"):
                return decode_image(source["path"], root, allow_outside_root)
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
                if not path.exists():
                    raise ImageError(f"image file not found: {path}")
                image = Image.open(path)
        else:
            raise ImageError(f"unsupported image value of type {type(source).__name__}")
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
