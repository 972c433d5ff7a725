"""The integration tier's shared preamble: the SGLang environment's interpreter, and the marks
that put a test module in the tier and skip it where that environment was not built."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_ivr.rollout.sglang.server import sglang_python

PYTHON = sglang_python(Path(__file__).resolve().parents[1])
MARKS = [pytest.mark.sglang,
         pytest.mark.skipif(PYTHON is None, reason="no SGLang environment: run tests/harness/sglang_cpu/"
                                                   "setup_env.sh (or set SGLANG_PYTHON)")]
