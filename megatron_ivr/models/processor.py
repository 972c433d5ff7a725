"""Image-only Qwen-VL processors that work without torchvision.

Every Qwen video processor needs torchvision, and the stock processors refuse
``video_processor=None`` at construction and from ``from_pretrained``; these subclasses
pass ``None`` for it. ``AutoProcessor`` on such a folder silently returns only the
tokenizer, so load with :func:`load_processor`, which picks the class from the model's
``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from megatron_ivr.config.errors import ConfigError

PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16, "qwen3_5": 16, "qwen3_5_moe": 16}
MERGE_SIZE = 2


class _ImageOnly:
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images and text only."""


class Qwen3VLImageOnlyProcessor(_ImageOnly, Qwen3VLProcessor):
    """Qwen3-VL processor for images and text only."""


# Qwen3-VL-MoE and Qwen3.5 (dense and MoE) share Qwen3-VL's processor (transformers' processing_auto)
_QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
PROCESSOR_CLASSES = {"qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
                     **dict.fromkeys(_QWEN3_FAMILIES, Qwen3VLImageOnlyProcessor)}
STOCK_PROCESSOR_NAMES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", **dict.fromkeys(_QWEN3_FAMILIES, "Qwen3VLProcessor")}
STOCK_VIDEO_PROCESSOR_NAMES = {"qwen2_5_vl": "Qwen2VLVideoProcessor",
                               **dict.fromkeys(_QWEN3_FAMILIES, "Qwen3VLVideoProcessor")}


def save_processor(processor, family: str, path: str | Path) -> None:
    """Save, naming the stock processor class (and a matching video-processor section) in
    ``processor_config.json`` so that servers with torchvision (SGLang, vLLM) load the full
    processor with ``AutoProcessor``; this repo loads the image-only subclass explicitly
    (:func:`load_processor`)."""
    processor.save_pretrained(str(path))
    config_path = Path(path) / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = STOCK_PROCESSOR_NAMES[family]
    image = config["image_processor"]
    config["video_processor"] = {"video_processor_type": STOCK_VIDEO_PROCESSOR_NAMES[family],
                                 **{k: image[k] for k in ("patch_size", "merge_size", "temporal_patch_size",
                                                          "image_mean", "image_std", "size") if k in image}}
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def make_processor(family: str, tokenizer, min_pixels: int, max_pixels: int):
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE[family], merge_size=MERGE_SIZE, temporal_patch_size=2,
        min_pixels=min_pixels, max_pixels=max_pixels,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    return PROCESSOR_CLASSES[family](image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=tokenizer.chat_template)


def model_family(path: str | Path) -> str:
    """The family (``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_vl_moe``, ``qwen3_5``, ``qwen3_5_moe``) from a
    Hugging Face folder's ``config.json``."""
    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    if model_type not in PROCESSOR_CLASSES:
        raise ValueError(f"{path}: unsupported model_type {model_type!r}; expected one of {list(PROCESSOR_CLASSES)}")
    return model_type


def check_model_family(family: str | None, *paths: str | Path) -> None:
    """``model.family``, when set, names the family of every model folder a command loads."""
    for path in paths:
        if family is not None and model_family(path) != family:
            raise ConfigError(f"model.family: {family} is set, but {path} holds a {model_family(path)} model",
                              key="model.family")


def load_processor(path: str | Path):
    return PROCESSOR_CLASSES[model_family(path)].from_pretrained(str(path))
