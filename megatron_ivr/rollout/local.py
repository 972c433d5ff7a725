"""In-process rollout engine on a Hugging Face model: the CPU backend of the laptop path.

Requests are rendered with the model's chat template, batched (``batch_size`` prompts x
``n`` samples per ``generate`` call, KV cache on), sampled or greedy, and returned with the
log-prob of every generated token under the policy (raw logits, before temperature and
top-p, as the trainer computes them).

The ``n`` samples of a prompt share its prefill: the prompt (image included) is run once,
its KV cache repeated ``n`` times, and ``generate`` continues from that cache (transformers'
own continue-from-cache path, with the MRoPE offsets repeated alike). Without it, the
prompt and image would be encoded ``n`` times. A batch without any image is prefilled per
sample by ``generate`` itself (the model's MRoPE offsets come from image grids; a text-only
prefill would keep the previous batch's).

The KV cache (``kv_cache.py``) writes each new token in place and, after a shared prefill,
keeps one copy of the prompt per group of samples; decode attention reads it once per group.
Sampling is an argmax over the warped logits minus the log of exponential noise (the
exponential race, as SGLang and vLLM sample): the same distribution as ``torch.multinomial``,
which took 7% of the tiny model's generation time on a CPU (torch.profiler).
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from megatron_ivr.prompts import chat_prompt
from megatron_ivr.rollout.engine import Completion, GenerationRequest, SamplingParams
from megatron_ivr.rollout.kv_cache import SHARED_PREFIX_ATTENTION, attending, growing_cache, share_prompt

_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")  # the processor outputs laid out per token
# transformers 5.24 renamed the ``past_key_values`` argument of generate and forward to ``cache``
# (the old name warns, and goes in 5.40)
_CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


class LocalEngine:
    def __init__(self, model, processor, batch_size: int = 16, weight_version: int = 0, share_prefill: bool = True):
        self.share_prefill = share_prefill
        self.model = model.eval()
        # decode attention over one copy of a shared prompt (kv_cache.py) replaces SDPA, and
        # falls back to it for everything else; a model on another implementation keeps it
        self.shares_prompt_kv = model.config._attn_implementation == "sdpa"
        if self.shares_prompt_kv:
            model.set_attn_implementation(SHARED_PREFIX_ATTENTION)
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.batch_size = batch_size
        self._weight_version = weight_version
        self.eos_token_id = processor.tokenizer.eos_token_id
        self.pad_token_id = processor.tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, path, batch_size: int = 16) -> LocalEngine:
        from megatron_ivr.models.processor import load_processor
        from megatron_ivr.models.tiny import load_model

        return cls(load_model(path), load_processor(path), batch_size)

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def set_weight_version(self, version: int) -> None:
        self._weight_version = version

    def parameter_names(self) -> list[str]:
        return [name for name, _ in self.model.named_parameters()]

    def health(self) -> list[bool]:
        return [True]

    def pause(self, mode: str = "abort") -> None:
        pass  # generation is synchronous: nothing runs between calls

    def resume(self) -> None:
        pass

    def release_memory(self) -> None:
        pass  # in-process model on the controller: nothing is shared with the trainer

    def resume_memory(self) -> None:
        pass

    def update_weights(self, named_tensors, version: int) -> None:
        """Load Hugging Face-named tensors in place; every name must exist (none dropped)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"update_weights: unknown parameter {name!r}")
                params[name].copy_(tensor)
        self._weight_version = version

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[list[Completion]]:
        expanded = [(i, r) for i, r in enumerate(requests) for _ in range(sampling.n)]
        results: list[list[Completion]] = [[] for _ in requests]
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        for start in range(0, len(expanded), self.batch_size):
            chunk = expanded[start:start + self.batch_size]
            for (index, _), completion in zip(chunk, self._generate_batch([r for _, r in chunk], sampling)):
                results[index].append(completion)
        return results

    def _generate_batch(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Completion]:
        # shared prefill needs the MRoPE offsets the model computes from image grids; a batch
        # without images would keep a previous batch's offsets (transformers' generate resets them)
        copies = _copies(requests) if self.share_prefill and any(r.images for r in requests) else 1
        unique = requests[::copies]
        texts = [chat_prompt(self.processor, r.text, len(r.images)) for r in unique]
        images = [image for r in unique for image in r.images] or None
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        cache = growing_cache(self.model, sampling.max_new_tokens, share_prefix=self.shares_prompt_kv)
        with attending(cache):
            if copies > 1:
                inputs = self._shared_prefill(inputs, copies, cache)
            out = self.model.generate(**inputs, **{_CACHE_KWARG: cache}, do_sample=False, output_logits=True,
                                      logits_processor=_sampler(sampling), return_dict_in_generate=True,
                                      max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_token_id,
                                      eos_token_id=self.eos_token_id)
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        token_logprobs = logprobs.gather(-1, new_tokens[..., None]).squeeze(-1)
        completions = []
        for row in range(new_tokens.shape[0]):
            ids = new_tokens[row].tolist()
            finish = "length"
            if self.eos_token_id in ids:
                ids = ids[:ids.index(self.eos_token_id) + 1]
                finish = "stop"
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in sampling.stop:
                if stop in text:
                    text, finish = text[:text.index(stop)], "stop"
            completions.append(Completion(text, ids, token_logprobs[row, :len(ids)].tolist(), finish,
                                          self._weight_version))
        return completions

    def _shared_prefill(self, inputs, copies: int, cache: DynamicCache) -> dict:
        """Run every prompt but its last token once into ``cache``, repeat the cache (or share
        it, see ``kv_cache.py``) and the MRoPE offsets ``copies`` times; ``generate`` then
        continues from the cache with the last token (the returned per-token inputs, repeated).
        Runs inside ``generate``'s inference mode."""
        prefix = {key: value[:, :-1] if key in _PER_TOKEN else value for key, value in inputs.items()}
        self.model(**prefix, **{_CACHE_KWARG: cache}, use_cache=True)
        share_prompt(cache, copies, prefix["attention_mask"])
        base = self.model.model
        base.rope_deltas = base.rope_deltas.repeat_interleave(copies, dim=0)
        return {key: value.repeat_interleave(copies, dim=0) for key, value in inputs.items() if key in _PER_TOKEN}


class _ExponentialRace(LogitsProcessor):
    """Turns greedy decoding into sampling: argmax_i (s_i - log E_i) with E_i ~ Exp(1) i.i.d.
    picks token i with probability softmax(s)_i (tokens at -inf never). E = -log U with U
    uniform: torch's ``exponential_`` (which ``multinomial`` uses) is 4x slower on a CPU."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores - torch.rand_like(scores).log_().neg_().log_()


def _sampler(sampling: SamplingParams) -> LogitsProcessorList:
    """Temperature, top-k and top-p (transformers' warpers, in generate's order), then the
    exponential race; nothing for greedy decoding (temperature 0)."""
    if sampling.temperature == 0:
        return LogitsProcessorList()
    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList([*warpers, _ExponentialRace()])


def _copies(requests: list[GenerationRequest]) -> int:
    """k when ``requests`` is each of its distinct requests repeated k times in a row (the n
    samples of a prompt), else 1."""
    run = 1
    while run < len(requests) and requests[run] is requests[0]:
        run += 1
    unique = requests[::run]
    if len(requests) % run or any(request is not unique[k // run] for k, request in enumerate(requests)):
        return 1
    return run
