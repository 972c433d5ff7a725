# One image for trainer and launcher on GPU clusters: NGC PyTorch (CUDA, cuDNN, NCCL, Apex,
# Transformer Engine) plus this package. SGLang runs from its own image (it pins its own torch).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/megatron-ivr
COPY setup.py pyproject.toml README.md ./
COPY megatron_ivr ./megatron_ivr
COPY configs ./configs
# keep the container's own torch and Transformer Engine: the requirements are ranges
RUN pip install -e '.[launch]'

ENTRYPOINT ["megatron-ivr"]
