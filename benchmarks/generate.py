"""Seconds per rollout batch: the local engine beside transformers' ``generate``, on the same
tiny Qwen2.5-VL, the same prompts and the same batch as ``benchmarks/step.py`` (8 prompts x
4 samples x 64 new tokens, temperature 1, one thread), in one run.

Both arms return the sampled tokens and their log-probs (the ``RolloutEngine`` contract):
ours through ``LocalEngine.generate`` (one prefill per prompt, one copy of its KV cache for
its samples, shared-prefix decode attention, its own decode loop); the baseline through
``model.generate(do_sample=True, top_k=0, output_logits=True)`` (the full distribution, as
ours samples; transformers' default would cut it to the top 50) on the batch with each sample
in its own row (processor call, prefill per row, transformers' default cache), the way TRL's
``GRPOTrainer`` generates. The arms alternate for ``--rounds`` rounds of ``--calls`` timed
calls (after one warm-up call each); each arm's median is over all its timed calls.

Last line: ``generate: ratio=R (transformers generate s/batch over ours)``.

Usage: python benchmarks/generate.py [--rounds 3] [--calls 5]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import NEW_TOKENS, PROMPTS, SAMPLES, make_assets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from megatron_ivr.data import ImageRules, read_dataset
    from megatron_ivr.models.processor import load_processor
    from megatron_ivr.models.tiny import load_model
    from megatron_ivr.prompts import chat_prompt, render_prompt
    from megatron_ivr.rollout import GenerationRequest, SamplingParams
    from megatron_ivr.rollout.local import LocalEngine

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        data, model_dir = make_assets(Path(tmp))
        samples = read_dataset(data / "train.jsonl", ImageRules(28, 3136, 12544)).samples
        engine = LocalEngine(load_model(model_dir), load_processor(model_dir), batch_size=PROMPTS * SAMPLES)
        baseline_model, processor = load_model(model_dir).eval(), load_processor(model_dir)
        processor.tokenizer.padding_side = "left"
        sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, n=SAMPLES)

        def batch(call: int) -> list[GenerationRequest]:
            chosen = [samples[(call * PROMPTS + i) % len(samples)] for i in range(PROMPTS)]
            return [GenerationRequest(render_prompt("response", "ivr", question=s.question), s.images, s.id)
                    for s in chosen]

        def ours(requests) -> int:
            return sum(len(c.token_ids) for group in engine.generate(requests, sampling) for c in group)

        @torch.inference_mode()
        def transformers_generate(requests) -> int:
            rows = [r for r in requests for _ in range(SAMPLES)]
            inputs = processor(text=[chat_prompt(processor, r.text, len(r.images)) for r in rows],
                               images=[image for r in rows for image in r.images], return_tensors="pt",
                               padding=True)
            out = baseline_model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0,  # no top-k, as ours
                                          max_new_tokens=NEW_TOKENS,
                                          output_logits=True, return_dict_in_generate=True,
                                          pad_token_id=processor.tokenizer.pad_token_id,
                                          eos_token_id=processor.tokenizer.eos_token_id)
            tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
            torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, tokens[..., None])
            return int((tokens != processor.tokenizer.pad_token_id).sum())

        arms = {"ours": ours, "transformers": transformers_generate}
        times = {name: [] for name in arms}
        tokens = {name: [] for name in arms}
        for arm in arms.values():  # warm-up
            arm(batch(0))
        for r in range(args.rounds):
            for name, arm in arms.items():
                for call in range(args.calls):
                    torch.manual_seed(call)
                    start = time.perf_counter()
                    tokens[name].append(arm(batch(1 + r * args.calls + call)))
                    times[name].append(time.perf_counter() - start)
    ours_s, baseline_s = statistics.median(times["ours"]), statistics.median(times["transformers"])
    print(f"ours: {ours_s:.3f} s/batch; transformers generate: {baseline_s:.3f} s/batch (medians of "
          f"{args.rounds} alternating rounds x {args.calls} calls, {PROMPTS} prompts x {SAMPLES} samples x up to "
          f"{NEW_TOKENS} new tokens, 1 thread); generated tokens per batch: ours "
          f"{statistics.mean(tokens['ours']):.0f}, transformers {statistics.mean(tokens['transformers']):.0f}")
    print(f"generate: ratio={baseline_s / ours_s:.2f} (transformers generate s/batch over ours)")


if __name__ == "__main__":
    main()
