#!/usr/bin/env bash
# Entrypoint of the early-exit TorchServe image: each subcommand is one `python -m serving.server` call, which
# holds the configuration rules, the readiness test and the key handling (serving/server.py).
#
#   entrypoint.sh serve         (default) check the configuration, start TorchServe, stay in the foreground
#                               until it exits or the container is stopped (SIGTERM stops TorchServe)
#   entrypoint.sh check         only check; print the effective configuration; exit 0 = `serve` would start
#                               (further arguments of serve and check go to serving.server, e.g. --port)
#   entrypoint.sh healthcheck   exit 0 when every registered model has a READY worker (Docker HEALTHCHECK,
#                               Kubernetes probes); one line on stderr otherwise
#   entrypoint.sh key [--kind inference|management|API]   print the current token
#   entrypoint.sh CMD ...       run anything else (bash, torchserve --help, ...)
#
# The container's listeners: inference and metrics on all interfaces (ports 8080, 8082, the EXPOSEd ones),
# management and gRPC on loopback only. serving.server reads its settings from the environment: EE_HOME (state
# folder: key_file.json, logs, the rendered config), EE_MODEL_STORE, EE_MODELS, EE_BASE_CONFIG,
# EE_METRICS_CONFIG, EE_LOG_CONFIG, EE_MANAGEMENT_PORT, EE_TOKEN_AUTH (`on`, or `off-behind-gateway` for
# replicas reachable only through an authenticating gateway, see deploy/k8s), EE_WORKFLOW_STORE and
# EE_MODEL_SHA256 (required: "NAME.mar=<sha256>,...", each served archive's digest as `python -m export` printed
# it; `serve` and `check` refuse an archive that does not match, and a container without a pin).
set -euo pipefail

# serving/ sits beside docker/ (the image's /home/model-server, or a checkout of the repository).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

cmd="${1:-serve}"
case "$cmd" in
  serve) shift; exec python -m serving.server start --bind 0.0.0.0 --foreground "$@" ;;
  check) shift; exec python -m serving.server check --bind 0.0.0.0 "$@" ;;
  healthcheck) exec python -m serving.server healthcheck ;;
  key) shift; exec python -m serving.server key "$@" ;;
  *) exec "$@" ;;
esac
