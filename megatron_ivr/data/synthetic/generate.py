"""Write the synthetic visual-reasoning dataset: images, splits, SFT traces, re-reasoning examples.

Output layout (``output_dir``)::

    images/{split}_{index:05d}.png
    train.jsonl  val.jsonl  test.jsonl        id, images, question, answer, family, split, scene
    rl.jsonl                                  the answer-only RL prompt pool (``num_rl`` > 0)
    sft.jsonl                                 + messages (user prompt, reference response)
    rereasoning.jsonl                         critique and rectification examples (IVR-R1)
    rereasoning_sft.jsonl                     the same as chat rows (critique, rectification) for SFT
    manifest.json                             the generating config and per-split family counts

Deterministic by ``seed``: every sample draws from its own ``random.Random`` seeded from
(seed, split, index). ``held_out_family`` is never put in the train split: no trace of it is
ever written. The ``rl`` split draws its own scenes (the stream of another split name, so none is
a training scene's draw) and carries questions and answers only.
"""

from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from megatron_ivr.config.schema import SyntheticDataConfig
from megatron_ivr.data.jsonl import write_jsonl
from megatron_ivr.data.synthetic.questions import BALANCED_ANSWERS, Question, make_question
from megatron_ivr.data.synthetic.responses import corrupt, write_response
from megatron_ivr.data.synthetic.scene import random_scene, render_scene, scene_to_json
from megatron_ivr.prompts import render_prompt

SPLITS = ("train", "val", "test", "rl")


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{split}:{index}".encode()))


def families_for(split: str, cfg: SyntheticDataConfig) -> tuple[str, ...]:
    """The families a split draws from (before :func:`family_at` orders them)."""
    if split == "rl":
        return tuple(cfg.rl_families)
    if split == "train" and cfg.held_out_family:
        return tuple(f for f in cfg.families if f != cfg.held_out_family)
    return tuple(cfg.families)


def family_at(split: str, index: int, size: int, cfg: SyntheticDataConfig) -> str:
    """The family of question ``index`` of a split of ``size`` questions. train and rl cycle
    through their families. In val and test the held-out family alternates with the others until
    it has its share, ``size // len(families)`` (then the others cycle on): every family gets an
    equal share, and the first ``2 * share`` questions hold every held-out question with the
    others in equal parts, so ``eval.max_samples`` can take a prefix that is half held-out."""
    families = families_for(split, cfg)
    held_out = cfg.held_out_family
    if split in ("train", "rl") or not held_out or len(families) == 1:
        return families[index % len(families)]
    others = [f for f in families if f != held_out]
    share = size // len(families)
    if index < 2 * share:
        return held_out if index % 2 == 0 else others[(index // 2) % len(others)]
    return others[(index - share) % len(others)]


def synthetic_corpus(cfg: SyntheticDataConfig, count: int = 2000, template: str = "ivr") -> Iterator[str]:
    """Texts of the task (prompts, responses, critiques) without rendering images: the
    corpus a tiny model's tokenizer is trained on. Covers every family and both templates."""
    for index in range(count):
        rng = _rng(cfg.seed, "corpus", index)
        scene = random_scene(rng, cfg.min_objects, cfg.max_objects, tuple(cfg.attributes), cfg.num_colors,
                             cfg.grid)
        question = make_question(cfg.families[index % len(cfg.families)], scene, rng)
        response = write_response(scene, question, template, cfg.description)
        yield render_prompt("response", template, question=question.text) + "\n" + response
        yield write_response(scene, question, "r1" if template == "ivr" else "ivr", cfg.description)
        wrong = corrupt(scene, question, rng)
        if wrong is not None:
            failed = write_response(wrong.objects, question, template, cfg.description)
            yield render_prompt("rectify", template, question=question.text, response=failed,
                                critique=wrong.critique)
            yield render_prompt("localize", template, question=question.text, response=failed)


def draw_question(rng: random.Random, family: str, cfg: SyntheticDataConfig) -> tuple[list, Question]:
    """A scene and a question of ``family`` on it. A family with balanced answers
    (``BALANCED_ANSWERS``) first draws its gold answer uniformly, then scenes and questions
    until one has it, so that a constant answer or the answer prior scores 1 / len(answers)."""
    answers = BALANCED_ANSWERS.get(family)
    target = rng.choice(answers) if answers else None
    for _ in range(10_000):
        scene = random_scene(rng, cfg.min_objects, cfg.max_objects, tuple(cfg.attributes), cfg.num_colors, cfg.grid)
        question = make_question(family, scene, rng)
        if target is None or question.answer == target:
            return scene, question
    raise ValueError(f"synthetic: no {family} question with answer {target} in 10,000 scenes of "
                     f"{cfg.min_objects}-{cfg.max_objects} objects; raise synthetic.max_objects")


def generate_dataset(cfg: SyntheticDataConfig, template: str = "ivr",
                     progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Generate all splits; return the manifest (also written to ``manifest.json``)."""
    cfg.validate()
    out = Path(cfg.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sizes = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test, "rl": cfg.num_rl}
    manifest = {"config": asdict(cfg), "template": template, "families": {}}
    sft_rows, rereasoning_rows, rereasoning_sft_rows = [], [], []
    for split in SPLITS:
        if split == "rl" and not cfg.num_rl:
            continue
        rows = []
        for index in range(sizes[split]):
            family = family_at(split, index, sizes[split], cfg)
            rng = _rng(cfg.seed, split, index)
            scene, question = draw_question(rng, family, cfg)
            image_name = f"images/{split}_{index:05d}.png"
            render_scene(scene, cfg.image_size, cfg.grid).save(out / image_name)
            sample_id = f"{split}-{index:05d}"
            rows.append({"id": sample_id, "images": [image_name], "question": question.text,
                         "answer": question.answer, "family": family, "split": split, "choices": question.choices,
                         # answer-only RL prompts: the question, the image and the gold answer
                         **({} if split == "rl" else {"scene": scene_to_json(scene)})})
            if split == "train":
                prompt = render_prompt("response", template, question=question.text)
                reference = write_response(scene, question, template, cfg.description)
                sft_rows.append({"id": sample_id, "images": [image_name], "question": question.text,
                                 "answer": question.answer, "family": family, "reasoning": reference,
                                 "messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": reference}]})
                wrong = corrupt(scene, question, rng)
                if wrong is not None:
                    failed = write_response(wrong.objects, question, template, cfg.description)
                    rereasoning_rows.append({
                        "id": sample_id, "images": [image_name], "question": question.text,
                        "answer": question.answer, "failed_response": failed,
                        "critique_prompt": render_prompt("localize", template, question=question.text,
                                                         response=failed),
                        "critique": wrong.critique,
                        "rectify_prompt": render_prompt("rectify", template, question=question.text,
                                                        response=failed, critique=wrong.critique),
                        "rectified_response": reference})
                    row = rereasoning_rows[-1]
                    for kind, prompt_key, reply_key in (("critique", "critique_prompt", "critique"),
                                                        ("rectify", "rectify_prompt", "rectified_response")):
                        rereasoning_sft_rows.append({
                            "id": f"{sample_id}/{kind}", "images": [image_name], "question": question.text,
                            "answer": question.answer, "family": family,
                            "messages": [{"role": "user", "content": row[prompt_key]},
                                         {"role": "assistant", "content": row[reply_key]}]})
            if progress is not None:
                progress(split, index + 1, sizes[split])
        write_jsonl(out / f"{split}.jsonl", rows)
        manifest["families"][split] = dict(Counter(r["family"] for r in rows))
    write_jsonl(out / "sft.jsonl", sft_rows)
    write_jsonl(out / "rereasoning.jsonl", rereasoning_rows)
    write_jsonl(out / "rereasoning_sft.jsonl", rereasoning_sft_rows)
    manifest["rereasoning_examples"] = len(rereasoning_rows)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
