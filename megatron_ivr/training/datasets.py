"""A training file read for a run: samples with images resized by the model family's rules,
and a prompt longer than ``data.max_prompt_tokens`` reported and skipped like any bad sample."""

from __future__ import annotations

from collections.abc import Callable

from megatron_ivr.config.schema import RunConfig
from megatron_ivr.data import ImageRules, LoadedDataset, Sample, read_dataset
from megatron_ivr.models.processor import MERGE_SIZE, PATCH_SIZE, model_family
from megatron_ivr.prompts import prompt_length


def read_training_file(cfg: RunConfig, path: str, model_path: str, processor,
                       prompt_of: Callable[[Sample], str]) -> LoadedDataset:
    """A training file's samples; a prompt (``prompt_of(sample)``, chat template and image tokens
    included) over ``data.max_prompt_tokens`` makes its sample bad: reported, skipped, counted."""
    family = model_family(model_path)
    rules = ImageRules(PATCH_SIZE[family] * MERGE_SIZE, cfg.data.min_pixels, cfg.data.max_pixels,
                       cfg.data.max_source_pixels)

    def prompt_too_long(sample) -> str | None:
        length = prompt_length(processor, prompt_of(sample), [image.size for image in sample.images], rules.factor)
        limit = cfg.data.max_prompt_tokens
        return f"prompt of {length} tokens > data.max_prompt_tokens={limit}" if length > limit else None

    return read_dataset(path, rules, cfg.data.max_bad_fraction, cfg.data.image_root,
                        allow_outside_root=cfg.data.allow_outside_root, check=prompt_too_long)
