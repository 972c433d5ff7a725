"""tools/demo_acceptance.py: the demo's acceptance lines computed from ablation summaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import demo_acceptance  # noqa: E402


def _summary(union_macro, union_raw, union_blank, others):
    out = {"eval/test/union/accuracy_macro": union_macro, "eval/test/union/accuracy": union_raw,
           "eval/test/union/majority_share": 0.25, "eval/test_blank/union/accuracy": union_blank,
           "eval/test/union/count": 256, "eval/test/data/bad_samples": 0}  # not a family
    for family, value in others.items():
        out[f"eval/test/{family}/accuracy"] = value
        out[f"eval/test/{family}/accuracy_macro"] = value / 2
    return out


def _write(out: Path, arm: str, seed: int, summary: dict) -> None:
    folder = out / arm / f"seed{seed}" / "eval"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_passing_and_failing_checks(tmp_path, capsys):
    sft = {"count": 1.0, "compare": 0.60}
    for seed, gain in ((0, 0.15), (1, 0.12), (2, 0.07)):
        _write(tmp_path, "sft", seed, _summary(0.23, 0.30, 0.05, sft))
        rl = _summary(0.23 + gain, 0.30 + gain, 0.10, {"count": 1.0, "compare": 0.59})
        _write(tmp_path, "ivr-r1+vicra", seed, rl)
    assert demo_acceptance.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "PASS union: RL - SFT, macro over gold answers, mean +11.3 points" in printed
    assert "14/14 checks pass" in printed
    # seed 2 regresses compare by 6 points (both regression checks), its gain needs no image and
    # its raw accuracy is within 10 points of the majority share
    (tmp_path / "ivr-r1+vicra" / "seed2" / "eval" / "summary.json").write_text(
        json.dumps(_summary(0.30, 0.31, 0.25, {"count": 1.0, "compare": 0.54})))
    assert demo_acceptance.main([str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    failed = [line for line in printed.splitlines() if line.startswith("FAIL")]
    regression = "seed 2: no family below SFT - 5 [compare -6.0, count +0.0; macro over gold answers: compare -3.0"
    assert any(regression in line for line in failed)
    assert any("seed 2: RL with the image 0.310 - blanked 0.250" in line for line in failed)
    assert any("seed 2: RL raw accuracy 0.310 >= majority share 0.250 + 0.10" in line for line in failed)
    assert any("seed 2: the other families together -3.0 points" in line for line in failed) and len(failed) == 4


def test_no_runs_is_an_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="no seed has both"):
        demo_acceptance.checks({}, {}, "union")
