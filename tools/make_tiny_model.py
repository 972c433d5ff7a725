"""Thin wrapper: `python tools/make_tiny_model.py [-c CONFIG] [overrides]` = `megatron-ivr model tiny`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ivr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["model", "tiny", *sys.argv[1:]]))
