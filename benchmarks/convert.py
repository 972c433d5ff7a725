"""Converter throughput: HF -> Megatron distributed checkpoint -> HF, against a plain
safetensors load + save of the same tensors, in the same run, on the same disk.

Model: a random Qwen2.5-VL with hidden 1024, 8 decoder layers, a 32k vocabulary and a
4-block vision tower (~200M parameters, ~0.8 GB in fp32). Both directions run at TP1 in one
process (the converter's own cost, not parallel speed-up), after one warm-up round of each
arm (imports, process group, page cache). The converter's time includes building the
Megatron model and megatron-core's distributed-checkpoint save and load. The arms rotate
over ``--rounds`` rounds (medians), each after an ``os.sync()`` and right after the previous
arm's output was deleted: on this machine the cost of writing 0.8 GB depends on the page-cache
history (0.15 s into pages just freed, 1.2-1.7 s into pages not used before, measured with
the same ``save_file`` in one process), so a fixed order would hand one arm the fast place.

Usage: python benchmarks/convert.py [--layers 8] [--hidden 1024] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_model(folder: Path, layers: int, hidden: int) -> int:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = hidden // 128
    text = dict(vocab_size=32768, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=4, hidden_size=512, num_heads=8, intermediate_size=1376, out_hidden_size=hidden,
                  fullatt_block_indexes=[3])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=32000, video_token_id=32001,
                              vision_start_token_id=32002, vision_end_token_id=32003)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder, max_shard_size="10GB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file

    from megatron_ivr.model_providers.convert import hf_to_megatron, megatron_to_hf

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        nbytes = make_model(tmp / "source", args.layers, args.hidden)
        mb = nbytes / 1e6
        # warm-up: imports, the process group and the page cache, for both arms; the Megatron
        # checkpoint written here is what every Megatron -> HF arm reads
        load_file(tmp / "source" / "model.safetensors")
        megatron_to_hf(hf_to_megatron(tmp / "source", tmp / "input_megatron"), tmp / "warm_export")
        shutil.rmtree(tmp / "warm_export")

        def plain():
            save_file(load_file(tmp / "source" / "model.safetensors"), str(tmp / "out"))

        def durable():  # the same, written durably: megatron-core's writers fsync every file
            plain()
            with open(tmp / "out", "rb") as handle:
                os.fsync(handle.fileno())

        arms = {"plain": plain, "durable": durable,
                "to_megatron": lambda: hf_to_megatron(tmp / "source", tmp / "out"),
                "to_hf": lambda: megatron_to_hf(tmp / "input_megatron", tmp / "out")}
        names = list(arms)
        times = {name: [] for name in arms}
        for r in range(args.rounds):
            # the arms rotate: each takes each place in the order once per len(arms) rounds, so
            # that the page-cache state a place inherits (a write into pages just freed is up to
            # 10x faster on this machine than one into pages never used) falls on all of them
            for name in names[r % len(names):] + names[:r % len(names)]:
                os.sync()  # no dirty pages of the previous arm still being written back
                start = time.perf_counter()
                arms[name]()
                times[name].append(time.perf_counter() - start)
                out = tmp / "out"
                shutil.rmtree(out) if out.is_dir() else out.unlink()  # every arm starts after the same deletion
    plain_s, durable_s, to_megatron, to_hf = (statistics.median(times[name]) for name in arms)
    ours = to_megatron + to_hf
    print(f"model: {nbytes / 1e9:.2f} GB of fp32 weights ({nbytes // 4 / 1e6:.0f}M parameters); medians of "
          f"{args.rounds} rounds in rotating order, os.sync() before each arm")
    print("seconds per round: " + "; ".join(f"{name} " + " ".join(f"{t:.2f}" for t in times[name]) for name in times))
    print(f"plain safetensors load + save: {plain_s:.2f} s = {mb / plain_s:.0f} MB/s; with an fsync of the written "
          f"file (as megatron-core's checkpoint writers do; the HF export does not): {durable_s:.2f} s = "
          f"{mb / durable_s:.0f} MB/s")
    print(f"hf-to-megatron: {to_megatron:.2f} s = {mb / to_megatron:.0f} MB/s; "
          f"megatron-to-hf: {to_hf:.2f} s = {mb / to_hf:.0f} MB/s")
    print(f"against the fsynced copy: {durable_s / ours:.2f}; per direction (each conversion's MB/s over the plain "
          f"copy's): HF->Megatron {plain_s / to_megatron:.2f}, Megatron->HF {plain_s / to_hf:.2f}")
    print(f"convert: ratio={(mb / ours) / (mb / plain_s):.2f} (HF->Megatron->HF MB/s over plain safetensors "
          "load+save MB/s)")


if __name__ == "__main__":
    main()
