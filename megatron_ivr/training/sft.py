"""SFT cold start (spec section 5): supervised fine-tuning on reference responses.

Each step draws ``sft.batch_size`` samples in the seeded epoch order (over all of
``sft.data_paths``), turns each into (prompt, images, reference response + end-of-turn
token): the response prompt for a question with a reference answer, or a chat row's own
prompt (e.g. the IVR-R1 critique and rectification examples), and minimizes the mean
negative log-likelihood over all response tokens of the batch (prompt tokens carry no loss).
The denominator is the batch's total response-token count, so the loss does not depend on
how the batch is split into micro-batches or over data-parallel ranks.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from megatron.core import parallel_state as ps

from megatron_ivr.config.schema import RunConfig
from megatron_ivr.data import DataError
from megatron_ivr.model_providers.batching import (
    PromptCache,
    ScoredSequence,
    collate,
    encode_all,
    padding_share,
    plan_micro_batches,
)
from megatron_ivr.model_providers.logprobs import sum_over_data_parallel, vocab_parallel_logprobs
from megatron_ivr.model_providers.optimizer import global_loss_scale, train_step
from megatron_ivr.model_providers.parallel import device
from megatron_ivr.model_providers.qwen_vl import causal_mask, token_alignment
from megatron_ivr.prompts import sample_prompt
from megatron_ivr.training.sampler import EpochSampler

logger = logging.getLogger(__name__)


def response_token_ids(tokenizer, text: str) -> list[int]:
    """A reference response as the engine would emit it: its tokens, then end of turn."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def reference_samples(cfg: RunConfig, datasets: list) -> list:
    """The samples SFT trains on: those with a reference response; none is a data error
    (checked before the model loads)."""
    samples = [s for dataset in datasets for s in dataset.samples if s.reasoning]
    if not samples:
        raise DataError(f"{cfg.sft.data_paths}: no sample has a reference response (a 'reasoning' or "
                        "'response' column, or chat 'messages')")
    return samples


class SftJob:
    name = "sft"

    def __init__(self, cfg: RunConfig, policy, processor, datasets: list):
        self.cfg, self.policy, self.processor = cfg, policy, processor
        self.samples = reference_samples(cfg, datasets)
        self.total_steps = cfg.sft.steps
        self.sampler = EpochSampler(len(self.samples), cfg.trainer.seed)
        self.token_alignment = token_alignment(cfg.parallel.fp8, cfg.parallel.tensor_parallel)  # rows padded: FP8, SP
        self.data_metrics = {}
        for index, dataset in enumerate(datasets):
            self.data_metrics.update(dataset.metrics(f"data/sft/{index}"))

    def prompt(self, sample) -> str:
        """A chat row's own prompt, else the response prompt of the run's output template."""
        return sample_prompt(sample, self.cfg.reward.template)

    def start(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def step(self, step: int) -> dict:
        cfg, tokenizer = self.cfg, self.processor.tokenizer
        epoch = self.sampler.epoch
        indices = self.sampler.draw(cfg.sft.batch_size)
        samples = [self.samples[i] for i in indices]
        items = encode_all(PromptCache(self.processor), [
            ScoredSequence(self.prompt(s), s.images, response_token_ids(tokenizer, s.reasoning)) for s in samples])
        lengths = [item.length for item in items]
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        plan = plan_micro_batches(lengths, cfg.trainer.max_tokens_per_micro_batch, dp_size)
        mine = plan[dp_rank::dp_size]
        batches = [collate(self.policy.family, self.policy.hf_config, [items[i] for i in group],
                           tokenizer.pad_token_id, self.token_alignment) for group in mine]
        total_tokens = float(sum(len(item.response_ids) for item in items))
        scale = global_loss_scale(len(batches), dp_size)

        def loss_fn(batch, logits):  # the mean NLL of the step's reply tokens (global denominator)
            logp = vocab_parallel_logprobs(logits, batch.targets) * batch.loss_mask
            nll = -logp.sum()
            return nll / total_tokens * scale, nll.detach().double().reshape(1)

        self.policy.advance_lr()
        result = train_step(self.policy.ddp, self.policy.optimizer, batches, causal_mask,
                            [partial(loss_fn, batch) for batch in batches])
        local = torch.stack(result["reports"]).sum(0) if result["reports"] else torch.zeros(1, dtype=torch.float64,
                                                                                             device=device())
        nll = sum_over_data_parallel(local).item()  # the step's one read-back
        metrics = {"sft/loss": nll / total_tokens, "sft/grad_norm": result["grad_norm"],
                   "sft/lr": self.policy.lr, "sft/tokens": total_tokens, "sft/epoch": epoch,
                   "batch/padding_share": padding_share(lengths, plan), "batch/micro_batches": len(plan)}
        if step == 1:
            metrics.update(self.data_metrics)
        return metrics
