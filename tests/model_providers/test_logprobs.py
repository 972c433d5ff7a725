"""The trainer scores the distribution the engines sample from: ``logits / T`` with the vision
placeholder tokens removed (model_providers/logprobs.py::tempered). Checked against a plain torch
log-softmax with those logits at -inf; the entropy stays finite."""

from __future__ import annotations

import torch

from megatron_ivr.config.schema import ParallelismConfig
from megatron_ivr.model_providers.logprobs import tempered, vocab_parallel_entropy, vocab_parallel_logprobs
from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel


def test_removed_tokens_leave_the_distribution():
    init_parallel(ParallelismConfig())
    try:
        torch.manual_seed(0)
        logits = torch.randn(2, 5, 32, dtype=torch.float64).float()
        targets = torch.randint(0, 32, (2, 5))
        targets[targets >= 28] = 3  # no target is a removed token
        banned = (28, 29, 30, 31)
        reference = (logits.index_fill(-1, torch.tensor(banned), float("-inf")) / 0.7).log_softmax(-1)
        got = vocab_parallel_logprobs(tempered(logits, 0.7, banned), targets)
        assert torch.allclose(got, reference.gather(-1, targets[..., None])[..., 0], atol=1e-6)
        probs = reference.exp()
        entropy = -(probs * reference.masked_fill(probs == 0, 0)).sum(-1)
        assert torch.allclose(vocab_parallel_entropy(tempered(logits, 0.7, banned)), entropy, atol=1e-5)
        assert tempered(logits, 1.0) is logits  # nothing to do: the logits themselves
        plain = vocab_parallel_logprobs(tempered(logits, 0.7), targets)
        assert (plain < got).all()  # removing the tokens' mass raises every kept log-prob
    finally:
        destroy_parallel()
