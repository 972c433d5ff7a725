#!/usr/bin/env bash
# CPU TEST HARNESS ONLY: builds a separate environment (.venv-sglang) in which a real
# SGLang 0.5.23 server runs on a machine without a GPU, for the integration tier
# (tests marked `sglang`). The trainer's own environment never contains SGLang.
#
# What it does (see shim/sglang_cpu_shim.py for why):
#   1. CPU torch 2.13.0 and SGLang's non-GPU dependencies (requirements.txt);
#   2. sglang 0.5.23 and torchvision 0.28.0 without dependencies (their pins ask for CUDA torch);
#   3. disables torchvision's compiled ops (built for CUDA torch) and installs the shim that
#      declares the op schemas torchvision and SGLang look up at import time.
# About 3.5 GB and 5-10 minutes on 2 cores. Re-running is cheap once it is built.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
VENV="${SGLANG_VENV:-$ROOT/.venv-sglang}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import sglang" 2>/dev/null; then
  $PIP install -q --upgrade pip
  $PIP install -q torch==2.13.0
  $PIP install -q -r "$HERE/requirements.txt"
  $PIP install -q --no-deps sglang==0.5.23 torchvision==0.28.0
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -f "$SITE/torchvision/_C.so" ]; then
  mv "$SITE/torchvision/_C.so" "$SITE/torchvision/_C.so.disabled"
fi
cp "$HERE/shim/sglang_cpu_shim.py" "$HERE/shim/sglang_cpu_shim.pth" "$HERE/shim/sgl_kernel_ops.txt" "$SITE/"
rm -rf "$SITE/sgl_kernel" && cp -r "$HERE/shim/sgl_kernel" "$SITE/sgl_kernel"
"$VENV/bin/python" -c "import sglang, torchvision; print('sglang', sglang.__version__, 'ready in $VENV')"
