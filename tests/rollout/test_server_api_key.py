"""The SGLang API key never appears in a server's command line (``ps`` shows every user a
process's arguments): ServerSpec starts a server with a key through SERVER_BOOTSTRAP, which
takes it from the environment. A stand-in ``sglang.launch_server`` records what it was given."""

from __future__ import annotations

import json
import subprocess
import sys

from megatron_ivr.rollout.sglang.server import API_KEY_ENV, ServerSpec

STAND_IN = """
import json, os, sys
with open("/proc/self/cmdline", "rb") as fh:
    cmdline = fh.read().decode().split("\\0")
json.dump({"argv": sys.argv, "cmdline": cmdline, "env_key": os.environ.get("KEY_ENV")}, open(os.environ["OUT"], "w"))
""".replace("KEY_ENV", API_KEY_ENV)


def test_the_api_key_reaches_the_server_through_the_environment_only(tmp_path):
    package = tmp_path / "sglang"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(STAND_IN)
    spec = ServerSpec(model_path="/models/m", port=30123, api_key="s3cret-key", python=sys.executable)
    command = spec.command()
    assert not any("s3cret-key" in part for part in command)
    env = dict(spec.environment(), PYTHONPATH=str(tmp_path), OUT=str(tmp_path / "seen.json"))
    subprocess.run(command, env=env, check=True, timeout=60)
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["argv"][-2:] == ["--api-key", "s3cret-key"]  # SGLang parses it from its sys.argv
    assert "--model-path" in seen["argv"] and "/models/m" in seen["argv"]
    assert not any("s3cret-key" in part for part in seen["cmdline"])  # what ps shows
    assert seen["env_key"] is None  # not inherited by the server's own children
    assert ServerSpec(model_path="/m", port=1).command()[1:3] == ["-m", "sglang.launch_server"]  # no key

