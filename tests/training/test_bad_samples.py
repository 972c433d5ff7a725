"""``data.max_prompt_tokens`` is enforced: a training prompt (chat template, question and
image tokens) longer than the limit makes its sample bad, reported, skipped and counted; the
count is exact (prompt_length equals the processor's own token count)."""

from __future__ import annotations

import pytest

from megatron_ivr.config import load_config
from megatron_ivr.data import DataError
from megatron_ivr.models.processor import load_processor
from megatron_ivr.prompts import chat_prompt, prompt_length, render_prompt
from megatron_ivr.training.datasets import read_training_file as _read


def test_prompt_length_counts_what_the_processor_makes(tiny_models, synthetic_dir):
    model = tiny_models["qwen2_5_vl"]
    processor = load_processor(model)
    cfg = load_config(None, ["data.min_pixels=3136", "data.max_pixels=12544", "data.max_prompt_tokens=100000"])
    dataset = _read(cfg, str(synthetic_dir / "train.jsonl"), model, processor,
                    lambda s: render_prompt("response", "ivr", question=s.question))
    for sample in dataset.samples[:5]:
        text = render_prompt("response", "ivr", question=sample.question)
        expected = processor(text=[chat_prompt(processor, text, len(sample.images))], images=sample.images,
                             return_tensors="pt")["input_ids"].shape[1]
        assert prompt_length(processor, text, [image.size for image in sample.images], 28) == expected


def test_longer_prompts_are_bad_samples(tiny_models, synthetic_dir):
    model = tiny_models["qwen2_5_vl"]
    processor = load_processor(model)

    def prompt_of(sample):
        return render_prompt("response", "ivr", question=sample.question)

    base = ["data.min_pixels=3136", "data.max_pixels=12544", "data.max_bad_fraction=1.0"]
    everything = _read(load_config(None, [*base, "data.max_prompt_tokens=100000"]), str(synthetic_dir / "train.jsonl"),
                       model, processor, prompt_of)
    lengths = sorted(prompt_length(processor, prompt_of(s), [i.size for i in s.images], 28) for s in everything.samples)
    limit = lengths[len(lengths) // 2]  # the median: about half the prompts are longer
    longer = sum(length > limit for length in lengths)
    assert 0 < longer < len(lengths)
    cut = _read(load_config(None, [*base, f"data.max_prompt_tokens={limit}"]), str(synthetic_dir / "train.jsonl"),
                model, processor, prompt_of)
    assert len(cut.samples) == len(lengths) - longer
    too_long = [b for b in cut.bad if "data.max_prompt_tokens" in b.reason]
    assert len(too_long) == longer and cut.metrics("data/train")["data/train/bad_samples"] >= longer
    with pytest.raises(DataError, match="data.max_prompt_tokens"):  # over the bad-sample share: the run stops
        _read(load_config(None, [*base[:2], f"data.max_prompt_tokens={limit}"]), str(synthetic_dir / "train.jsonl"),
              model, processor, prompt_of)
