"""Seconds per RL step: ours (plain GRPO, then +VICRA, then +IVR-R1) beside TRL's
``GRPOTrainer``, on the same tiny Qwen2.5-VL, the same synthetic prompts and the same batch
(8 prompts x 4 samples x up to 64 new tokens, temperature 1), one thread, in one run.

Both sides do the whole step: sample the completions, score them with the same reward
function, compute the log-probs, take one optimizer step. Ours also pushes the weights into
the engine through the bridge (TRL generates from the model it trains). Each arm runs
``--steps`` steps; the first ``--warmup`` are not timed. Ours (plain GRPO), TRL and ours with
VICRA alternate for ``--rounds`` rounds (GRPO, TRL, VICRA, GRPO, ...), so that a slow spell of
the machine falls on all three; each arm's median is over all its timed steps.

Last line: ``step: ratio=R (TRL GRPOTrainer s/step over ours)``; the lines before it give
VICRA's and the IVR loop's extra cost as a share of our GRPO step.

Usage: python benchmarks/step.py [--steps 12] [--warmup 2] [--rounds 2]   (needs `pip install -e .[bench]`)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS, SAMPLES, NEW_TOKENS = 8, 4, 64
PHASES = ("rollout", "ivr", "logprob_passes", "train", "weight_sync")  # our step's timed phases


def make_assets(root: Path):
    from megatron_ivr.config.schema import SyntheticDataConfig, TinyModelConfig
    from megatron_ivr.data.synthetic import generate_dataset
    from megatron_ivr.data.synthetic.generate import synthetic_corpus
    from megatron_ivr.models.tiny import make_tiny_model
    from megatron_ivr.models.tokenizer import train_bpe_tokenizer

    synthetic = SyntheticDataConfig(output_dir=str(root / "data"), num_train=256, num_val=8, num_test=8)
    generate_dataset(synthetic)
    tokenizer = train_bpe_tokenizer(synthetic_corpus(synthetic, count=500), 512)
    model = make_tiny_model("qwen2_5_vl", TinyModelConfig(hidden_size=128, num_layers=4, vision_hidden_size=64),
                            tokenizer, root / "model", 3136, 12544)
    return root / "data", model


def ours(data: Path, model: Path, run_dir: Path, steps: int, warmup: int, overrides: list[str]) -> list[dict]:
    """The metric records of the timed steps (``step_seconds`` reads their times)."""
    from megatron_ivr.config import load_config
    from megatron_ivr.metrics import read_metrics
    from megatron_ivr.training.train import run_rl

    cfg = load_config(None, [
        f"model.path={model}", f"data.train_path={data / 'train.jsonl'}", "data.min_pixels=3136",
        "data.max_pixels=12544", f"trainer.steps={steps}", f"trainer.prompts_per_step={PROMPTS}",
        f"rollout.n={SAMPLES}", f"rollout.max_new_tokens={NEW_TOKENS}", "trainer.lr=1e-5",
        f"checkpoint.dir={run_dir / 'ckpt'}", "checkpoint.save_interval=0", "checkpoint.resume=false",
        f"logging.dir={run_dir / 'logs'}", "logging.progress=false", "trainer.export_dir=null", *overrides])
    cfg.checkpoint.save_interval = 10**9  # no checkpoint inside the timed steps (the last one is not timed)
    run_rl(cfg)
    return [r for r in read_metrics(run_dir / "logs" / "metrics.jsonl") if "step" in r][warmup:]


def step_seconds(records: list[dict]) -> list[float]:
    return [r["time/step"] - r.get("time/checkpoint", 0.0) for r in records]


def trl(data: Path, model_dir: Path, run_dir: Path, steps: int, warmup: int) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_ivr.config.schema import RewardConfig
    from megatron_ivr.data import ImageRules, read_dataset
    from megatron_ivr.models.processor import load_processor
    from megatron_ivr.models.tiny import load_model
    from megatron_ivr.prompts import chat_messages, render_prompt
    from megatron_ivr.rewards import RewardFunction

    samples = read_dataset(data / "train.jsonl", ImageRules(28, 3136, 12544)).samples
    rows = {"prompt": [chat_messages(render_prompt("response", "ivr", question=s.question), 1) for s in samples],
            "image": [s.images[0] for s in samples], "answer": [s.answer for s in samples]}
    reward_fn = RewardFunction(RewardConfig())

    def reward(completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [r.total for r in reward_fn(texts, answer)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    config = GRPOConfig(output_dir=str(run_dir), per_device_train_batch_size=PROMPTS * SAMPLES,
                        num_generations=SAMPLES, max_completion_length=NEW_TOKENS, temperature=1.0,
                        learning_rate=1e-5, max_steps=steps, use_cpu=True, bf16=False, gradient_checkpointing=False,
                        logging_steps=1, report_to="none", save_strategy="no", beta=0.0, seed=0,
                        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=load_model(model_dir), reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_dict(rows), processing_class=load_processor(model_dir),
                          callbacks=[Timer()])
    try:
        trainer.train()
    finally:
        reward_fn.close()
    return times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    arms: dict[str, list[dict]] = {"grpo": [], "vicra": [], "ivr": []}  # our timed steps' records
    trl_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, model = make_assets(root)
        for r in range(args.rounds):
            arms["grpo"] += ours(data, model, root / f"grpo{r}", args.steps, args.warmup, [])
            trl_times += trl(data, model, root / f"trl{r}", args.steps, args.warmup)
            # every response through the no-image pass: the random policy's rewards are all 0, so
            # its advantages are too, and the default (skip zero-advantage responses) would skip all
            arms["vicra"] += ours(data, model, root / f"vicra{r}", args.steps, args.warmup,
                                  ["algorithm.vicra.enabled=true", "algorithm.vicra.skip_zero_advantage=false"])
        arms["ivr"] = ours(data, model, root / "ivr", args.steps, args.warmup,
                           ["algorithm.ivr.enabled=true", "algorithm.ivr.critique_max_new_tokens=64"])
    grpo, vicra, ivr = (statistics.median(step_seconds(arms[arm])) for arm in ("grpo", "vicra", "ivr"))
    baseline = statistics.median(trl_times)
    timed = args.steps - args.warmup
    print(f"ours GRPO: {grpo:.3f} s/step; +VICRA: {vicra:.3f} s/step; +IVR-R1: {ivr:.3f} s/step; "
          f"TRL GRPOTrainer: {baseline:.3f} s/step (medians of {timed} steps x {args.rounds} alternating rounds for "
          f"GRPO, TRL and VICRA, {timed} steps for IVR-R1; 1 thread)")
    for arm, records in arms.items():  # where our time goes: medians per phase
        medians = {phase: statistics.median(r.get(f"time/{phase}", 0.0) for r in records) for phase in PHASES}
        print(f"phases {arm}: " + ", ".join(f"{phase} {seconds:.3f} s" for phase, seconds in medians.items()
                                           if seconds))
    print(f"vicra_cost: {100 * (vicra / grpo - 1):.1f}% of a GRPO step, every response scored (goal <= 8%)")
    print(f"ivr_cost: {100 * (ivr / grpo - 1):.1f}% of a GRPO step (critique + rectify generation, random policy)")
    print(f"step: ratio={baseline / grpo:.2f} (TRL GRPOTrainer s/step over ours)")


if __name__ == "__main__":
    main()
