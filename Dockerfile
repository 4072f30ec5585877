# editserve: CPU image by default.
#   docker build -t editserve .
#   docker run -p 50051:50051 -p 9464:9464 -e EDITSERVE_ADMIN_TOKEN=change-me -v editserve-data:/data editserve
# Listening on 0.0.0.0 needs an admin token (EDITSERVE_ADMIN_TOKEN) or, knowingly, EDITSERVE_INSECURE_EDITS=1;
# without either the server refuses to start (exit 2).
#
# CUDA image: a CUDA base with Python 3.11+ and torch's default (CUDA) wheels, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL= -t editserve:cuda .
#   docker run --gpus all -e EDITSERVE_DEVICE=cuda ... editserve:cuda
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# CPU-only torch wheels for the default image (the default PyPI wheel pulls in CUDA, several GB).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VENV=/opt/editserve/venv \
    PATH=/opt/editserve/venv/bin:$PATH \
    EDITSERVE_DATA_DIR=/data

# CUDA bases ship without Python; the python:* bases already have it.
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv' 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin editserve \
    && mkdir -p /data && chown editserve:editserve /data

WORKDIR /app
# The same install script as `make serve` / `make test` (runtime extras only: no test tools).
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY protos/ protos/
COPY service/ service/
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" EXTRAS="" ./scripts/install.sh \
    && python -c "import service.transport, service.cli"

USER editserve
VOLUME ["/data"]
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["editserve", "health"]
ENTRYPOINT ["editserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464", "--data-dir", "/data"]
