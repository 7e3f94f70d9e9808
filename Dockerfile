# syntax=docker/dockerfile:1
# The project image: the pipeline (tspo_core, the Prefect flows, DVC), the Prefect server and worker CLIs and the
# retrieval server. CPU by default; docker-compose.yml builds it as tspo-pipeline:cpu.
#
#   docker build -t tspo-pipeline:cpu .
#
# GPU variant (NVIDIA driver on the host, NVIDIA Container Toolkit, `docker run --gpus all`): the CUDA build of
# torch from the PyTorch index and the project's `gpu` extra (vLLM, faiss-gpu in place of faiss-cpu). The torch
# and vLLM wheels carry their CUDA runtime, so the slim Python base works; a CUDA base image such as
# nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 can be used instead (BASE_IMAGE) if it provides python3.11 with
# pip as `python`. Pick the index of the CUDA version your driver supports (cu126, cu128, ...):
#
#   docker build -t tspo-pipeline:gpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 --build-arg EXTRAS=gpu .
#
# UID: the owner of the checkout that docker-compose mounts at /app (DVC writes its outputs there), e.g.
# `--build-arg UID=$(id -u)`.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
ARG UID=1000

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    OMP_WAIT_POLICY=PASSIVE \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TSPO_PROJECT_DIR=/app

# git: DVC experiments are git commits in the mounted checkout; libgomp1: the OpenMP runtime of faiss and torch.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /app \
    && git config --system user.name "tspo pipeline" \
    && git config --system user.email "tspo-pipeline@localhost"

WORKDIR /app

# torch first, pinned, from the PyTorch index (CPU wheel by default); constraints.txt keeps every later resolver
# from moving it (a PyPI torch would pull several GB of CUDA packages into the CPU image).
COPY constraints.txt ./
RUN pip install -c constraints.txt --index-url "${TORCH_INDEX_URL}" torch==2.13.0

COPY pyproject.toml README.md ./
COPY tspo_core ./tspo_core
COPY flows ./flows
# faiss-gpu replaces faiss-cpu (both install the module `faiss`): with EXTRAS=gpu, both are removed after the
# install and faiss-gpu alone is put back.
RUN pip install -c constraints.txt -e ".${EXTRAS:+[${EXTRAS}]}" \
    && if [ -n "${EXTRAS}" ] && pip show faiss-gpu >/dev/null 2>&1; then \
         pip uninstall -y faiss-cpu faiss-gpu && pip install -c constraints.txt --no-deps faiss-gpu; \
       fi \
    && python -c "import torch, prefect, dvc, faiss, tspo_core, flows.pipeline; \
assert torch.__version__.startswith('2.13.0'), torch.__version__"

COPY . .
RUN useradd --create-home --uid "${UID}" tspo && chown -R tspo /app
USER tspo

# 4200: Prefect server (API and UI); 8000: retrieval server. docker-compose.yml publishes 4200 on 127.0.0.1 only.
EXPOSE 4200 8000
CMD ["python", "-m", "flows.pipeline", "--help"]
