# syntax=docker/dockerfile:1.7
# The broker (python -m gpubroker.broker) with both providers (local, gce) and the PostgreSQL
# driver. Build from the repository root:
#
#   docker build -f deploy/docker/broker.Dockerfile -t gpubroker-broker .
#
# The install steps are deploy/docker/install-broker.sh; CI runs that script in a fresh
# virtual environment (.ci/run), since no image is built there. docs/deploy.md, section 4.7.
FROM python:3.11-slim-bookworm

# The package depends on torch, which the broker never imports: the small CPU build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN useradd --system --uid 10001 --home-dir /var/lib/gpubroker --create-home \
        --shell /usr/sbin/nologin gpubroker

COPY deploy/docker/install-common.sh deploy/docker/install-broker.sh /usr/local/lib/gpubroker/
# The source is mounted for the install only, so no layer keeps a copy of it.
RUN --mount=type=bind,source=.,target=/usr/src/gpubroker,rw \
    TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    /usr/local/lib/gpubroker/install-broker.sh /opt/gpubroker/venv /usr/src/gpubroker

# In a container the broker listens on every interface. A non-loopback address needs TLS
# (GPUBROKER_TLS_CERT, GPUBROKER_TLS_KEY) or GPUBROKER_PLAINTEXT=1, or the broker refuses to
# start. Agents come from the agent image or GCE (GPUBROKER_PROVIDER=gce), not from processes
# in this container.
ENV PYTHONUNBUFFERED=1 \
    GPUBROKER_DATA_DIR=/var/lib/gpubroker \
    GPUBROKER_LISTEN=0.0.0.0:50051 \
    GPUBROKER_PROVIDER=none
USER gpubroker
WORKDIR /var/lib/gpubroker
VOLUME /var/lib/gpubroker
# gRPC (clients, agents, health), and /metrics when GPUBROKER_METRICS=0.0.0.0:9464.
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/gpubroker/venv/bin/python", "-m", "gpubroker.broker"]
