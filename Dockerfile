# syntax=docker/dockerfile:1.7
#
# Two images from one file (docker-compose.yml builds both):
#
#   --target producer   python:3.11-slim with only what the producers import (aiokafka, aiohttp,
#                       aiobotocore, ...): backfill, r2-queue, webhook, create-topic. No CUDA, no torch.
#   --target consumer   (the default, last stage) CUDA 12 runtime + cuDNN 9 with a cu12 torch build
#                       and the whole project. ctranslate2 4.x, faster-whisper's engine, loads
#                       libcublas.so.12 and has no CUDA 13 build, so the base must be CUDA 12.x; torch
#                       must be a cu12 build in the same image so both use one CUDA runtime.
#
#   docker build -t metavoice-consumer .
#   docker build --target producer -t metavoice-producer .

ARG UV_VERSION=0.8.14
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# --- producers: small, CPU only ---------------------------------------------------------------
FROM python:3.11-slim AS producer
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# Exactly the third-party packages producer/ and the pipeline modules it imports need
# (tests/test_compose.py checks that importing the producers loads no torch/Whisper/Arrow).
RUN pip install "aiobotocore>=2.13" "aiokafka>=0.11" "aiohttp>=3.9" "orjson>=3.9" \
        "pydantic>=2.5" "pydantic-settings>=2.2" "tenacity>=8.2" "rich>=13"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY consumer ./consumer
COPY producer ./producer
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 metavoice
USER metavoice
EXPOSE 8080
CMD ["python", "-m", "producer", "webhook", "--host", "0.0.0.0", "--port", "8080"]

# --- consumer: GPU ----------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS consumer
ARG TORCH_INDEX
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && uv venv --python 3.11 /opt/venv
WORKDIR /app
# torch first, from the CUDA 12 index: `uv pip install .` then finds it satisfied and keeps it.
RUN uv pip install --index-url ${TORCH_INDEX} "torch>=2.2"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY consumer ./consumer
COPY producer ./producer
RUN uv pip install . \
    && python -c "import ctranslate2, torch; assert torch.version.cuda.startswith('12'), torch.version.cuda"
COPY deploy/prefect_flow.py ./deploy/prefect_flow.py
# Directories that compose mounts named volumes on must exist, owned by the user, in the image:
# a fresh named volume copies their ownership (otherwise it is root's and unwritable).
RUN useradd --create-home --uid 10001 metavoice \
    && mkdir -p /data/output /home/metavoice/.cache/huggingface \
    && chown -R metavoice /data/output /home/metavoice/.cache
USER metavoice
ENV METAVOICE_OUTPUT_DIR=/data/output \
    METAVOICE_DEVICE=cuda \
    HF_HOME=/home/metavoice/.cache/huggingface
VOLUME ["/data/output"]
CMD ["python", "-m", "consumer", "--output", "/data/output"]
