# syntax=docker/dockerfile:1
# TorchServe image of the early-exit server.
#
#   make train-export                                  # puts model_store/<name>.mar in place first
#   docker build -t early-exit-serve:cpu .             # CPU (onnxruntime)
#   docker build --build-arg VARIANT=gpu -t early-exit-serve:gpu .   # CUDA base, onnxruntime-gpu
#   docker run --rm -p 8080:8080 -p 8082:8082 early-exit-serve:cpu
#
# Inference on 8080 (token authorization on: `docker exec <container> /home/model-server/docker/entrypoint.sh key`
# prints the inference token), Prometheus metrics on 8082/metrics. The management API listens on the
# container's loopback only and is not exposed. Runs as the unprivileged user model-server (uid 10001).

ARG VARIANT=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
ARG GPU_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${CPU_BASE} AS base-cpu
FROM ${GPU_BASE} AS base-gpu
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# DL3006 (untagged image): base-${VARIANT} is one of the two stages above, not an image; hadolint cannot
# resolve the variable. The real bases are pinned by tag in CPU_BASE / GPU_BASE.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
# Python 3.11 comes from the CPU base; on the CUDA base uv installs a standalone 3.11.
ARG PYTHON_VERSION=3.11
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_GPU_INDEX=https://download.pytorch.org/whl/cu128
ARG ORT_CPU=onnxruntime==1.32.0
ARG ORT_GPU=onnxruntime-gpu==1.31.1

# A JRE for TorchServe's frontend (the man1 folder is missing on slim images and breaks the JRE's postinst).
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY docker/requirements.txt /tmp/requirements.txt
# torch first from the variant's PyTorch index (CPU wheels are ~10x smaller), then the pinned rest and the
# variant's onnxruntime. Never both onnxruntime and onnxruntime-gpu: they provide the same module.
RUN set -eux; \
    case "$VARIANT" in \
      cpu) torch_index="$TORCH_CPU_INDEX"; ort="$ORT_CPU" ;; \
      gpu) torch_index="$TORCH_GPU_INDEX"; ort="$ORT_GPU" ;; \
      *) echo "VARIANT must be cpu or gpu, got $VARIANT" >&2; exit 1 ;; \
    esac; \
    uv venv --python "$PYTHON_VERSION" /opt/venv; \
    uv pip install --extra-index-url "$torch_index" "$(grep -E '^torch==' /tmp/requirements.txt)"; \
    uv pip install -r /tmp/requirements.txt "$ort"; \
    python -c "import onnxruntime, torch, ts; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"; \
    rm /tmp/requirements.txt

# workflow-store: TorchServe's workflow store, empty and root-owned without write permission, so no workflow
# archive can be found or downloaded there (serving.server checks it).
RUN useradd --create-home --home-dir /home/model-server --uid 10001 --user-group --shell /usr/sbin/nologin model-server \
 && install -d -o root -g root -m 0555 /home/model-server/workflow-store
WORKDIR /home/model-server

# Configuration, the launcher (serving.server, which checks the handler's metric specs in serving.metrics, which
# escapes client text with serving.rejections)
# and the entrypoint belong to root (read-only for the server); logs, keys and the rendered config go to the
# user's home. The handler itself rides inside each .mar.
COPY serving/__init__.py serving/server.py serving/metrics.py serving/rejections.py serving/config.properties serving/metrics.yaml serving/log4j2.xml serving/
COPY --chmod=0755 docker/entrypoint.sh docker/entrypoint.sh
# Archives built by `make train-export`; a volume mounted here replaces them.
COPY model_store/ model-store/

# Numeric, so Kubernetes' runAsNonRoot can verify it without the image's /etc/passwd.
USER 10001:10001
# serving.server reads these (and the other EE_* settings docker/entrypoint.sh lists). EE_MODEL_SHA256 (each
# archive's pinned sha256) has no default here: it belongs to the deployment (compose environment, a ConfigMap),
# and `serve` refuses to start without it.
ENV EE_HOME=/home/model-server \
    EE_MODEL_STORE=/home/model-server/model-store \
    EE_WORKFLOW_STORE=/home/model-server/workflow-store

# 8080 inference, 8082 Prometheus metrics. Not 8081 (management) nor 7070/7071 (gRPC): loopback only.
EXPOSE 8080 8082

HEALTHCHECK --interval=30s --timeout=10s --start-period=90s --retries=3 \
  CMD ["/home/model-server/docker/entrypoint.sh", "healthcheck"]

ENTRYPOINT ["/home/model-server/docker/entrypoint.sh"]
CMD ["serve"]
