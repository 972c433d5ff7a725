"""The `megatron-ivr` command: help, config show, errors, and the not-yet subcommands."""

from __future__ import annotations

import pytest
import yaml

from megatron_ivr.cli import main


def test_help_on_every_subcommand(capsys):
    for argv in (["--help"], ["config", "show", "--help"], ["data", "synth", "--help"], ["model", "tiny", "--help"],
                 ["eval", "--help"], ["train", "--help"], ["convert", "--help"], ["launch", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "usage: megatron-ivr" in capsys.readouterr().out


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "configs/demo_cpu.yaml", "trainer.lr=3e-6", "algorithm.ivr.enabled=true"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["trainer"]["lr"] == 3e-6 and shown["algorithm"]["ivr"]["enabled"] is True
    assert shown["model"]["family"] == "qwen2_5_vl" and shown["eval"]["max_new_tokens"] == 128


def test_bad_override_is_a_clear_error(capsys):
    assert main(["config", "show", "configs/demo_cpu.yaml", "trainer.lrr=1"]) == 2  # a config error
    err = capsys.readouterr().err
    assert "unknown key 'trainer.lrr'" in err and "command line" in err


def test_launch_help_names_the_modes_and_a_bad_mode_is_refused(capsys):
    with pytest.raises(SystemExit) as help_exit:
        main(["launch", "--help"])
    assert help_exit.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("local", "slurm", "docker", "--dryrun", "colocated", "disaggregated"))
    with pytest.raises(SystemExit) as bad:
        main(["launch", "kubernetes", "configs/demo_cpu.yaml"])
    assert bad.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_data_inspect_lists_bad_samples(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "x", "question": "q", "answer": ""}\n{"id": "y", "question": "q", "answer": "1"}\n')
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 good, 1 bad" in out and "bad x: empty or missing answer" in out


def test_an_impossible_layout_is_a_config_error_before_anything_starts(tiny_models, capsys):
    code = main(["train", "configs/demo_cpu.yaml", f"model.path={tiny_models['qwen2_5_vl']}",
                 "parallel.tensor_parallel=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "parallel.tensor_parallel=3 must divide the model's num_key_value_heads (2)" in err


def test_sglang_without_servers_is_a_config_error_before_the_model_loads(capsys):
    """No server URLs: the key is named before anything is loaded (the model path does not
    exist, so a later check would report that instead)."""
    code = main(["train", "configs/demo_cpu.yaml", "model.path=/nonexistent", "rollout.backend=sglang"])
    err = capsys.readouterr().err
    assert code == 2
    assert "rollout.server_urls" in err and "Traceback" not in err


def test_sft_on_data_without_reference_responses_is_a_data_error(tiny_models, synthetic_dir, capsys):
    """train.jsonl has questions and answers but no reference responses: one clear line, and
    the process groups are torn down (the next in-process job starts cleanly)."""
    import torch.distributed as dist

    code = main(["sft", "configs/demo_cpu.yaml", f"sft.init_path={tiny_models['qwen2_5_vl']}",
                 f"sft.data_paths=[{synthetic_dir / 'train.jsonl'}]", "logging.progress=false"])
    err = capsys.readouterr().err
    assert code == 1  # a data error
    assert "no sample has a reference response" in err and "Traceback" not in err
    assert not dist.is_initialized()


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    """A failure outside the known types prints one line naming it (exit 1); ``--debug``
    raises it with its traceback."""
    bad = tmp_path / "not_a_model"
    bad.mkdir()
    (bad / "config.json").write_text("{")  # and no weights: the converter's reader fails
    code = main(["convert", "hf-to-megatron", str(bad), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        main(["--debug", "convert", "hf-to-megatron", str(bad), str(tmp_path / "out")])


@pytest.mark.parametrize("argv, code, words", [
    (["config", "show", "MISSING_DIR/"], 2, "config file not found"),
    (["data", "inspect", "MISSING.jsonl"], 1, "dataset file not found"),
    (["config", "show", "configs/demo_cpu.yaml", "trainer.lr=.inf"], 2, "trainer.lr: must be a finite number"),
])
def test_exit_codes_config_2_data_1(argv, code, words, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
