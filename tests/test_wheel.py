"""What users install: the wheel, built from this checkout and installed (not editable) into a
fresh virtual environment, runs the whole CPU path from a folder outside the repository:
``data synth`` -> ``model tiny`` -> ``sft`` (one step) -> ``train`` (one RL step).

The fresh environment borrows the already installed dependencies (torch, megatron-core, ...)
through a ``.pth`` line pointing at this interpreter's site-packages, which is not a site
directory there: the editable install's finder in it is never activated, so every module of
ours comes from the wheel. The test asserts that too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "megatron_ivr", "model_providers", "launch")


def _run(command: list, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result


def test_wheel_installs_and_trains_outside_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    # the files the Dockerfile copies, copied here: the build writes build/ and *.egg-info beside
    # its sources, and a stale build/lib in the checkout could carry a deleted module into the wheel
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    dist = tmp_path / "dist"
    # the build backend of this environment when it has one (fast, offline); else pip's isolated build
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", dist, source], cwd=tmp_path,
         env=env)
    (wheel,) = dist.glob("megatron_ivr-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/")[0] for name in names}
    dist_info = {top for top in tops if top.endswith(".dist-info")}
    assert tops - dist_info == {"megatron_ivr"} and len(dist_info) == 1, tops  # nothing generic at the top
    # every module of the source trees the CLI can reach is in the wheel, and nothing else
    trees = (("megatron_ivr", "megatron_ivr"), ("model_providers", "megatron_ivr/model_providers"),
             ("launch", "megatron_ivr/launch"))
    expected = {f"{installed}/{module.relative_to(REPO / tree).as_posix()}" for tree, installed in trees
                for module in (REPO / tree).rglob("*.py") if "__pycache__" not in module.parts}
    assert expected == {name for name in names if name.endswith(".py")}

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     env).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path, env=env)
    where = _run([python, "-c", "import megatron_ivr.training.train as t, megatron_ivr.model_providers.convert as c, "
                                "megatron_ivr.launch.launcher as l; print(t.__file__, c.__file__, l.__file__)"],
                 tmp_path, env).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where

    work = tmp_path / "user"  # a user's folder, far from the checkout
    work.mkdir()
    config = {
        "name": "wheel",
        "synthetic": {"output_dir": "data", "num_train": 24, "num_val": 4, "num_test": 4},
        "data": {"train_path": "data/train.jsonl", "val_path": "data/val.jsonl", "test_path": "data/test.jsonl",
                 "min_pixels": 3136, "max_pixels": 12544},
        "tiny_model": {"output_dir": "models", "families": ["qwen2_5_vl"], "hidden_size": 32, "num_layers": 2,
                       "num_heads": 2, "num_kv_heads": 1, "vision_hidden_size": 32, "vision_depth": 1},
        "sft": {"init_path": "models/qwen2_5_vl_tiny", "data_paths": ["data/sft.jsonl"], "output_dir": "sft",
                "steps": 1, "batch_size": 4, "lr_warmup_steps": 0},
        "model": {"path": "sft/hf"},
        "rollout": {"n": 2, "max_new_tokens": 8},
        "trainer": {"device": "cpu", "steps": 1, "prompts_per_step": 2, "export_dir": "rl/hf"},
        "checkpoint": {"dir": "rl/checkpoints", "save_interval": 0},
        "logging": {"dir": "rl/logs", "progress": False},
    }
    (work / "run.yaml").write_text(yaml.safe_dump(config))
    cli = venv / "bin" / "megatron-ivr"
    for command in (["data", "synth", "-c", "run.yaml"], ["model", "tiny", "-c", "run.yaml"], ["sft", "run.yaml"],
                    ["train", "run.yaml"]):
        _run([cli, *command], cwd=work, env=env)
    assert (work / "sft" / "hf" / "model.safetensors").is_file()
    assert (work / "rl" / "hf" / "model.safetensors").is_file()
    assert (work / "rl" / "logs" / "metrics.jsonl").read_text().strip()
