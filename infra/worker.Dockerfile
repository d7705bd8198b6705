# The Prefect worker and flow-run image: CUDA PyTorch with the cass project installed. Used by the
# compose worker (pool cass-process) and as the image of Kubernetes flow-run jobs (pool cass-kubernetes).
#
#   docker build -f infra/worker.Dockerfile -t registry.example.org/cass-worker:$(git rev-parse --short HEAD) .
#
# BASE_IMAGE: any pytorch/pytorch CUDA runtime image with Python 3.11 and a torch inside pyproject.toml's
# range; pick the CUDA version your GPU driver supports (nvidia-smi shows the highest).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# git: DVC and the lineage tags read the repository; the base image's torch is kept when it satisfies
# pyproject.toml (pip would otherwise download another multi-GB CUDA build).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && python -c "import sys; assert sys.version_info[:2] == (3, 11), f'cass needs Python 3.11, base has {sys.version}'"

WORKDIR /opt/cass
COPY pyproject.toml README.md ./
COPY cass ./cass
# prefect[kubernetes] at the installed prefect's version: the same image runs the Kubernetes worker.
RUN pip install . \
    && pip install "prefect[kubernetes]==$(python -c 'import prefect; print(prefect.__version__)')" \
    && pip check \
    && python -c "import torch, cass; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
# Settings, flows and pipeline files; flow runs start here.
COPY . .

RUN useradd --create-home --uid 10001 cass && mkdir -p /var/cache/cass && chown -R cass /opt/cass /var/cache/cass
USER cass
ENV CASS_CACHE_DIR=/var/cache/cass

CMD ["prefect", "worker", "start", "--pool", "cass-process", "--type", "process"]
