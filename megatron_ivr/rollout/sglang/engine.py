"""The SGLang backend of :class:`~megatron_ivr.rollout.engine.RolloutEngine`.

Prompts are rendered with the model's chat template here (one ``<|image_pad|>`` per image;
the server expands it) and images travel as PNG data URIs. Each of the ``n`` samples of a
request is its own ``/generate`` call with its own ``rid`` (see client.py for retries).

A partial rollout (a request with ``partial``: the response so far of one that a weight push
aborted) is sent as token ids: the prompt's (one ``<|image_pad|>`` per image) followed by
exactly the tokens sampled so far, never their decoded text, which a random or an unlucky
sample does not tokenize back to. SGLang 0.5.23 keeps such ids only on its multimodal fast
path (``compose_image_artifacts``), which Qwen3-VL always takes and Qwen2.5-VL takes with a
preprocessing cache (``--mm-preprocess-cache-size-mb``, which ``server.py`` sets); elsewhere it
decodes and re-tokenizes the ids. The SGLang tier tests the log-probs after a push.
"""

from __future__ import annotations

import base64
import io
import logging
import uuid
from typing import Optional

from megatron_ivr.models.tokenizer import vision_token_ids
from megatron_ivr.prompts import chat_prompt
from megatron_ivr.rollout.engine import Completion, GenerationRequest, SamplingParams
from megatron_ivr.rollout.sglang.client import SGLangClient

logger = logging.getLogger(__name__)


def image_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def parse_version(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# SGLang's logit_bias takes finite JSON numbers: this one makes a token's probability exactly 0
# in float32 and bfloat16 logits alike
BANNED_BIAS = -1.0e9


class SGLangEngine:
    def __init__(self, client: SGLangClient, tokenizer, weight_version: int = 0, mask_vision_tokens: bool = True):
        """``mask_vision_tokens``: every request carries a ``logit_bias`` that removes the vision
        placeholders (``models/tokenizer.py``) from sampling. SGLang applies it before its
        log-softmax, so the reported log-probs are of the distribution without them: the one
        the local engine samples from and the trainer scores (``model_providers/logprobs.py::tempered``)."""
        self.client = client
        self.tokenizer = tokenizer
        self.logit_bias = ({str(i): BANNED_BIAS for i in vision_token_ids(tokenizer)} if mask_vision_tokens
                           else None)
        self._weight_version = weight_version
        self._on_gpu: Optional[bool] = None  # asked once, at the first memory release

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def prompt_text(self, request: GenerationRequest) -> str:
        return chat_prompt(self.tokenizer, request.text, len(request.images))

    def payload(self, request: GenerationRequest, sampling: SamplingParams, sample: int) -> dict:
        prefix = request.partial.token_ids if request.partial is not None else []
        params = {"max_new_tokens": sampling.max_new_tokens - len(prefix), "temperature": sampling.temperature,
                  "top_p": sampling.top_p, "top_k": sampling.top_k, "n": 1}
        if sampling.stop:
            params["stop"] = list(sampling.stop)
        if self.logit_bias:
            params["logit_bias"] = self.logit_bias
        if sampling.seed is not None:
            params["sampling_seed"] = sampling.seed + sample
        payload = {"sampling_params": params, "return_logprob": True,
                   "rid": f"{request.request_id or 'req'}-{sample}-{uuid.uuid4().hex[:8]}"}
        if prefix:  # a partial rollout continues from exactly its tokens (module docstring)
            prompt_ids = self.tokenizer(self.prompt_text(request), add_special_tokens=False)["input_ids"]
            payload["input_ids"] = list(prompt_ids) + list(prefix)
        else:
            payload["text"] = self.prompt_text(request)
        if request.images:
            payload["image_data"] = [image_data_uri(image) for image in request.images]
        return payload

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[list[Completion]]:
        payloads = [self.payload(r, sampling, k) for r in requests for k in range(sampling.n)]
        results = self.client.generate(payloads)
        out: list[list[Completion]] = [[] for _ in requests]
        for index, result in enumerate(results):
            completion, partial = to_completion(result), requests[index // sampling.n].partial
            if partial is not None:  # the whole response: the partial one, then what was generated now
                text = self.tokenizer.decode(partial.token_ids + completion.token_ids, skip_special_tokens=True)
                completion = partial.continued(text, completion.token_ids, completion.logprobs,
                                               completion.finish_reason, completion.weight_version)
            out[index // sampling.n].append(completion)
        return out

    def health(self) -> list[bool]:
        return self.client.healthy()

    def counters(self) -> dict:
        """Servers lost for the rest of the run (client.py retires them), requests retried elsewhere."""
        stats = self.client.stats
        return {"rollout/servers_lost": len(stats.retired), "rollout/request_retries": stats.retries}

    def pause(self, mode: str = "abort") -> None:
        self.client.call_all("/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self.client.call_all("/continue_generation", {})

    def _servers_on_gpu(self) -> bool:
        """SGLang 0.5.23's CPU engine crashes on ``/release_memory_occupation`` (it calls
        ``torch.cuda.synchronize``; measured here), so the memory calls go to GPU servers only."""
        if self._on_gpu is None:
            infos = self.client.call_all("/server_info", method="GET")
            self._on_gpu = all(isinstance(i, dict) and i.get("device", "cuda") != "cpu" for i in infos)
            if not self._on_gpu:
                logger.warning("rollout.offload_during_train: the SGLang servers run on CPU, which cannot release "
                               "memory; the release/resume calls are skipped")
        return self._on_gpu

    def release_memory(self) -> None:
        """Colocated GPUs: the servers free their weights and KV cache while the trainer trains
        (the servers need ``--enable-memory-saver``)."""
        if self._servers_on_gpu():
            self.client.call_all("/release_memory_occupation", {})

    def resume_memory(self) -> None:
        """Take the memory back before the weight sync and the next rollouts."""
        if self._servers_on_gpu():
            self.client.call_all("/resume_memory_occupation", {})

    def set_weight_version(self, version: int) -> None:
        self._weight_version = version


def to_completion(result: dict) -> Completion:
    meta = result.get("meta_info", {})
    entries = meta.get("output_token_logprobs") or []
    token_ids = [int(entry[1]) for entry in entries]
    logprobs = [float(entry[0]) for entry in entries]
    finish = meta.get("finish_reason") or {}
    reason = finish.get("type", "stop") if isinstance(finish, dict) else str(finish)
    return Completion(text=result.get("text", ""), token_ids=token_ids, logprobs=logprobs,
                      finish_reason="length" if reason == "length" else ("abort" if reason == "abort" else "stop"),
                      weight_version=parse_version(meta.get("weight_version")))


def engine_from_urls(urls: list[str], tokenizer, api_key: Optional[str] = None, **client_kwargs) -> SGLangEngine:
    return SGLangEngine(SGLangClient(urls, api_key=api_key, **client_kwargs), tokenizer)
