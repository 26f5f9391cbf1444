# syntax=docker/dockerfile:1.7
#
# Two images from one file (docker-compose.yml builds both):
#
#   --target producer   python:3.11-slim with the project's base install (`pip install .`, no
#                       extra): backfill, r2-queue, webhook, create-topic. No CUDA, no torch.
#   --target consumer   (the default, last stage) CUDA 12 runtime + cuDNN 9 with a cu12 torch build
#                       and the project with its `consumer` and `codec` extras. ctranslate2 4.x,
#                       faster-whisper's engine, loads libcublas.so.12 and has no CUDA 13 build, so
#                       the base must be CUDA 12.x; torch must be a cu12 build in the same image so
#                       both use one CUDA runtime (12.8: the base image's and torch's cu128 agree).
#
#   docker build -t metavoice-consumer:0.1.0 .
#   docker build --target producer -t metavoice-producer:0.1.0 .
#
# Every third-party version is pinned by deploy/constraints.txt (regenerate it with
# `python deploy/requirements.py --freeze consumer codec > deploy/constraints.txt` after an upgrade
# the tests passed with); tag the images with pyproject.toml's version, as deploy/k8s/ names them.

ARG UV_VERSION=0.8.14
# torch's CUDA 12 builds live on PyTorch's own index (PyPI's torch >= 2.11 is a CUDA 13 build);
# deploy/constraints.txt says which version, this index which build of it.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# --- producers: small, CPU only ---------------------------------------------------------------
FROM python:3.11-slim AS producer
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# Dependencies in a layer of their own (kept while only the code changes): pyproject.toml's base
# list and no extra, pinned by deploy/constraints.txt. tests/test_packaging.py proves that list
# runs the producers with no torch, Whisper, Prefect, Arrow or NumPy installed.
COPY pyproject.toml ./
COPY deploy/requirements.py deploy/constraints.txt ./deploy/
RUN python deploy/requirements.py > /tmp/requirements.txt \
    && pip install -c deploy/constraints.txt -r /tmp/requirements.txt
# The build context is what .dockerignore allows: pyproject.toml, README.md, LICENSE, the packages,
# deploy/constraints.txt, deploy/requirements.py and deploy/prefect_flow.py.
COPY . .
RUN pip install --no-deps -c deploy/constraints.txt . \
    && python -m producer --help >/dev/null \
    && python -c "import sys, producer.webhook, producer.r2_queue, producer.backfill; assert 'torch' not in sys.modules" \
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
COPY pyproject.toml ./
COPY deploy/requirements.py deploy/constraints.txt ./deploy/
# torch first: the version deploy/constraints.txt pins, as its CUDA 12 build from TORCH_INDEX. The
# install below finds it satisfied (torch==X matches X+cu128) and keeps it.
RUN uv pip install --index-url ${TORCH_INDEX} "$(grep -E '^torch==' deploy/constraints.txt)"
# Then the `consumer` extra (Prefect, faster-whisper, Arrow, ...) and the `codec` extra (transformers:
# EnCodec, DAC, Mimi), pinned.
RUN python deploy/requirements.py consumer codec > /tmp/requirements.txt \
    && uv pip install -c deploy/constraints.txt -r /tmp/requirements.txt
COPY . .
RUN uv pip install --no-deps . "resemblyzer==0.1.4" \
    && python -c "import ctranslate2, faster_whisper, prefect, pyarrow, transformers, torch; assert torch.version.cuda.startswith('12'), torch.version.cuda"
# Directories that compose mounts named volumes on must exist, owned by the user, in the image:
# a fresh named volume copies their ownership (otherwise it is root's and unwritable). /spool holds
# the in-progress Parquet files of an object-store output (METAVOICE_OUTPUT_DIR=s3://...).
RUN useradd --create-home --uid 10001 metavoice \
    && mkdir -p /data/output /spool /home/metavoice/.cache/huggingface \
    && chown -R metavoice /data/output /spool /home/metavoice/.cache
USER metavoice
ENV METAVOICE_OUTPUT_DIR=/data/output \
    METAVOICE_SPOOL_DIR=/spool \
    METAVOICE_DEVICE=cuda \
    HF_HOME=/home/metavoice/.cache/huggingface
VOLUME ["/data/output"]
# The output comes from METAVOICE_OUTPUT_DIR (a directory or s3://bucket/prefix), not a flag.
CMD ["python", "-m", "consumer"]
