# segal, the Label Studio ML backend, as a container (README: "Deploy with Docker").
#
#   docker build -t segal .                                    # CPU: torch from PyTorch's CPU index
#   docker build --build-arg TORCH_INDEX_URL= -t segal:cuda .  # GPU: PyPI's CUDA build of torch
#   docker run -d -p 9090:9090 -v segal-models:/data/models \
#     -e LABEL_STUDIO_URL=http://<label-studio>:8080 -e LABEL_STUDIO_API_KEY=<token> segal
#
# Build arguments:
#   BASE_IMAGE       a Debian or Ubuntu image; one without Python (e.g. an nvidia/cuda
#                    *-runtime-ubuntu image) gets the distribution's python3 (>= 3.10).
#   TORCH_INDEX_URL  handed to pip as PIP_EXTRA_INDEX_URL. The default, PyTorch's CPU index,
#                    has torch 2.13.0+cpu and torchvision 0.28.0+cpu, which satisfy the
#                    constraints.txt pins (==2.13.0 matches 2.13.0+cpu) and rank above PyPI's
#                    CUDA builds. Empty: PyPI only, i.e. the CUDA build and its nvidia wheels.
#
# The install is `./run.sh setup`, the command the README uses.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
# libgomp1: numba's OpenMP threading layer. Without it numba falls back to its workqueue
# layer, which is not thread-safe, and the server calls the kernels from several threads.
# hadolint ignore=DL3008
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends libgomp1; \
    if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv; \
    fi; \
    rm -rf /var/lib/apt/lists/*
WORKDIR /app

FROM base AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}
# Dependencies first, in a layer that code changes keep: what `pip install -e .` reads, and
# the two packages' __init__ files (the editable install maps the package folders, so the
# modules copied below are found). A new top-level package needs its __init__.py here too.
COPY pyproject.toml constraints.txt README.md run.sh ./
COPY model/__init__.py model/
COPY backend/__init__.py backend/
RUN ./run.sh setup
COPY model/ model/
COPY backend/ backend/
# Fail the build, not the first start: the app imports, and the CPU index really gave a CPU
# torch (pip only warns when an index cannot be reached, then takes PyPI's CUDA build).
RUN .venv/bin/python -c "import torch, model, backend.app; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" && \
    case "${TORCH_INDEX_URL}" in \
        */cpu) .venv/bin/python -c "import torch; assert torch.version.cuda is None, 'expected a CPU torch from the CPU index, got ' + torch.__version__" ;; \
    esac

FROM base
LABEL org.opencontainers.image.title="segal" \
      org.opencontainers.image.description="Active-learning ML backend for Label Studio: Bayesian pixel and superpixel acquisition for semantic segmentation" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, non-root UID (not 1000, which Ubuntu images already use) and a writable home:
# gunicorn puts its control socket in $HOME/.gunicorn.
RUN groupadd --gid 10001 segal && \
    useradd --uid 10001 --gid segal --no-log-init --create-home --home-dir /home/segal \
        --shell /usr/sbin/nologin segal && \
    mkdir -p /data/models && \
    chown segal:segal /data/models
# The code and .venv stay root-owned: the server only reads them.
COPY --from=build /app /app
COPY docker/healthcheck.py /app/docker/healthcheck.py
# NUMBA_CACHE_DIR: numba caches compiled kernels next to the sources by default, which the
# server user cannot write; /tmp costs a few seconds of compiling at each start (the server
# does it before it answers). threadsafe: OpenMP, or an error instead of the workqueue layer.
ENV PATH=/app/.venv/bin:$PATH \
    HOME=/home/segal \
    MODEL_DIR=/data/models \
    PORT=9090 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    NUMBA_THREADING_LAYER=threadsafe \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/data/models"]
EXPOSE 9090
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]
# gunicorn, one worker process (the models live in its memory) with SEGAL_THREADS threads.
CMD ["segal-backend"]
