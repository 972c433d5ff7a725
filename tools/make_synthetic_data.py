"""Thin wrapper: `python tools/make_synthetic_data.py [-c CONFIG] [overrides]` = `megatron-ivr data synth`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ivr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["data", "synth", *sys.argv[1:]]))
