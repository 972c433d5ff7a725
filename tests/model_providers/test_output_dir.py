"""Nothing is deleted that the command did not create (model_providers/output_dir.py): the
refusals, each before anything is touched, and the replacement of an earlier output."""

from __future__ import annotations

import json
import os

import pytest

from megatron_ivr.cli import main
from megatron_ivr.model_providers import output_dir
from megatron_ivr.model_providers.convert import hf_to_megatron, megatron_to_hf
from megatron_ivr.model_providers.hf_checkpoint import write_hf_folder
from megatron_ivr.model_providers.output_dir import MARKER, OutputRefused, check_output, publish, staging_dir


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("a user's notes")
    return path


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_megatron_ivr_did_not_write_is_never_replaced(tmp_path, overwrite):
    user = _user_folder(tmp_path / "mine")
    with pytest.raises(OutputRefused, match="was not written by megatron-ivr"):
        check_output(user, "hf", overwrite=overwrite)
    staged = staging_dir(user)
    (staged / "model.safetensors").write_bytes(b"new")
    with pytest.raises(OutputRefused, match="finished output is kept in"):
        publish(staged, user, "hf", overwrite=True)
    assert (user / "notes.txt").read_text() == "a user's notes" and staged.is_dir()


def test_sources_and_protected_folders(tmp_path):
    src = _user_folder(tmp_path / "src")
    for out in (src, src / "inner", tmp_path):
        with pytest.raises(OutputRefused, match="source"):
            check_output(out, "hf", sources=[src], overwrite=True)
    with pytest.raises(OutputRefused, match="which this run writes too"):
        check_output(tmp_path / "run", "hf", protected=[tmp_path / "run" / "checkpoints"])
    assert check_output(tmp_path / "fresh", "hf") == (tmp_path / "fresh").resolve()
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", "hf") == (tmp_path / "empty").resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="not a folder"):
        check_output(tmp_path / "file", "hf")


def test_earlier_output_needs_overwrite_and_the_same_kind(tmp_path):
    out = tmp_path / "out"
    write_hf_folder([], out, None, overwrite=False)
    assert json.loads((out / MARKER).read_text())["kind"] == "hf"
    with pytest.raises(OutputRefused, match="--overwrite"):
        check_output(out, "hf")
    with pytest.raises(OutputRefused, match="holds a hf output, not a megatron one"):
        check_output(out, "megatron", overwrite=True)
    (out / "extra_from_before").write_text("old")
    write_hf_folder([], out, None, overwrite=True)
    assert not (out / "extra_from_before").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or aside folder left


def test_replacement_without_the_atomic_exchange_goes_through_an_aside_name(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_hf_folder([], out, None)
    monkeypatch.setattr(output_dir, "_exchange", lambda a, b: False)
    renames = []
    real = os.replace
    monkeypatch.setattr(output_dir.os, "replace", lambda a, b: (renames.append((a, b)), real(a, b))[1])
    staged = staging_dir(out)
    (staged / "new").write_text("new")
    publish(staged, out, "hf", overwrite=True)
    assert (out / "new").is_file() and len(renames) == 2 and renames[0][1].name.endswith(".old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_convert_refuses_before_touching_anything(tiny_models, tmp_path, capsys):
    src = tiny_models["qwen2_5_vl"]
    before_src = _snapshot(src)
    user = _user_folder(tmp_path / "user")
    before_user = _snapshot(user)
    cases = [
        (["hf-to-megatron", str(src), str(user)], "was not written by megatron-ivr"),
        (["hf-to-megatron", str(src), str(src)], "source"),
        (["hf-to-megatron", str(src), str(src / "megatron")], "source"),
        (["hf-to-megatron", str(src), str(user), "--pp", "0"], "--pp must be an integer >= 1"),
        (["hf-to-megatron", str(src), str(tmp_path / "new"), "--tp", "0"], "--tp must be an integer >= 1"),
        (["hf-to-megatron", str(src), str(tmp_path / "new"), "--tp", "-1"], "--tp must be an integer >= 1"),
        (["hf-to-megatron", str(src), str(tmp_path / "new"), "--writers", "0"], "--writers"),
        (["megatron-to-hf", str(src), str(tmp_path / "new")], "not a megatron-ivr checkpoint"),
    ]
    for argv, message in cases:
        code = main(["convert", *argv])
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert code == (1 if "megatron-to-hf" in argv else 2), argv
    assert _snapshot(src) == before_src and _snapshot(user) == before_user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]


def test_convert_overwrites_only_its_own_earlier_output(tiny_models, tmp_path):
    src = tiny_models["qwen2_5_vl"]
    ckpt = hf_to_megatron(src, tmp_path / "megatron")
    with pytest.raises(OutputRefused, match="--overwrite"):
        hf_to_megatron(src, ckpt)
    (ckpt / "stale").write_text("from the earlier output")
    hf_to_megatron(src, ckpt, overwrite=True)
    assert (ckpt / "COMPLETE").is_file() and not (ckpt / "stale").exists()  # a whole new output
    with pytest.raises(OutputRefused, match="source"):
        megatron_to_hf(ckpt, ckpt, overwrite=True)
    hf = megatron_to_hf(ckpt, tmp_path / "hf")
    with pytest.raises(OutputRefused, match="holds a hf output, not a megatron one"):
        hf_to_megatron(src, hf, overwrite=True)
    assert (hf / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "megatron"]


class _Planted:
    """A pickle that would leave a file behind if anything unpickled it."""

    def __init__(self, witness):
        self.witness = str(witness)

    def __reduce__(self):
        return (open, (self.witness, "w"))


def test_a_tampered_checkpoint_is_refused_before_anything_is_unpickled(tiny_models, tmp_path):
    import pickle

    from megatron_ivr.model_providers.manifest import CheckpointRefused

    ckpt = hf_to_megatron(tiny_models["qwen2_5_vl"], tmp_path / "megatron")
    witness = tmp_path / "code_ran"
    metadata = ckpt / ".metadata"
    assert metadata.is_file()
    metadata.write_bytes(pickle.dumps(_Planted(witness)))
    with pytest.raises(CheckpointRefused, match=r"refused before loading.*\.metadata"):
        megatron_to_hf(ckpt, tmp_path / "hf")
    assert not witness.exists() and not (tmp_path / "hf").exists()
    (ckpt / "COMPLETE").unlink()  # no manifest at all: refused too
    with pytest.raises(CheckpointRefused, match="no COMPLETE manifest"):
        megatron_to_hf(ckpt, tmp_path / "hf")
    assert not witness.exists()


@pytest.mark.parametrize("command", ["train", "sft"])
def test_an_export_folder_holding_the_run_is_refused_before_training(tiny_models, synthetic_dir, tmp_path, capsys,
                                                                     command):
    from tests.training.runs import write_config

    run = tmp_path / "run"
    config = write_config(run, tiny_models["qwen2_5_vl"], synthetic_dir)
    (run / "checkpoints").mkdir()
    (run / "notes.txt").write_text("mine")
    overrides = [f"trainer.export_dir={run}"] if command == "train" else [f"sft.output_dir={run}"]
    (run / "hf").mkdir()
    (run / "hf" / "weights.bin").write_text("a user's folder named hf")
    before = _snapshot(run)
    assert main([command, str(config), *overrides]) == 2
    err = capsys.readouterr().err
    key = "trainer.export_dir" if command == "train" else "sft.output_dir"
    assert err.startswith(f"error: {key}: ") and err.count("\n") == 1, err
    assert _snapshot(run) == before
