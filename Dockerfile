# The project image: every pipeline step, every TrainJob node and the MLflow server run it.
#   docker build -t REGISTRY/alignprop:0.1.0 .
# CUDA 12.6 runtime with torch 2.13.0 preinstalled (needs an NVIDIA driver >= 560 on the nodes).
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Models come from the model cache (S3 -> /cache/models), never from the hub at run time.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    ALIGNPROP_MODELS_DIR=/cache/models \
    MLFLOW_DISABLE_TELEMETRY=true \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/alignprop

# torch first and alone, pinned: with 2.13.0 in place nothing below can pull another torch build.
RUN pip install --no-cache-dir torch==2.13.0 \
    && python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"

# Pinned dependencies: the runtime part of requirements.lock (everything above its test-tooling marker).
COPY requirements.lock ./
RUN sed '/^# test and tooling/,$d' requirements.lock > /tmp/runtime-requirements.txt \
    && pip install --no-cache-dir -r /tmp/runtime-requirements.txt \
    && rm /tmp/runtime-requirements.txt

# The project itself, without re-resolving dependencies.
COPY pyproject.toml README.md ./
COPY alignprop ./alignprop
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 1000 --user-group alignprop \
    && mkdir -p /cache \
    && chown alignprop:alignprop /cache

USER 1000:1000
WORKDIR /home/alignprop
CMD ["alignprop", "--help"]
