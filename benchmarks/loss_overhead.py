"""How much the RL loss and advantage code adds to a training step of the tiny model.

Both arms run the same step of a tiny Qwen2.5-VL in the same process, interleaved: a
forward pass over prompts with images and sampled responses, per-token log-probs, a
backward pass and an AdamW step. They differ only in the loss:

- baseline: a plain policy-gradient loss, ``-(A * logp)`` token-mean;
- ours: group advantages (spec 2), VICRA's psi on precomputed scores (spec 3), the clipped
  surrogate with TIS weights and the k3 KL (spec 2) and IVR-R1 policy shaping on the
  rectified rows (spec 4.6), with its detached parts (nothing read back to the host).

The extra forward passes (old, no-image, reference) are not part of "the loss code" and
are excluded from both arms. Headline: ``loss_overhead: ratio=R`` (ours over baseline step time).

Usage: python benchmarks/loss_overhead.py [--steps 20] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ivr.algorithms.advantages import group_advantages  # noqa: E402
from megatron_ivr.algorithms.losses import rl_loss  # noqa: E402
from megatron_ivr.algorithms.vicra import shape_advantages  # noqa: E402
from megatron_ivr.config.schema import AlgorithmConfig, IvrConfig, SyntheticDataConfig, TinyModelConfig  # noqa: E402
from megatron_ivr.data.synthetic.generate import synthetic_corpus  # noqa: E402
from megatron_ivr.models.tiny import make_tiny_model  # noqa: E402
from megatron_ivr.models.tokenizer import train_bpe_tokenizer  # noqa: E402
from megatron_ivr.prompts import chat_prompt  # noqa: E402


def build_batch(processor, batch: int, response_tokens: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    images = [Image.new("RGB", (112, 112), tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g)))
              for _ in range(batch)]
    texts = [chat_prompt(processor, "How many objects are there?", 1) for _ in range(batch)]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    vocab = len(processor.tokenizer)
    responses = torch.randint(20, vocab, (batch, response_tokens), generator=g)
    lengths = torch.randint(response_tokens // 4, response_tokens + 1, (batch,), generator=g)
    mask = (torch.arange(response_tokens)[None] < lengths[:, None]).float()
    ids = torch.cat([inputs["input_ids"], responses], 1)
    model_inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                        image_grid_thw=inputs["image_grid_thw"],
                        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(responses)], 1))
    prompt_length = inputs["input_ids"].shape[1]
    side = dict(rewards=(torch.rand(batch, generator=g) > 0.5).float(), group_ids=torch.arange(batch) // 8,
                old=-torch.rand(batch, response_tokens, generator=g) * 4, w=torch.rand(batch, response_tokens) * 0.3,
                rectified=torch.arange(batch) % 8 == 7)
    side["ref"] = side["old"] + 0.01
    side["rollout"] = side["old"] - 0.02
    return model_inputs, responses, mask, prompt_length, side


def response_logprobs(model, model_inputs, responses, prompt_length):
    logits = model(**model_inputs).logits[:, prompt_length - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, responses[..., None]).squeeze(-1)


def baseline_loss(logp, mask, side):
    adv = side["rewards"] - side["rewards"].mean()
    return -(adv[:, None] * logp * mask).sum() / mask.sum()


def full_loss(logp, mask, side):
    adv = group_advantages(side["rewards"], side["group_ids"])
    adv = shape_advantages(adv, side["w"], mask)
    cfg = AlgorithmConfig(eps_low=0.2, eps_high=0.28, beta=0.01, loss_agg="token-mean", tis_cap=2.0,
                          ivr=IvrConfig(gamma=0.1))
    loss, _ = rl_loss(logp, side["old"], adv, mask, cfg, rectified=side["rectified"], ref_logp=side["ref"],
                      rollout_logp=side["rollout"])
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--response-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from megatron_ivr.models.processor import load_processor
    from megatron_ivr.models.tiny import load_model

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer(synthetic_corpus(SyntheticDataConfig(), count=300), 512)
        path = make_tiny_model("qwen2_5_vl", TinyModelConfig(), tokenizer, Path(tmp) / "m", 3136, 12544)
        model, processor = load_model(path).train(), load_processor(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model_inputs, responses, mask, prompt_length, side = build_batch(processor, args.batch, args.response_tokens, 0)
    times = {"baseline": [], "ours": []}
    loss_only = {"baseline": [], "ours": []}
    arms = {"baseline": baseline_loss, "ours": full_loss}
    for step in range(args.steps + 2):
        for name in (("baseline", "ours") if step % 2 == 0 else ("ours", "baseline")):
            start = time.perf_counter()
            logp = response_logprobs(model, model_inputs, responses, prompt_length)
            loss_start = time.perf_counter()
            loss = arms[name](logp, mask, side)
            loss_end = time.perf_counter()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:  # warm-up steps are not counted
                times[name].append(time.perf_counter() - start)
                loss_only[name].append(loss_end - loss_start)
    base, ours = statistics.median(times["baseline"]), statistics.median(times["ours"])
    print(f"tiny Qwen2.5-VL, batch {args.batch} x {args.response_tokens} response tokens, {args.steps} steps per arm")
    print(f"baseline step {base * 1e3:.1f} ms (loss {statistics.median(loss_only['baseline']) * 1e3:.2f} ms)")
    print(f"ours     step {ours * 1e3:.1f} ms (loss {statistics.median(loss_only['ours']) * 1e3:.2f} ms)")
    added = statistics.median(loss_only["ours"]) - statistics.median(loss_only["baseline"])
    print(f"the loss code adds {added * 1e3:.2f} ms = {100 * added / base:.2f}% of a baseline step (budget: 2%)")
    print(f"loss_overhead: ratio={ours / base:.3f} (step with the full RL loss over step with a plain PG loss)")


if __name__ == "__main__":
    main()
