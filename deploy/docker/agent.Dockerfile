# syntax=docker/dockerfile:1.7
# The GPU agent (python -m gpubroker.gpu_agent). Build from the repository root:
#
#   docker build -f deploy/docker/agent.Dockerfile -t gpubroker-agent .
#   docker run --gpus all -e GPUBROKER_AGENT_BROKER=broker:50051 \
#       -e GPUBROKER_AGENT_JOIN_TOKEN=... gpubroker-agent
#
# The install steps are deploy/docker/install-agent.sh; CI runs that script in a fresh
# virtual environment (.ci/run), since no image is built there. docs/deploy.md, section 9.
#
# torch's CUDA wheels carry their own CUDA libraries (the nvidia-* packages); the host needs
# only the NVIDIA driver and the NVIDIA Container Toolkit, which mounts the driver in. The CUDA
# base image says which driver that is: the toolkit refuses to start this image on a driver
# older than its CUDA version (12.8: driver 570 or later). Keep CUDA_BASE and TORCH_INDEX_URL
# on the same CUDA version; for an older driver, e.g.
#   --build-arg CUDA_BASE=nvidia/cuda:12.6.3-base-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_BASE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Your own workload packages (wheel URLs or pinned requirements), space-separated.
ARG EXTRA_PACKAGES=""

# Ubuntu 24.04's Python is 3.12; the package needs 3.11 or later.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/gpubroker --create-home \
        --shell /usr/sbin/nologin gpubroker

COPY deploy/docker/install-common.sh deploy/docker/install-agent.sh /usr/local/lib/gpubroker/
# The source is mounted for the install only, so no layer keeps a copy of it.
RUN --mount=type=bind,source=.,target=/usr/src/gpubroker,rw \
    TORCH_INDEX_URL="$TORCH_INDEX_URL" EXTRA_PACKAGES="$EXTRA_PACKAGES" \
    /usr/local/lib/gpubroker/install-agent.sh /opt/gpubroker/venv /usr/src/gpubroker

# --device cuda: a container started without a GPU (no --gpus) fails at start instead of
# running, and being billed, as a CPU agent. Models are cached under the home directory; mount
# a volume there to keep them across restarts.
ENV PYTHONUNBUFFERED=1 \
    GPUBROKER_AGENT_DEVICE=cuda \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER gpubroker
WORKDIR /var/lib/gpubroker
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/gpubroker/venv/bin/python", "-m", "gpubroker.gpu_agent"]
