"""The RL step reads values back to the host a fixed number of times per step, however many
micro-batches it runs: the loss function returns detached tensors and the step reduces them
once (training/rl.py), as Megatron-LM's ``loss_func`` and torchtitan's ``train_step`` do. On a
GPU every read-back (``.item()``, ``.tolist()``, ``float(t)``, ``bool(t)``) is a pipeline stall."""

from __future__ import annotations

import collections
import traceback
from contextlib import contextmanager

import pytest
import torch

READ_BACKS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")
# read-backs that are not device syncs: torch's Adam keeps its step counters on the host
# (``state["step"]`` is a CPU tensor unless the optimizer is fused or capturable)
HOST_ONLY = ("torch/optim/",)
# transformers' vision tower (the module the trainer runs on the first stage) turns ``grid_thw``
# into window and sequence boundaries with ``.tolist()``, once per forward with images: counted
# apart, and stated in docs/training.md
VISION_TOWER = ("transformers/",)


# megatron-core's stand-ins for apex's fused kernels (``local_multi_tensor_l2_norm``: a float()
# per parameter), used only where neither apex nor Transformer Engine is installed (this CPU)
CPU_FALLBACK = "local_multi_tensor_"


def owner(entry: str) -> str:
    _, where, function = entry.split(" ")
    if where.startswith(HOST_ONLY):
        return "host-only"
    if function.startswith(CPU_FALLBACK):
        return "cpu fallback"
    if where.startswith(VISION_TOWER):
        return "vision tower"
    return "trainer"  # ours and megatron-core's


@contextmanager
def counting_read_backs(counts: list):
    """Count every tensor -> host read-back while active (``counts`` gets ``name file:line`` of
    each call's caller)."""
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if counting[0]:
                # the first caller that is not the CPU platform layer's factory wrapper (GPU runs lack it)
                caller = next(f for f in reversed(traceback.extract_stack()[:-1])
                              if not f.filename.endswith("model_providers/platform.py"))
                counts.append(f"{name} {caller.filename.split('site-packages/')[-1]}:{caller.lineno} {caller.name}")
            return original(self, *args, **kwargs)
        return counted

    counting = [True]
    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counting
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _experience(processor, samples):
    from megatron_ivr.training.experience import Experience, Trajectory

    texts = ["<desc>The image shows 3 objects.</desc> \\boxed{3}", "<think>so 7</think> \\boxed{7}",
             "<desc>2 red circles</desc> \\boxed{2}", "<think>count them: one, two</think> \\boxed{2}"]
    trajectories = []
    for group, sample in enumerate(samples):
        for k, text in enumerate(texts):
            ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            trajectories.append(Trajectory(sample.id, group, sample.question, sample.images, ids,
                                           [-0.5] * len(ids), 0.0, 0.0, 0.0, advantage=(-1.0) ** k,
                                           rectified=k == 3))
    return Experience(trajectories, [sample.id for sample in samples])


def _uncounted(function, counting: list):
    def run(*args, **kwargs):
        counting[0] = False
        try:
            return function(*args, **kwargs)
        finally:
            counting[0] = True
    return run


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_read_backs_per_step_do_not_grow_with_micro_batches(tiny_models, synthetic_dir, mini_batches):
    """Counted over the step's device work: the log-prob passes (VICRA's no-image pass included),
    the loss of every micro-batch, the optimizer steps and the metric reduction. The layout
    (``_micro_batches``) works on host lists and CPU tensors before they move to the device and
    is not counted. One micro-batch per group of responses, then one per four groups: the count
    is the same, and small."""
    from megatron_ivr.config import load_config
    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.data import ImageRules, read_dataset
    from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel
    from megatron_ivr.model_providers.policy import load_policy
    from megatron_ivr.models.processor import load_processor
    from megatron_ivr.training.rl import RlStep

    model_dir = str(tiny_models["qwen2_5_vl"])
    samples = read_dataset(synthetic_dir / "train.jsonl", ImageRules(28, 3136, 12544), limit=4).samples
    init_parallel(ParallelismConfig())
    try:
        processor = load_processor(model_dir)
        counts_by_budget = {}
        for budget in (160, 4096):  # tokens per micro-batch: one group each, or all four together
            cfg = load_config(None, [f"model.path={model_dir}", "algorithm.vicra.enabled=true",
                                     "trainer.prompts_per_step=4", f"trainer.mini_batches={mini_batches}",
                                     f"trainer.max_tokens_per_micro_batch={budget}", "trainer.lr=1e-4"])
            policy = load_policy(model_dir, optim=cfg.trainer, schedule_steps=2)
            step = RlStep(cfg, policy, processor)
            counts: list = []
            with counting_read_backs(counts) as counting:
                step._micro_batches = _uncounted(step._micro_batches, counting)
                metrics = step(_experience(processor, samples), step=1)
            trainer = [entry for entry in counts if owner(entry) == "trainer"]
            counts_by_budget[budget] = (len(trainer), metrics["batch/micro_batches"], collections.Counter(trainer))
        (small, many, where), (large, few, _) = counts_by_budget[160], counts_by_budget[4096]
        assert many >= 4 and few == mini_batches  # the budgets did change the split
        assert small == large, where
        # the metrics' one read-back (rl.py) and megatron-core's gradient norm (one per optimizer step)
        assert small <= 1 + mini_batches, where
    finally:
        destroy_parallel()
