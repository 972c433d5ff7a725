"""Greedy evaluation end to end on the tiny model: metrics consistent with the per-sample file."""

from __future__ import annotations

import json

import pytest

from megatron_ivr.config import load_config
from megatron_ivr.evaluation import evaluate, summarize
from megatron_ivr.metrics import read_metrics


def test_summarize_by_family():
    records = [{"family": "count", "answer": "2", "reward": 1.0, "accuracy": 1.0, "format": 1.0},
               {"family": "count", "answer": "3", "reward": 0.0, "accuracy": 0.0, "format": 0.0},
               {"family": "compare", "answer": "C", "reward": 0.9, "accuracy": 1.0, "format": 0.0}]
    summary = summarize(records, "eval/test", prior={"count": {"2": 0.25, "3": 0.75}})
    assert summary["eval/test/accuracy"] == pytest.approx(2 / 3)
    assert summary["eval/test/count/accuracy"] == 0.5 and summary["eval/test/compare/count"] == 1
    assert summary["eval/test/count/blind_accuracy"] == 0.5 and summary["eval/test/compare/blind_accuracy"] == 0.0
    assert summary["eval/test/majority_share"] == pytest.approx(1 / 3)


def test_the_blind_guesser_knows_every_training_answer(tmp_path):
    """The prior pools RL's prompts and SFT's rows: the demo's RL pool has no count questions,
    its SFT traces do; a missing file is skipped, a benchmark has none."""
    from megatron_ivr.evaluation import training_prior

    rl, sft = tmp_path / "rl.jsonl", tmp_path / "sft.jsonl"
    rl.write_text(json.dumps({"question": "q", "answer": "3", "family": "union"}) + "\n")
    sft.write_text("".join(json.dumps({"question": "q", "answer": a, "family": "count"}) + "\n" for a in "1124"))
    cfg = load_config(None, [f"data.train_path={rl}", f"sft.data_paths=[{sft},{tmp_path / 'absent.jsonl'}]"])
    assert training_prior(cfg) == {"union": {"3": 1.0}, "count": {"1": 0.5, "2": 0.25, "4": 0.25}}
    assert training_prior(load_config(None, [f"data.train_path={rl}", f"sft.data_paths=[{rl}]"])) == {
        "union": {"3": 1.0}}  # a file named twice counts once
    cfg = load_config(None, [f"data.train_path={rl}", f"eval.benchmarks.mmstar={tmp_path}"])
    assert training_prior(cfg) is None


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
def test_evaluate_tiny_model(model_dirs, synthetic_dir, tmp_path, family):
    path = model_dirs(family)
    cfg = load_config("configs/demo_cpu.yaml", [
        f"model.path={path}", f"model.family={family}",
        f"data.test_path={synthetic_dir / 'test.jsonl'}", f"logging.dir={tmp_path}",
        "eval.max_samples=8", "eval.batch_size=4", "eval.max_new_tokens=8", "eval.blank_images=false",
    ])
    lines = []
    summary = evaluate(cfg, progress=lines.append)
    records = [json.loads(x) for x in (tmp_path / "eval_test_samples.jsonl").read_text().splitlines()]
    assert len(records) == 8 and len(lines) == 2
    assert summary["eval/test/count"] == 8
    assert summary["eval/test/reward"] == pytest.approx(sum(r["reward"] for r in records) / 8)
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["eval/test/count"] == 8


def test_the_panel_the_baselines_and_the_blanked_control(tiny_models, synthetic_dir, tmp_path):
    """eval.samples=2 and eval.blank_images: the sampled panel per record and per family, the blind
    guesser from the training answers (checked by hand here), and every suite again on empty
    images."""
    from collections import Counter

    cfg = load_config("configs/demo_cpu.yaml", [
        f"model.path={tiny_models['qwen2_5_vl']}", f"data.train_path={synthetic_dir / 'train.jsonl'}",
        f"sft.data_paths=[{synthetic_dir / 'sft.jsonl'}]",  # the same rows: the same answer distribution
        f"data.test_path={synthetic_dir / 'test.jsonl'}", f"logging.dir={tmp_path}", "eval.max_samples=6",
        "eval.batch_size=6", "eval.max_new_tokens=6", "eval.samples=2", "eval.blank_images=true"])
    summary = evaluate(cfg, progress=lambda line: None)
    records = [json.loads(x) for x in (tmp_path / "eval_test_samples.jsonl").read_text().splitlines()]
    assert all(len(r["samples"]) == 2 for r in records)
    train = [json.loads(x) for x in (synthetic_dir / "train.jsonl").read_text().splitlines()]
    counts = {f: Counter(r["answer"] for r in train if r["family"] == f) for f in {r["family"] for r in train}}
    blind = sum(counts[r["family"]][r["answer"]] / sum(counts[r["family"]].values()) if r["family"] in counts else 0.0
                for r in records) / len(records)  # a held-out family: no training answers, never guessed
    assert summary["eval/test/blind_accuracy"] == pytest.approx(blind)
    majority = Counter(r["answer"] for r in records).most_common(1)[0][1] / len(records)
    assert summary["eval/test/majority_share"] == pytest.approx(majority)
    for key in ("mean@2", "maj@2", "pass@2", "blind_pass@2", "accuracy_macro"):
        assert 0.0 <= summary[f"eval/test/{key}"] <= 1.0
    assert summary["eval/test/pass@2"] >= summary["eval/test/mean@2"]
    assert summary["eval/test_blank/count"] == 6 and "eval/test_blank/mean@2" in summary
    blanked = [json.loads(x) for x in (tmp_path / "eval_test_blank_samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in blanked] == [r["id"] for r in records]
    table = (tmp_path / "eval_summary.md").read_text()
    header = ("| subset | n | accuracy | macro over gold | majority share | blind | format | mean@2 | maj@2 | pass@2 "
              "| blind pass@2 |")
    assert header in table and "## test_blank" in table and "2 responses per question at temperature 1.0" in table


def _benchmark_files(tmp_path):
    """A MathVista Parquet file and an MMStar TSV (with one broken row each)."""
    import base64

    from tests.data.test_benchmarks import png, write_parquet

    meta = {"task": "figure question answering"}
    vista = write_parquet(tmp_path / "mathvista" / "testmini.parquet", [
        {"pid": str(i), "question": f"How many bars? ({i})", "choices": None, "answer": str(i),
         "question_type": "free_form", "answer_type": "integer", "precision": None, "metadata": meta,
         "image": f"images/{i}.jpg", "decoded_image": {"bytes": png((40 * i, 90, 20)) if i else b"x", "path": None}}
        for i in range(4)])
    b64 = base64.b64encode(png()).decode()
    tsv = tmp_path / "mmstar" / "MMStar.tsv"
    tsv.parent.mkdir()
    tsv.write_text("index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                   + "".join(f"{i}\tWhich colour? {i}\tred\tblue\tgreen\tgrey\tA\tcoarse perception\t{b64}\n"
                             for i in range(3)))
    return vista, tsv


def test_eval_of_a_megatron_checkpoint_matches_its_hf_source(tiny_models, tmp_path):
    """Several benchmarks in one call; a Megatron checkpoint (a trainer-style step folder with
    dist/, saved at TP2) gives exactly the greedy outputs of the HF folder it came from."""
    from megatron_ivr.model_providers.convert import hf_to_megatron

    vista, tsv = _benchmark_files(tmp_path)
    hf = tiny_models["qwen2_5_vl"]
    megatron = hf_to_megatron(hf, tmp_path / "step_00000007" / "dist", tp=2)
    responses = {}
    for name, path in (("hf", hf), ("megatron", megatron.parent)):
        cfg = load_config("configs/demo_cpu.yaml", [
            f"model.path={path}", f"logging.dir={tmp_path / name}", f"eval.benchmarks.mathvista={vista}",
            f"eval.benchmarks.mmstar={tsv}", "eval.max_samples=null", "eval.batch_size=4", "eval.max_new_tokens=12",
            "data.max_bad_fraction=0.5"])
        summary = evaluate(cfg, progress=lambda line: None)
        assert summary["eval/mathvista/count"] == 3 and summary["eval/mathvista/data/bad_samples"] == 1
        assert summary["eval/mmstar/count"] == 3
        assert summary["eval/mathvista/figure question answering/count"] == 3
        responses[name] = {bench: [json.loads(x)["response"] for x in
                                   (tmp_path / name / f"eval_{bench}_samples.jsonl").read_text().splitlines()]
                           for bench in ("mathvista", "mmstar")}
        table = (tmp_path / name / "eval_summary.md").read_text()
        assert "## mathvista" in table and "| figure question answering | 3 |" in table
        assert "1 unreadable row(s) skipped" in table
    assert (tmp_path / "megatron" / "policy_hf" / "config.json").exists()  # converted on the fly
    assert responses["megatron"] == responses["hf"]
    assert any(r for r in responses["hf"]["mathvista"])  # the model generated text


def test_precision_sets_the_grading_tolerance():
    from megatron_ivr.data.sample import Sample
    from megatron_ivr.evaluation import grading_tolerance
    from megatron_ivr.rewards.accuracy import grade_answer

    sample = Sample(id="1", images=[], question="q", answer="1.45", meta={"precision": 2})
    assert grade_answer("1.454", "1.45", grading_tolerance(sample)) == 1.0
    assert grade_answer("1.456", "1.45", grading_tolerance(sample)) == 0.0
    assert grading_tolerance(Sample(id="2", images=[], question="q", answer="7")) == 1e-4


def test_unknown_benchmark_is_a_config_error():
    from megatron_ivr.config import ConfigError

    with pytest.raises(ConfigError, match="eval.benchmarks"):
        load_config(None, ["eval.benchmarks.mathvistaa=/x"])
