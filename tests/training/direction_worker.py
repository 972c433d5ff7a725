"""One RL optimizer step on three fixed trajectories (advantage +1, -1 and 0): prints the
change of the first two's mean log-prob, the step's diagnostics beside the spec's pure
functions, and what VICRA's skipping of the zero-advantage response changed, as JSON.
Usage: python direction_worker.py MODEL_DIR DATA_DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    model_dir, data_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    from megatron_ivr.config import load_config
    from megatron_ivr.config.schema import ParallelismConfig, TrainerConfig
    from megatron_ivr.data import ImageRules, read_dataset
    from megatron_ivr.model_providers.parallel import init_parallel
    from megatron_ivr.model_providers.policy import load_policy
    from megatron_ivr.models.processor import load_processor
    from megatron_ivr.training.experience import Experience, Trajectory
    from megatron_ivr.training.rl import RlStep

    init_parallel(ParallelismConfig())
    cfg = load_config(None, [f"model.path={model_dir}", "algorithm.vicra.enabled=true"])
    processor = load_processor(model_dir)
    policy = load_policy(model_dir, optim=TrainerConfig(lr=1e-3), schedule_steps=1)
    sample = read_dataset(data_dir / "train.jsonl", ImageRules(28, 3136, 12544), limit=1).samples[0]
    ids = processor.tokenizer("<desc>The image shows 3 objects.</desc>", add_special_tokens=False)["input_ids"]
    other = processor.tokenizer("<think>so 7</think> \\boxed{7}", add_special_tokens=False)["input_ids"]
    third = processor.tokenizer("<desc>2 red circles</desc> \\boxed{2}", add_special_tokens=False)["input_ids"]
    trajectories = [Trajectory(sample.id, 0, sample.question, sample.images, r, [0.0] * len(r), 0.0, 0.0, 0.0,
                               advantage=a) for r, a in ((ids, 1.0), (other, -1.0), (third, 0.0))]
    step = RlStep(cfg, policy, processor)
    skipping = vicra_skip_report(step, RlStep(load_config(None, [f"model.path={model_dir}",
                                                                 "algorithm.vicra.enabled=true",
                                                                 "algorithm.vicra.skip_zero_advantage=false"]),
                                              policy, processor), trajectories)

    def mean_logps():
        minis, _, _ = step._micro_batches(trajectories, 1)
        step._score(minis, on_policy=False)
        micro = minis[0][0]
        sums = (micro.old_logp * micro.mask).sum(1) / micro.mask.sum(1)
        return [sums[micro.indices.index(i)].item() for i in range(2)]

    before = mean_logps()
    diagnostics = reference_diagnostics(step, trajectories)
    step(Experience(trajectories, [sample.id]), 1)
    after = mean_logps()
    print(json.dumps({"delta": [a - b for a, b in zip(after, before)], **diagnostics, "skipping": skipping}))


def reference_diagnostics(step, trajectories) -> dict:
    """The step's reduced diagnostics and the pure functions of spec 2 / 3 on the same tensors."""
    from megatron_ivr.algorithms.losses import mismatch_metrics
    from megatron_ivr.algorithms.vicra import grounding_diagnostics

    minis, _, _ = step._micro_batches(trajectories, 1)
    step._score(minis, on_policy=False)
    micro = minis[0][0]
    mask = micro.mask
    expected = mismatch_metrics(micro.old_logp, micro.behaviour_logp, mask)
    # VICRA's diagnostics cover the responses its no-image pass scored (advantage != 0)
    expected.update(grounding_diagnostics(micro.w, micro.entropy, micro.scored_mask,
                                          step.cfg.algorithm.vicra.grounded_threshold))
    from megatron_ivr.training.rl import REPORT

    parts = [step._diagnostic_sums(m) for mini in minis for m in mini]  # one mini-batch's report vector
    report = torch.cat([torch.zeros(len(REPORT), dtype=torch.float64), torch.stack([s for s, _ in parts]).sum(0),
                        torch.stack([p for _, p in parts]).max().reshape(1)])
    reduced = step._reduce([report])
    return {"reduced": reduced, "expected": expected}


def vicra_skip_report(skipping, scoring_all, trajectories) -> dict:
    """The shaped advantages of the same micro-batch when the no-image pass skips the
    zero-advantage response and when it scores every response."""
    out = {}
    for name, step in (("skip", skipping), ("all", scoring_all)):
        minis, _, _ = step._micro_batches(trajectories, 1)
        step._score(minis, on_policy=False)
        micro = minis[0][0]
        order = [micro.indices.index(i) for i in range(len(trajectories))]
        out[name] = {"no_image_responses": len(micro.no_image.extra["response_lengths"]),
                     "advantages": micro.advantages[order].tolist(), "w": micro.w[order].tolist()}
    return out


if __name__ == "__main__":
    main()
