"""Config loading: YAML + defaults + dotted overrides, typed; errors name the key and the file."""

from __future__ import annotations

import pytest

from megatron_ivr.config import ConfigError, dump_config, load_config
from megatron_ivr.config.loader import COMMAND_LINE


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "trainer:\n  lr: 1.0e-5\n  steps: 7\nreward:\n  lam: 0.3\n")
    child = write(tmp_path / "child.yaml", "defaults: [base.yaml]\ntrainer:\n  steps: 9\n")
    cfg = load_config(child, ["trainer.max_tokens_per_micro_batch=2048", "algorithm.vicra.enabled=true",
                              "trainer.lr=1e-6"])
    assert cfg.trainer.steps == 9  # the child wins over its default
    assert cfg.reward.lam == 0.3  # inherited
    assert cfg.trainer.lr == 1e-6  # '1e-6' (YAML 1.1 string) read as a float
    assert cfg.trainer.max_tokens_per_micro_batch == 2048
    assert cfg.algorithm.vicra.enabled is True
    assert cfg.algorithm.ivr.tau == 1.0  # untouched default of spec section 4


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = load_config("configs/demo_cpu.yaml")
    dumped = write(tmp_path / "dumped.yaml", dump_config(cfg))
    assert load_config(dumped) == cfg
    assert load_config("configs/demo_cpu_qwen3.yaml").model.family == "qwen3_vl"


@pytest.mark.parametrize("file_text, overrides, key, where", [
    ("trainer:\n  lrr: 1\n", [], "trainer.lrr", "bad.yaml"),                        # unknown key in a file
    ("", ["algorithm.vicra.scoer=kl"], "algorithm.vicra.scoer", COMMAND_LINE),      # unknown nested key
    ("", ["nonsense=1"], "nonsense", COMMAND_LINE),                                # unknown section
    ("trainer:\n  steps: many\n", [], "trainer.steps", "bad.yaml"),                 # wrong type (int)
    ("", ["trainer.steps=1.5"], "trainer.steps", COMMAND_LINE),                     # float for int
    ("", ["trainer.lr=fast"], "trainer.lr", COMMAND_LINE),                          # str for float
    ("", ["algorithm.vicra.enabled=3"], "algorithm.vicra.enabled", COMMAND_LINE),   # int for bool
    ("algorithm:\n  loss_agg: mean\n", [], "algorithm.loss_agg", "bad.yaml"),       # not a choice
    ("", ["rollout.server_urls=http://x"], "rollout.server_urls", COMMAND_LINE),    # str for list
    ("trainer: 3\n", [], "trainer", "bad.yaml"),                                    # scalar for section
    ("reward:\n  lam: 1.5\n", [], "reward.lam", "bad.yaml"),                        # out of range
    ("", ["algorithm.ivr.max_rounds=0"], "algorithm.ivr.max_rounds", COMMAND_LINE), # out of range, nested
    ("", ["data.max_bad_fraction=-0.1"], "data.max_bad_fraction", COMMAND_LINE),
    ("", ["parallel.context_parallel=2"], "parallel.context_parallel", COMMAND_LINE),  # not supported yet
    ("", ["tiny_model.hidden_size=100"], "tiny_model.hidden_size", COMMAND_LINE),   # head_dim 25: odd
    ("", ["tiny_model.vision_hidden_size=36"], "tiny_model.vision_hidden_size", COMMAND_LINE),
])
def test_errors_name_the_key_and_where_it_was_set(tmp_path, file_text, overrides, key, where):
    path = write(tmp_path / "bad.yaml", file_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert key in message
    assert where in message


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="circular defaults"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["trainer.lr"])


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path / "evil.yaml", "name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_unknown_section_from_the_command_line_is_blamed_on_it():
    import pytest

    from megatron_ivr.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"unknown key 'no_such_key' \(set in command line\)"):
        load_config(None, ["no_such_key.zzz=1"])


@pytest.mark.parametrize("override, key", [
    ("algorithm.vicra.score=kl", "algorithm.vicra.score"),  # a formula that the trainer does not run: refused
    ("trainer.pack_length=-1", "trainer.pack_length"),
    ("rollout.temperature=0", "rollout.temperature"),  # greedy rollouts: every group identical
])
def test_settings_the_trainer_cannot_honour_are_refused_by_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key


def test_routing_replay_needs_the_engine_that_reports_routing():
    load_config(None, ["algorithm.routing_replay=replay"])  # the local engine: fine
    with pytest.raises(ConfigError, match="SGLang client does not ask") as info:
        load_config(None, ["algorithm.routing_replay=record", "rollout.backend=sglang"])
    assert info.value.key == "algorithm.routing_replay"


@pytest.mark.parametrize("override, key", [
    ("trainer.lr=.inf", "trainer.lr"), ("trainer.lr=inf", "trainer.lr"),
    ("reward.grader_timeout_s=.inf", "reward.grader_timeout_s"), ("sft.lr=.nan", "sft.lr"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"), ("trainer.weight_decay=-0.1", "trainer.weight_decay"),
    ("sft.grad_clip=-1", "sft.grad_clip"), ("sft.weight_decay=-1", "sft.weight_decay"),
    ("algorithm.ivr.tau=1.5", "algorithm.ivr.tau"), ("algorithm.ivr.tau=-2", "algorithm.ivr.tau"),
    ("tiny_model.num_heads=0", "tiny_model.num_heads"), ("tiny_model.num_kv_heads=0", "tiny_model.num_kv_heads"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens"), ("data.max_source_pixels=10", "data.max_source_pixels"),
    ("data.shuffle_seed=1", "data.shuffle_seed"), ("rollout.host=0.0.0.0", "rollout.host"),  # removed: unused
    ("parallel.context_parallel=1", "parallel.context_parallel"), ("logging.jsonl=false", "logging.jsonl"),
    ("logging.interval=5", "logging.interval"), ("model.family=llama", "model.family"),
    ("model.moe_aux_loss_coeff=-0.1", "model.moe_aux_loss_coeff"),
    ("algorithm.routing_replay=always", "algorithm.routing_replay"),
])
def test_out_of_range_and_removed_keys_are_refused_by_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key and key in str(info.value)


def test_config_files_that_are_not_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)
    (tmp_path / "binary.yaml").write_bytes(b"name: \xff\xfe\x00")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(tmp_path / "binary.yaml")
    write(tmp_path / "defaults.yaml", "defaults: [5]\n")
    with pytest.raises(ConfigError, match="'defaults' must be a list of file names, got \\[5\\]"):
        load_config(tmp_path / "defaults.yaml")


def test_dapo_preset_fills_what_the_config_does_not_set(tmp_path):
    algorithm = load_config(None, ["algorithm.name=dapo"]).algorithm
    assert (algorithm.eps_low, algorithm.eps_high, algorithm.beta) == (0.2, 0.28, 0.0)
    assert algorithm.dynamic_sampling and algorithm.overlong_shaping and algorithm.loss_agg == "token-mean"
    explicit = load_config(write(tmp_path / "d.yaml", "algorithm:\n  name: dapo\n  eps_high: 0.3\n"),
                           ["algorithm.dynamic_sampling=false"]).algorithm
    assert explicit.eps_high == 0.3 and not explicit.dynamic_sampling and explicit.overlong_shaping
    grpo = load_config(None, ["algorithm.name=grpo"]).algorithm
    assert (grpo.eps_high, grpo.dynamic_sampling, grpo.overlong_shaping) == (0.2, False, False)
