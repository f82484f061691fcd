# syntax=docker/dockerfile:1
# cammsr image: the `cammsr` CLI, the DVC pipeline and the Prefect flows. CPU by default.
#   docker build -t cammsr .
#   docker run --rm -v "$PWD/data:/app/data" cammsr demo          # dvc repro of the demo catalog
#   docker compose up                                              # Prefect server + deploy + worker
# CUDA: a CUDA runtime base with Python >= 3.11 and the matching torch wheel index, e.g.
#   docker build -t cammsr:cuda --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 .
# Files written to the data volume belong to UID (default 1000): pass --build-arg UID=$(id -u) to match yours.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG UID=1000
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENIZERS_PARALLELISM=false \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_LOGGING_EXTRA_LOGGERS=cammsr,features \
    PREFECT_HOME=/home/cammsr/.prefect \
    HF_HOME=/home/cammsr/.cache/huggingface

# git: DVC keeps its pipeline state in a git repository. The CUDA bases ship no Python: add one.
# hadolint ignore=DL3008
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends git ca-certificates; \
    if ! command -v python3 >/dev/null 2>&1; then \
      apt-get install -y --no-install-recommends python3 python3-venv python3-pip; \
    fi; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

RUN useradd --create-home --uid "${UID}" --shell /bin/bash cammsr && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# torch and torchvision first, from the index matching the base (cached layer). Pins = pyproject.toml's;
# tests/test_dockerfile.py checks that they stay equal.
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple \
        "torch==2.14.1" "torchvision==0.29.1"

# The rest of the dependencies from pyproject.toml (another cached layer), then the project itself.
COPY pyproject.toml README.md ./
RUN mkdir -p cammsr features flows demo \
 && touch cammsr/__init__.py features/__init__.py flows/__init__.py demo/__init__.py \
 && pip install --extra-index-url "${TORCH_INDEX}" . \
 && pip uninstall -y cammsr && rm -rf cammsr features flows demo build ./*.egg-info
COPY --chown=cammsr:cammsr . .
# The volumes' mount points exist and belong to the user, so named volumes start out writable.
RUN pip install --no-deps -e . \
 && mkdir -p /app/data /home/cammsr/.cache \
 && chown cammsr:cammsr /app /app/data /home/cammsr/.cache

USER ${UID}
# data/ holds the DVC-tracked outputs; the cache holds downloaded models (bert-base-uncased, CLIP).
VOLUME ["/app/data", "/home/cammsr/.cache"]
ENTRYPOINT ["cammsr"]
CMD ["--help"]
