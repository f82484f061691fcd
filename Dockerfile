# cammsr image. CPU by default; for CUDA pass a CUDA base that has Python 3.11:
#   docker build -t cammsr .
#   docker build -t cammsr:cuda --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 .
#   docker run --rm -v $PWD/data:/app/data cammsr demo
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# CPU wheels by default (the PyPI x86_64 torch wheel bundles CUDA libraries: several GB for nothing on CPU).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=0 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false

RUN if ! command -v python3.11 >/dev/null 2>&1 && ! command -v python >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
      && rm -rf /var/lib/apt/lists/*; \
    else \
      apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*; \
    fi

RUN useradd --create-home --uid 1000 cammsr
WORKDIR /app

# Dependencies first (cached layer), from pyproject.toml: torch/torchvision pins are the same as in pyproject.
COPY pyproject.toml README.md ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX}" "torch==2.14.1" "torchvision==0.29.1"
ENV PATH=/opt/venv/bin:$PATH

COPY --chown=cammsr:cammsr . .
RUN pip install --extra-index-url "${TORCH_INDEX}" -e . && chown -R cammsr:cammsr /app

USER cammsr
VOLUME ["/app/data"]
ENTRYPOINT ["cammsr"]
CMD ["--help"]
