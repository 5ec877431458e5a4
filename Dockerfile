# medrefine inference server: REST + KServe v2 (HTTP /v2 and gRPC) + /ui + /metrics, one process.
#
# CPU (default):   docker build -t medrefine .
# CUDA:            docker build -t medrefine:cuda --build-arg DEVICE=cuda .
#                  (torch and onnxruntime-gpu wheels bring their CUDA libraries; the host needs the NVIDIA
#                  driver and container toolkit: docker run --gpus all ...)
# Run (the API key is required in this image; the model directory is read-only):
#   docker run --rm -p 3000:3000 -p 8001:8001 -e MEDREFINE_API_KEY="$(openssl rand -hex 24)" \
#       --read-only --tmpfs /tmp medrefine
# Other models: mount an exported artifact directory read-only over /models/default (and generators
# over /models/generators, or -e MEDREFINE_GENERATORS=off to serve segmentation only):
#   docker run ... -v "$PWD/artifacts/mymodel:/models/default:ro" medrefine
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
# The project's declared dependencies as a requirements file: the build stage copies only this file, so an
# edit elsewhere in pyproject.toml (tests, tools, extras) keeps the dependency layer cached.
# EXTRAS: optional dependency groups to add, comma-separated: `postgres` (a PostgreSQL driver for
# MEDREFINE_DB_URL), `ray` (the platform's Ray runner), `openvino` (run with -e MEDREFINE_BACKEND=openvino:
# the fast CPU engine), e.g. --build-arg EXTRAS=postgres,ray.
FROM ${PYTHON_IMAGE} AS requirements
ARG DEVICE=cpu
ARG EXTRAS=
COPY pyproject.toml /pyproject.toml
RUN python -c 'import sys, tomllib; p = tomllib.load(open("/pyproject.toml", "rb"))["project"]; \
extras = [e for e in sys.argv[2].split(",") if e] + (["gpu"] if sys.argv[1] == "cuda" else []); \
print("\n".join(p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]))' \
        "$DEVICE" "$EXTRAS" > /requirements.txt

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG DEVICE=cpu
# CPU torch comes from the PyTorch CPU index (PyPI's default Linux wheel is the multi-GB CUDA build).
ARG TORCH_INDEX_URL_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL_CUDA=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Layers from the slowest-changing down, so a code change rebuilds only the last two steps. Each install
# is its own command under `set -e`: in `a && b;` a failing `a` does not stop the shell, and a failed
# torch install surfaced only at the import check at the end.
# 1. torch alone, from the index of the device's build.
RUN set -eux; \
    if [ "$DEVICE" = "cuda" ]; then index="$TORCH_INDEX_URL_CUDA"; else index="$TORCH_INDEX_URL_CPU"; fi; \
    pip install --index-url "$index" torch==2.13.0
# 2. The project's declared dependencies (the torch range keeps the wheel above).
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN set -eux; \
    pip install -r /tmp/requirements.txt; \
    if [ "$DEVICE" = "cuda" ]; then \
        # onnxruntime and onnxruntime-gpu provide the same module: keep only the GPU build.
        pip uninstall -y onnxruntime; \
        pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.18"; \
    fi
# 3. The code, installed without resolving again; then the server must import.
COPY pyproject.toml README.md ./
COPY core ./core
COPY models ./models
COPY weights ./weights
COPY training ./training
COPY inference ./inference
COPY export ./export
COPY service ./service
COPY medplatform ./medplatform
RUN set -eux; \
    pip install --no-deps .; \
    python -c "import service.app"

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BENTOML_HOME=/tmp/bentoml \
    BENTOML_DO_NOT_TRACK=True \
    MEDREFINE_ARTIFACTS=/models/default \
    MEDREFINE_BACKEND=onnxruntime \
    MEDREFINE_DEVICE=auto \
    MEDREFINE_API_KEY_ENV=MEDREFINE_API_KEY \
    MEDREFINE_REQUIRE_API_KEY=1 \
    MEDREFINE_DATA_DIR=/tmp/medrefine
# The platform's SQLite database and blobs live under MEDREFINE_DATA_DIR: in the read-only image that is the
# /tmp tmpfs, lost with the container; point it at a volume, or MEDREFINE_DB_URL / MEDREFINE_S3_BUCKET at
# shared services, to keep datasets, jobs and model versions (deploy/platform does).
RUN useradd --system --uid 10001 --user-group --home-dir /home/medrefine --create-home medrefine
COPY --from=build /opt/venv /opt/venv
# Model artifacts (`make export` writes both): owned by root, read-only for the service user. The
# generators beside the segmentation model are found by MEDREFINE_GENERATORS=auto (the default).
COPY --chown=root:root --chmod=0555 artifacts/default /models/default
COPY --chown=root:root --chmod=0555 artifacts/generators /models/generators
WORKDIR /home/medrefine
USER medrefine
EXPOSE 3000 8001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4).status == 200 else 1)"]
# No --backend: MEDREFINE_BACKEND chooses the engine (onnxruntime above; openvino in an EXTRAS=openvino image).
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "3000", "--grpc-port", "8001", "--artifacts", "/models/default", "--api-key-env", "MEDREFINE_API_KEY"]
