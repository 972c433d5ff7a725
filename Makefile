# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/demo_cpu.yaml
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-slow test-sglang test-all lint clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU: take the local CPU wheel of torch first; the GPU container keeps its own torch
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

RUN ?= runs/demo
MIVR := $(VENV)/bin/megatron-ivr
# SFT runs data-parallel over this many processes (one thread each: the demo's 2 cores)
SFT_PROCS ?= 2

# synthetic task -> tiny Qwen2.5-VL -> SFT (HF -> Megatron on load) -> RL (IVR-R1 + VICRA)
# -> greedy test accuracy of the SFT and the RL policy -> report with plots ($(RUN)/report)
demo: setup
	$(MIVR) data synth -c $(CONFIG)
	$(MIVR) model tiny -c $(CONFIG)
	$(VENV)/bin/torchrun --nproc_per_node $(SFT_PROCS) $(MIVR) sft $(CONFIG)
	$(MIVR) eval -c $(CONFIG) model.path=$(RUN)/sft/hf logging.dir=$(RUN)/eval/sft
	$(MIVR) train $(CONFIG)
	$(MIVR) eval -c $(CONFIG) model.path=$(RUN)/rl/hf logging.dir=$(RUN)/eval/rl
	$(MIVR) report $(RUN)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-sglang: setup
	bash tests/harness/sglang_cpu/setup_env.sh
	$(PY) -m pytest -q -m sglang

test-all: setup
	$(PY) -m pytest -q -m "slow or sglang or not slow"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs
