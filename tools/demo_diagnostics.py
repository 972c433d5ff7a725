"""Diagnostics of a policy on the synthetic task (docs/results.md, "Where the tiny model's RL
stalls"). Three questions, one subcommand each:

    python tools/demo_diagnostics.py vision-probe MODEL DATA_DIR
        Can each board cell's colour and shape be read linearly from the vision tower's
        merged tokens (one per 28-pixel cell)? A logistic probe per attribute, trained on 80%
        of the cells of 1,200 training scenes, accuracy on the other 20%.
    python tools/demo_diagnostics.py pass-at-k MODEL SPLIT_JSONL [K]
        Sampled accuracy (mean@K) and pass@K at temperature 1, per family, on up to 128
        questions of a split: how far sampling reaches beyond a greedy answer.
    python tools/demo_diagnostics.py consistency EVAL_SAMPLES_JSONL SPLIT_JSONL
        Does the answer follow the policy's own description? Per family: how often the
        answer implied by the response's <desc> counts is right, how often the final answer
        is right, and how often the two agree. EVAL_SAMPLES_JSONL is what `megatron-ivr
        eval` writes (eval_<split>_samples.jsonl).

One thread, CPU; MODEL is an HF folder (e.g. runs/demo/sft/hf).
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ivr.data.synthetic.questions import FAMILIES  # noqa: E402
from megatron_ivr.data.synthetic.scene import COLORS, SHAPES  # noqa: E402

GRID = 3  # the demo's board; the probe assumes one merged vision token per cell


def vision_probe(model_dir: str, data_dir: str, scenes: int = 1200) -> dict:
    from PIL import Image

    from megatron_ivr.models.processor import load_processor
    from megatron_ivr.models.tiny import load_model

    model, processor = load_model(model_dir).eval(), load_processor(model_dir)
    rows = [json.loads(line) for line in open(Path(data_dir) / "train.jsonl", encoding="utf-8")][:scenes]
    features, labels = [], {"color": [], "shape": []}
    for begin in range(0, len(rows), 50):
        batch = rows[begin:begin + 50]
        images = [Image.open(Path(data_dir) / row["images"][0]).convert("RGB") for row in batch]
        inputs = processor.image_processor(images=images, return_tensors="pt")
        with torch.no_grad():
            out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        tokens = getattr(out, "pooler_output", out).reshape(len(batch), GRID * GRID, -1)
        for row, cells in zip(batch, tokens):
            color, shape = torch.zeros(GRID * GRID, dtype=torch.long), torch.zeros(GRID * GRID, dtype=torch.long)
            for obj in row["scene"]:  # 0: empty cell
                cell = obj["row"] * GRID + obj["col"]
                color[cell] = 1 + list(COLORS).index(obj["color"])
                shape[cell] = 1 + list(SHAPES).index(obj["shape"])
            features.append(cells)
            labels["color"].append(color)
            labels["shape"].append(shape)
    x = torch.cat(features)
    split = int(0.8 * len(x))
    x = (x - x[:split].mean(0)) / (x[:split].std(0) + 1e-6)
    result = {}
    for name, values in labels.items():
        y = torch.cat(values)
        probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
        optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
        for _ in range(500):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe(x[:split]), y[:split]).backward()
            optimizer.step()
        with torch.no_grad():
            result[f"{name}_probe_accuracy"] = (probe(x[split:]).argmax(-1) == y[split:]).float().mean().item()
    result["empty_cell_share"] = (torch.cat(labels["color"])[split:] == 0).float().mean().item()
    return result


def pass_at_k(model_dir: str, split_file: str, k: int = 8, limit: int = 128) -> dict:
    from megatron_ivr.config import load_config
    from megatron_ivr.data import ImageRules, read_dataset
    from megatron_ivr.evaluation import grading_tolerance
    from megatron_ivr.prompts import render_prompt
    from megatron_ivr.rewards import RewardFunction
    from megatron_ivr.rollout import GenerationRequest, SamplingParams
    from megatron_ivr.rollout.local import LocalEngine

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml")
    dataset = read_dataset(split_file, ImageRules(28, cfg.data.min_pixels, cfg.data.max_pixels), 0.5, None, limit=limit)
    engine = LocalEngine.from_pretrained(model_dir, batch_size=16)
    torch.manual_seed(0)
    per_family = collections.defaultdict(lambda: [0, 0.0, 0.0])  # questions, mean@k sum, pass@k sum
    with RewardFunction(cfg.reward) as reward_fn:
        for begin in range(0, len(dataset.samples), 8):
            batch = dataset.samples[begin:begin + 8]
            requests = [GenerationRequest(render_prompt("response", cfg.reward.template, question=s.question),
                                          s.images, s.id) for s in batch]
            groups = engine.generate(requests, SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens,
                                                              temperature=1.0, n=k))
            for sample, group in zip(batch, groups):
                rewards = reward_fn([c.text for c in group], [sample.answer] * k, [grading_tolerance(sample)] * k)
                right = [r.accuracy for r in rewards]
                stats = per_family[sample.family]
                stats[0] += 1
                stats[1] += sum(right) / k
                stats[2] += max(right)
    return _family_table(per_family, ("mean@k", "pass@k"))


def _predicate(phrase: str) -> dict:
    out = {}
    for word in phrase.split():
        if word in COLORS:
            out["color"] = word
        elif word.rstrip("s") in SHAPES:
            out["shape"] = word.rstrip("s")
    return out


def _count(objects, predicate) -> int:
    return sum(n for n, color, shape in objects
               if all({"color": color, "shape": shape}[key] == value for key, value in predicate.items()))


def implied_answer(question: str, objects: list[tuple[int, str, str]]) -> str | None:
    """The answer that a list of (count, colour, shape) implies for a synthetic question."""
    if question.startswith("How many objects"):
        return str(sum(n for n, _, _ in objects))
    if match := re.match(r"How many (.*) are there", question):
        return str(_count(objects, _predicate(match.group(1))))
    if match := re.match(r"Subtract all (.*)\. Subtract all (.*)\. How many", question):
        first, second = _predicate(match.group(1)), _predicate(match.group(2))
        removed = [o for o in objects if _count([o], first) or _count([o], second)]
        return str(sum(n for n, _, _ in objects) - sum(n for n, _, _ in removed))
    if match := re.match(r"Are there more (.*) or more (.*) in the image", question):
        a, b = _count(objects, _predicate(match.group(1))), _count(objects, _predicate(match.group(2)))
        return "A" if a > b else "B" if b > a else "C"
    if match := re.match(r"What is the number of (.*) (plus|times) the number of (.*)\?", question):
        a, b = _count(objects, _predicate(match.group(1))), _count(objects, _predicate(match.group(3)))
        return str(a + b if match.group(2) == "plus" else a * b)
    return None


def consistency(samples_file: str, split_file: str) -> dict:
    questions = {}
    for line in open(split_file, encoding="utf-8"):
        row = json.loads(line)
        questions[row["id"]] = row
    per_family = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # n, desc right, final right, agree
    shapes = "|".join(SHAPES)
    for line in open(samples_file, encoding="utf-8"):
        record = json.loads(line)
        sample = questions[record["id"]]
        desc = re.search(r"<desc>(.*?)</desc>", record["response"], re.S)
        objects = [(int(n), color, shape) for n, color, shape in
                   re.findall(rf"(\d+) (\w+) ({shapes})", desc.group(1))] if desc else []
        implied = implied_answer(sample["question"], objects)
        boxed = re.findall(r"\\boxed\{(.*?)\}", record["response"])
        final = boxed[-1] if boxed else None
        stats = per_family[sample["family"]]
        stats[0] += 1
        stats[1] += implied == sample["answer"]
        stats[2] += final == sample["answer"]
        stats[3] += final == implied
    return _family_table(per_family, ("description_implies_right", "final_right", "final_agrees_with_description"))


def _family_table(per_family: dict, names: tuple[str, ...]) -> dict:
    table = {}
    for family in [f for f in FAMILIES if f in per_family] + ["all"]:
        rows = list(per_family.values()) if family == "all" else [per_family[family]]
        n = sum(r[0] for r in rows)
        table[family] = {"n": n, **{name: sum(r[i + 1] for r in rows) / max(n, 1) for i, name in enumerate(names)}}
    return table


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    commands = {"vision-probe": vision_probe, "pass-at-k": pass_at_k, "consistency": consistency}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    args = [int(a) if a.isdigit() else a for a in argv[1:]]
    print(json.dumps(commands[argv[0]](*args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
