"""In-process rollout engine on a Hugging Face model: the CPU backend of the laptop path.

Requests are rendered with the model's chat template, batched (``batch_size`` prompts x
``n`` samples per ``generate`` call, KV cache on), sampled or greedy, and returned with the
log-prob of every generated token under the distribution it was sampled from before
top-k/top-p: ``log softmax(logits / T)`` (raw logits when greedy), as SGLang returns them and
the trainer computes them (spec 2).

The ``n`` samples of a prompt share its prefill: the prompt (image included) is run once into
the KV cache, with the MRoPE offsets repeated per sample. Without it, the prompt and image
would be encoded ``n`` times. A batch without any image is prefilled per row (the model's
MRoPE offsets come from image grids; a text-only prefill would keep the previous batch's).

Decoding is the engine's own loop over the model's forward (``_decode``), one token per step
with transformers' generate positions, sampling and padding of finished rows (tested equal to
``generate``: tokens, and log-probs within 1e-5): ``generate``'s per-token bookkeeping (input
preparation, position slicing, processors, stopping criteria) was 14% of the tiny model's
generation time on a CPU (cProfile).

The KV cache (``kv_cache.py``) writes each new token in place and, after a shared prefill,
keeps one copy of the prompt per group of samples; decode attention reads it once per group.
Sampling is an argmax over the warped logits minus the log of exponential noise (the
exponential race, as SGLang and vLLM sample): the same distribution as ``torch.multinomial``,
which took 7% of the tiny model's generation time on a CPU (torch.profiler).

A weight update may come while another thread generates (``rollout.mode=async``): ``pause``
makes the running ``generate`` stop after its current decode step and return what each row
has so far (finish reason ``abort``), then holds the engine until ``resume``; a request with a
``partial`` response continues it, the prefix fed as response tokens (exactly the ids, no
re-tokenization), so the tokens after the push are sampled from, and scored under, the new
weights.

For routing replay (MoE) the engine records the k experts each router chose for every token
it fed (:class:`_RouterRecorder`, forward hooks on transformers' routers) and returns them per
response (``Completion.routed_experts``).
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from typing import Optional

import torch
import transformers
from packaging.version import Version
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from megatron_ivr.model_providers.state_dict_adapter import FUSED_EXPERT_TEXT_TYPES
from megatron_ivr.models.processor import load_processor
from megatron_ivr.models.tiny import load_model
from megatron_ivr.models.tokenizer import vision_token_ids
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
        self.banned_token_ids = torch.tensor(vision_token_ids(processor.tokenizer), dtype=torch.long)
        # the engine's own random stream: sampling on a generator thread (rollout.mode=one_step_off)
        # neither draws from nor disturbs the trainer's global one; seeded like torch.manual_seed
        # would seed it, so the samples are the same as from the global generator
        self.generator = torch.Generator()
        self._abort = threading.Event()  # set by pause(): the running generate returns at its next token
        self._serving = threading.Lock()  # held by generate, and by a pause until its resume
        self._paused = False
        self._routers = _RouterRecorder(model)

    @classmethod
    def from_pretrained(cls, path, batch_size: int = 16) -> LocalEngine:
        return cls(load_model(path), load_processor(path), batch_size)

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def set_weight_version(self, version: int) -> None:
        self._weight_version = version

    def parameter_names(self) -> list[str]:
        """The names ``update_weights`` takes: the model's parameters, with transformers' fused
        expert tensors under one name per expert where the family's checkpoints hold them so
        (Qwen3.5-MoE; ``state_dict_adapter.FUSED_EXPERT_TEXT_TYPES``)."""
        text = self.model.config.get_text_config()
        per_expert = bool(getattr(text, "num_experts", None)) and text.model_type not in FUSED_EXPERT_TEXT_TYPES
        names = []
        for name, param in self.model.named_parameters():
            fused = _FUSED_EXPERTS.match(name)
            if not (per_expert and fused):
                names.append(name)
                continue
            kinds = ("down_proj",) if fused.group(2) == "down_proj" else ("gate_proj", "up_proj")
            names += [f"{fused.group(1)}.{e}.{kind}.weight" for e in range(param.shape[0]) for kind in kinds]
        return names

    def health(self) -> list[bool]:
        return [True]

    def counters(self) -> dict:
        return {}

    def pause(self, mode: str = "abort") -> None:
        """Abort what is generating (it returns its partial responses) and hold the engine until
        ``resume``; immediate when nothing generates (``mode`` is SGLang's; only abort exists here)."""
        if self._paused:
            return
        self._abort.set()
        self._serving.acquire()
        self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._abort.clear()
            self._serving.release()

    def release_memory(self) -> None:
        pass  # in-process model on the controller: nothing is shared with the trainer

    def resume_memory(self) -> None:
        pass

    def update_weights(self, named_tensors, version: int) -> None:
        """Load Hugging Face-named tensors in place; every name must exist (none dropped). Fused
        expert tensors come in the checkpoints' layout (``[E, H, 2I]``) and are transposed into
        transformers' (``[E, 2I, H]``), as its loader does; one tensor per expert (Qwen3.5-MoE:
        ``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``) goes into its slice of
        transformers' fused tensors."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                target, name = _per_expert_target(params, name)
                if name not in params:
                    raise KeyError(f"update_weights: unknown parameter {name!r}")
                param = params[name] if target is None else target
                if tensor.dim() == 3 and ".experts." in name and tensor.shape != param.shape:
                    tensor = tensor.transpose(1, 2)
                param.copy_(tensor)
        self._weight_version = version

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[list[Completion]]:
        expanded = [(i, r) for i, r in enumerate(requests) for _ in range(sampling.n)]
        results: list[list[Completion]] = [[] for _ in requests]
        with self._serving:
            if sampling.seed is not None:
                self.generator.manual_seed(sampling.seed)
            for start in range(0, len(expanded), self.batch_size):
                chunk = expanded[start:start + self.batch_size]
                batch = ([_aborted(r, self._weight_version) for _, r in chunk] if self._abort.is_set()
                         else self._generate_batch([r for _, r in chunk], sampling))
                for (index, _), completion in zip(chunk, batch):
                    results[index].append(completion)
        return results

    def _generate_batch(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Completion]:
        # a shared prefill repeats the MRoPE offsets the model computes from image grids; a batch
        # without images is prefilled per row (_prefill_inputs gives it zero offsets)
        shareable = self.share_prefill and any(r.images for r in requests) and not any(r.partial for r in requests)
        copies = _copies(requests) if shareable else 1
        unique = requests[::copies]
        texts = [chat_prompt(self.processor, r.text, len(r.images)) for r in unique]
        images = [image for r in unique for image in r.images] or None
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        prefixes = [r.partial.token_ids if r.partial is not None else [] for r in requests]
        if any(prefixes):  # partial rollouts: each row's response so far joins its prompt (copies == 1)
            inputs = _append_tokens(inputs, prefixes, self.pad_token_id)
        budgets = [sampling.max_new_tokens - len(prefix) for prefix in prefixes]
        sampling = SamplingParams(**{**sampling.__dict__, "max_new_tokens": max(max(budgets), 1)})
        version = self._weight_version
        cache = growing_cache(self.model, sampling.max_new_tokens, share_prefix=self.shares_prompt_kv)
        with attending(cache), self._routers.recording(sampling.return_routed_experts):
            if copies > 1:  # the cache holds all but the last prompt token, once per prompt
                inputs = self._shared_prefill(inputs, copies, cache)
                first = {"input_ids": inputs["input_ids"][:, -1:]}
            else:  # the whole prompt, images included, in the first forward
                first = self._prefill_inputs(inputs)
            new_tokens, token_logprobs, aborted = self._decode(first, inputs["attention_mask"], cache, sampling)
            routed = self._routers.per_row(inputs["attention_mask"])
        prompt_lengths = inputs["attention_mask"].sum(-1)
        completions = []
        for row, request in enumerate(requests):
            ids = new_tokens[row, :max(budgets[row], 0)].tolist()
            finish = "length" if len(ids) == budgets[row] or not aborted else "abort"
            if self.eos_token_id in ids:
                ids = ids[:ids.index(self.eos_token_id) + 1]
                finish = "stop"
            logprobs = token_logprobs[row, :len(ids)].tolist()
            text = self.processor.tokenizer.decode(prefixes[row] + ids, skip_special_tokens=True)
            for stop in sampling.stop:
                if stop in text:
                    text, finish = text[:text.index(stop)], "stop"
            experts = None
            if routed is not None:  # the prompt (and a partial's response so far), then the new tokens but the last
                experts = routed[row][:int(prompt_lengths[row]) + len(ids) - 1]
            completions.append(request.partial.continued(text, ids, logprobs, finish, version, experts)
                               if request.partial else Completion(text, ids, logprobs, finish, version,
                                                                  routed_experts=experts))
        return completions

    def _prefill_inputs(self, inputs) -> dict:
        """The first forward's inputs when each row is prefilled on its own. With images the
        model computes its MRoPE positions (and offsets) from the grids; a text-only batch gets
        transformers' generate positions (the left padding skipped) and zero offsets."""
        mask = inputs["attention_mask"]
        first = {key: value for key, value in inputs.items() if key != "attention_mask"}  # _decode passes it
        if "image_grid_thw" in inputs:
            return first
        text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.model.model.rope_deltas = torch.zeros((mask.shape[0], 1), dtype=torch.long)
        return {**first, "position_ids": text[None].expand(4, -1, -1)}

    def _decode(self, feed: dict, mask: torch.Tensor, cache: DynamicCache, sampling: SamplingParams
                ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Sample up to ``max_new_tokens`` per row, one forward per token from ``cache``:
        ``feed`` is the first forward's input (the whole prompt, or its last token after a
        shared prefill), ``mask [B, L]`` the prompt's attention mask. A decode step's position
        is transformers' generate's: the text position (the prompt's tokens counted, padding
        skipped) plus the row's MRoPE offset (``rope_deltas``), on all three MRoPE axes.
        Finished rows are fed padding until every row has finished, as transformers does.
        Vision placeholder tokens are never chosen (``models/tokenizer.py::VISION_TOKENS``): they
        are not part of the distribution. Returns the tokens ``[B, T]`` and their log-probs
        ``[B, T]`` under ``logits / temperature`` without them (the raw logits when greedy), before
        top-k/top-p: the distribution the trainer scores (``model_providers/logprobs.py::tempered``) and
        SGLang reports. The third value: whether a ``pause`` stopped it early.
        """
        base, batch = self.model.model, mask.shape[0]
        processors = _sampler(sampling, self.generator)
        scale = sampling.temperature if sampling.temperature > 0 else 1.0
        position = mask.sum(-1, keepdim=True) - 1  # the text position of the prompt's last token
        finished = torch.zeros(batch, dtype=torch.bool)
        tokens, logprobs = [], []
        for _ in range(sampling.max_new_tokens):
            if self._abort.is_set():
                break
            if cache.get_seq_length() > 0:  # continuing from the cache: one token per row
                mrope = (position + base.rope_deltas)[None].expand(3, -1, -1)
                feed = {**feed, "position_ids": torch.cat([position[None], mrope])}  # [4, B, 1]: text, t, h, w
            logits = self.model(**feed, attention_mask=mask, **{_CACHE_KWARG: cache}, use_cache=True,
                                logits_to_keep=1).logits[:, -1].float()
            allowed = logits.index_fill(-1, self.banned_token_ids, float("-inf"))  # never a vision token
            token = (processors(None, allowed) if processors else allowed).argmax(-1)
            token = token.masked_fill(finished, self.pad_token_id)
            tokens.append(token)
            logprobs.append((allowed / scale).log_softmax(-1).gather(-1, token[:, None])[:, 0])
            finished |= token == self.eos_token_id
            if finished.all():
                break
            feed = {"input_ids": token[:, None]}
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            position = position + 1
        if not tokens:  # aborted before the first token
            return torch.zeros((batch, 0), dtype=torch.long), torch.zeros((batch, 0)), True
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1), self._abort.is_set() and not finished.all()

    def _shared_prefill(self, inputs, copies: int, cache: DynamicCache) -> dict:
        """Run every prompt but its last token once into ``cache``, repeat the cache (or share
        it, see ``kv_cache.py``) and the MRoPE offsets ``copies`` times; ``_decode`` then
        continues from the cache with the last token (the returned per-token inputs, repeated).
        Runs inside ``generate``'s inference mode."""
        prefix = {key: value[:, :-1] if key in _PER_TOKEN else value for key, value in inputs.items()}
        self.model(**prefix, **{_CACHE_KWARG: cache}, use_cache=True)
        self._routers.repeat_last(copies)
        share_prompt(cache, copies, prefix["attention_mask"])
        base = self.model.model
        base.rope_deltas = base.rope_deltas.repeat_interleave(copies, dim=0)
        return {key: value.repeat_interleave(copies, dim=0) for key, value in inputs.items() if key in _PER_TOKEN}


_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _per_expert_target(params: dict, name: str):
    """``(view, fused name)`` for one expert's tensor inside transformers' fused expert tensors
    (``gate_up_proj [E, 2I, H]``: gate rows then up rows; ``down_proj [E, H, I]``), else
    ``(None, name)``."""
    match = _PER_EXPERT.match(name)
    if match is None:
        return None, name
    layer, expert, kind = match.group(1), int(match.group(2)), match.group(3)
    fused = f"{layer}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}"
    if fused not in params:
        return None, name
    matrix = params[fused][expert]
    if kind == "down_proj":
        return matrix, fused
    half = matrix.shape[0] // 2
    return (matrix[:half] if kind == "gate_proj" else matrix[half:]), fused


class _RouterRecorder:
    """The k experts transformers' MoE routers (each decoder layer's ``mlp.gate``) choose in
    every forward of a generation, while :meth:`recording`; ``per_row`` puts them together per
    row as the tokens were fed. A dense model has no routers: nothing is recorded."""

    def __init__(self, model):
        self.gates = [module.gate for module in model.modules()
                      if hasattr(module, "gate") and hasattr(module, "experts")]
        # per forward: [rows each row stands for (a shared prefill: copies), per layer [tokens, k]]
        self.forwards: Optional[list[list]] = None

    @contextmanager
    def recording(self, enabled: bool):
        if not enabled or not self.gates:
            self.forwards = None
            yield
            return
        self.forwards = []
        handles = [gate.register_forward_hook(self._hook(layer)) for layer, gate in enumerate(self.gates)]
        pre = self.gates[0].register_forward_pre_hook(self._start)
        try:
            yield
        finally:
            pre.remove()
            for handle in handles:
                handle.remove()

    def _start(self, module, args) -> None:
        self.forwards.append([1, [None] * len(self.gates)])

    def _hook(self, layer: int):
        def hook(module, args, output):
            self.forwards[-1][1][layer] = output[2].to(torch.int16)  # router_indices [tokens, k]
        return hook

    def repeat_last(self, copies: int) -> None:
        """The last forward was a shared prefill: its rows stand for ``copies`` rows each."""
        if self.forwards:
            self.forwards[-1][0] = copies

    def per_row(self, prompt_mask: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """Per row, ``[fed tokens, layers, k]``: the prompt's tokens (its left padding dropped)
        then one per decode step; the caller cuts it at the response's last token."""
        if self.forwards is None:
            return None
        rows = prompt_mask.shape[0]
        steps = [torch.stack([indices.reshape(rows // repeat, -1, indices.shape[-1]) for indices in layers],
                             dim=2).repeat_interleave(repeat, dim=0)  # [B, S_f, layers, k]
                 for repeat, layers in self.forwards]
        fed = torch.cat(steps, dim=1)
        padding = prompt_mask.shape[1] - prompt_mask.sum(-1)  # left padding of each row's prompt
        self.forwards = None
        return [fed[row, int(padding[row]):] for row in range(rows)]


def _aborted(request: GenerationRequest, version: int) -> Completion:
    """A request the pause reached before it started: its response so far, still to continue."""
    if request.partial is not None:
        return request.partial.continued(request.partial.text, [], [], "abort", version)
    return Completion("", [], [], "abort", version)


def _append_tokens(inputs, suffixes: list[list[int]], pad_token_id: int):
    """The processor's left-padded batch with ``suffixes[row]`` (text tokens) after each row's
    prompt, padded on the left again; the image inputs are unchanged."""
    mask = inputs["attention_mask"].bool()
    rows = {key: [inputs[key][row][mask[row]].tolist() + (list(suffixes[row]) if key == "input_ids" else
                                                          [int(key == "attention_mask")] * len(suffixes[row]))
                  for row in range(mask.shape[0])] for key in _PER_TOKEN if key in inputs}
    width = max(len(row) for row in rows["input_ids"])
    pad = {"input_ids": pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
    out = dict(inputs)
    for key, values in rows.items():
        out[key] = torch.tensor([[pad[key]] * (width - len(row)) + row for row in values],
                                dtype=inputs[key].dtype)
    return out


class _ExponentialRace(LogitsProcessor):
    """Turns greedy decoding into sampling: argmax_i (s_i - log E_i) with E_i ~ Exp(1) i.i.d.
    picks token i with probability softmax(s)_i (tokens at -inf never). E = -log U with U
    uniform: torch's ``exponential_`` (which ``multinomial`` uses) is 4x slower on a CPU."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.rand(scores.shape, generator=self.generator, dtype=scores.dtype, device=scores.device)
        return scores - uniform.log_().neg_().log_()


def _sampler(sampling: SamplingParams, generator: Optional[torch.Generator] = None) -> LogitsProcessorList:
    """Temperature, top-k and top-p (transformers' warpers, in generate's order), then the
    exponential race; nothing for greedy decoding (temperature 0)."""
    if sampling.temperature == 0:
        return LogitsProcessorList()
    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList([*warpers, _ExponentialRace(generator)])


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
