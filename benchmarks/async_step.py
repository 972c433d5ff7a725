"""Seconds per RL step, ``rollout.mode=sync`` beside ``one_step_off`` and ``async``, on the demo's RL
configuration (configs/demo_cpu.yaml: 8 prompts x 8 samples, up to 128 new tokens, GRPO with
IVR-R1 and VICRA, one thread per process), in one run.

In sync mode a step generates (rollouts, then the IVR loop's critiques and rewrites), then
trains; in one_step_off the next step's generation runs on a generator thread while this step
trains (training/schedule.py), so on two cores the two overlap; in async (``max_staleness=1``)
the generator thread runs one batch ahead and the weight push interrupts it instead of waiting
for it (training/async_schedule.py, partial rollouts). The arms alternate for
``--rounds`` rounds (sync, one_step_off, async, sync, ...), each a fresh run of ``--steps`` steps from
the same policy; the first ``--warmup`` steps of each run are not timed (one_step_off's first
step generates synchronously), nor is the last (one_step_off's has no next step to generate,
which would flatter it). Each arm's figure is the median over all its timed steps.

``--model``: the policy RL starts from. The demo's is ``runs/demo/sft/hf`` after ``make demo``
(its responses end and are graded like the demo's); without it a random tiny model is made
(every response runs to the token limit and fails, so the IVR loop critiques them all).

Last line: ``async_step: ratio=R (sync s/step over one_step_off s/step)``; the line before it, the
same for async.

Usage: python benchmarks/async_step.py [--model runs/demo/sft/hf] [--steps 8] [--warmup 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]


def make_assets(root: Path, model: str | None) -> tuple[Path, Path]:
    """The demo's synthetic data (a smaller training set) and the policy."""
    from megatron_ivr.config import load_config
    from megatron_ivr.data.synthetic import generate_dataset
    from megatron_ivr.data.synthetic.generate import synthetic_corpus
    from megatron_ivr.models.tiny import make_tiny_model
    from megatron_ivr.models.tokenizer import train_bpe_tokenizer

    cfg = load_config(str(ROOT / "configs" / "demo_cpu.yaml"), [
        f"synthetic.output_dir={root / 'data'}", "synthetic.num_train=512", "synthetic.num_val=8",
        "synthetic.num_test=8"])
    generate_dataset(cfg.synthetic)
    if model is not None:
        return root / "data", Path(model)
    tokenizer = train_bpe_tokenizer(synthetic_corpus(cfg.synthetic, count=500), 512)
    return root / "data", make_tiny_model("qwen2_5_vl", cfg.tiny_model, tokenizer, root / "model",
                                          cfg.data.min_pixels, cfg.data.max_pixels)


ARMS = {"sync": ["rollout.mode=sync"], "one_step_off": ["rollout.mode=one_step_off"],
        "async": ["rollout.mode=async", "rollout.max_staleness=1"]}


def run(arm: str, data: Path, model: Path, run_dir: Path, steps: int, warmup: int) -> list[dict]:
    from megatron_ivr.config import load_config
    from megatron_ivr.metrics import read_metrics
    from megatron_ivr.training.train import run_rl

    cfg = load_config(str(ROOT / "configs" / "demo_cpu.yaml"), [
        f"model.path={model}", f"data.train_path={data / 'train.jsonl'}", f"trainer.steps={steps}",
        *ARMS[arm], f"checkpoint.dir={run_dir / 'ckpt'}", "checkpoint.resume=false",
        f"logging.dir={run_dir / 'logs'}", "logging.progress=false", "trainer.export_dir=null"])
    cfg.checkpoint.save_interval = 10**9  # no checkpoint inside the timed steps (the last one is not timed)
    run_rl(cfg)
    return [r for r in read_metrics(run_dir / "logs" / "metrics.jsonl") if "step" in r][warmup:-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the policy RL starts from (default: a random tiny model)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    phases: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        data, model = make_assets(Path(tmp), args.model)
        for round_index in range(args.rounds):
            for mode in seconds:
                records = run(mode, data, model, Path(tmp) / f"{mode}{round_index}", args.steps, args.warmup)
                seconds[mode] += [r["time/step"] - r.get("time/checkpoint", 0.0) for r in records]
                phases[mode] += records
                print(f"round {round_index + 1} {mode}: " + " ".join(f"{s:.2f}" for s in seconds[mode][-len(records):])
                      + " s/step", flush=True)
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    for mode, records in phases.items():
        keys = ("time/rollout", "time/ivr", "time/logprob_passes", "time/train", "time/weight_sync",
                "time/wait_for_experience", "time/engine_idle", "rollout/interrupted", "rollout/staleness_mean")
        means = {k.split("/")[1]: sum(r.get(k, 0.0) for r in records) / len(records) for k in keys}
        print(f"phases {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()) + " (seconds; counts)")
    print(f"sync: {medians['sync']:.2f} s/step; one_step_off: {medians['one_step_off']:.2f} s/step; async: "
          f"{medians['async']:.2f} s/step (medians of {len(seconds['sync'])} steps each, {args.rounds} alternating "
          f"rounds, policy: {args.model or 'random tiny model'}; 1 thread per process, {os.cpu_count()} cores)")
    print(f"async arm: ratio={medians['sync'] / medians['async']:.2f} (sync s/step over async s/step)")
    print(f"async_step: ratio={medians['sync'] / medians['one_step_off']:.2f} (sync s/step over one_step_off s/step)")


if __name__ == "__main__":
    main()
