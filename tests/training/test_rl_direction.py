"""The RL step moves the policy the right way: a response with a positive advantage becomes
more likely, one with a negative advantage less likely (the clipped surrogate, VICRA on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.runs import clean_env

WORKER = Path(__file__).with_name("direction_worker.py")


def test_positive_advantage_raises_and_negative_lowers_the_logprob(tiny_models, synthetic_dir):
    result = subprocess.run([sys.executable, str(WORKER), str(tiny_models["qwen2_5_vl"]), str(synthetic_dir)],
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    up, down = out["delta"]
    assert up > 0.01 and down < -0.01
    # the step's diagnostics (sums reduced over ranks) equal the spec's pure functions
    for key, value in out["expected"].items():
        assert out["reduced"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # VICRA's no-image pass skips the zero-advantage response: the shaped advantages are those
    # of a pass over every response (w of the skipped response is 0, psi = 1, times A = 0)
    skip, every = out["skipping"]["skip"], out["skipping"]["all"]
    assert (skip["no_image_responses"], every["no_image_responses"]) == (2, 3)
    assert torch.allclose(torch.tensor(skip["advantages"]), torch.tensor(every["advantages"]), atol=1e-6)
    assert torch.tensor(skip["advantages"][2]).abs().max() == 0
    assert torch.allclose(torch.tensor(skip["w"][:2]), torch.tensor(every["w"][:2]), atol=1e-6)
    assert torch.tensor(skip["w"][2]).abs().max() == 0 < torch.tensor(every["w"][2]).abs().max()
