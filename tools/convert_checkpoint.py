"""Thin wrapper: `python tools/convert_checkpoint.py hf-to-megatron SRC OUT --tp 2 --pp 2`.

Same as `megatron-ivr convert ...`; see model_providers/convert.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ivr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
