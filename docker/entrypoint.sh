#!/usr/bin/env bash
# Entrypoint of the early-exit TorchServe image.
#
#   entrypoint.sh serve         (default) check the configuration, then run TorchServe in the foreground
#   entrypoint.sh check         only check, print the effective configuration; exit 0 = `serve` would start
#   entrypoint.sh healthcheck   exit 0 when every registered model has a READY worker (Docker HEALTHCHECK,
#                               Kubernetes probes); reads the management key from key_file.json
#   entrypoint.sh key [KIND]    print the current inference (or management) token
#   entrypoint.sh CMD ...       run anything else (bash, torchserve --help, ...)
#
# The container config is serving/config.properties with the container's own addresses and paths put
# over it (rendered to $EE_RUNTIME_CONFIG): inference and metrics on all interfaces (ports 8080, 8082),
# management and gRPC on loopback only (not published), token authorization on.
#
# Environment (defaults in brackets):
#   EE_HOME            [/home/model-server]  working directory: key_file.json is written here
#   EE_BASE_CONFIG     [$EE_HOME/serving/config.properties]
#   EE_METRICS_CONFIG  [$EE_HOME/serving/metrics.yaml]
#   EE_LOG_CONFIG      [$EE_HOME/serving/log4j2.xml]
#   EE_MODEL_STORE     [$EE_HOME/model-store]  the .mar archives (baked in, or a mounted volume)
#   EE_MODELS          [all]  TorchServe load_models: all, or a comma list of NAME.mar / NAME=NAME.mar
#   EE_RUNTIME_CONFIG  [$EE_HOME/run/config.properties]
#   EE_MANAGEMENT_PORT [8081]  loopback port of the management API (the healthcheck asks it)
#   EE_TOKEN_AUTH      [on]  "off-behind-gateway" turns TorchServe's per-process tokens off; only for
#                      replicas whose inference port is reachable solely through an authenticating
#                      gateway (see deploy/k8s): every replica has its own random key otherwise.
#   LOG_LOCATION       [$EE_HOME/logs]
set -euo pipefail

EE_HOME="${EE_HOME:-/home/model-server}"
EE_BASE_CONFIG="${EE_BASE_CONFIG:-$EE_HOME/serving/config.properties}"
EE_METRICS_CONFIG="${EE_METRICS_CONFIG:-$EE_HOME/serving/metrics.yaml}"
EE_LOG_CONFIG="${EE_LOG_CONFIG:-$EE_HOME/serving/log4j2.xml}"
EE_MODEL_STORE="${EE_MODEL_STORE:-$EE_HOME/model-store}"
EE_MODELS="${EE_MODELS:-all}"
EE_RUNTIME_CONFIG="${EE_RUNTIME_CONFIG:-$EE_HOME/run/config.properties}"
EE_TOKEN_AUTH="${EE_TOKEN_AUTH:-on}"
export LOG_LOCATION="${LOG_LOCATION:-$EE_HOME/logs}"
export METRICS_LOCATION="${METRICS_LOCATION:-$LOG_LOCATION}"

INFERENCE_PORT=8080
MANAGEMENT_PORT="${EE_MANAGEMENT_PORT:-8081}"   # loopback only, never published
METRICS_PORT=8082
# Model metrics the alert rules and the Grafana dashboard query (monitoring/).
REQUIRED_MODEL_METRICS="EarlyExitCount ComputeSpentMFLOPs ComputeFullMFLOPs RequestsRejected RequestLatencySeconds StageTimeMs StageRuns StageRows"
# Keys the container sets itself; the base config's values for them are dropped.
OVERRIDDEN_KEYS="inference_address|management_address|metrics_address|grpc_inference_address|grpc_management_address|model_store|metrics_config|load_models|disable_token_authorization"

PYTHON="$(command -v python3 || command -v python || true)"

log() { printf '[entrypoint] %s\n' "$*" >&2; }

# Last value of KEY in a Java properties file (later lines win, as in java.util.Properties).
prop() {
  sed -n -E "s/^[[:space:]]*$1[[:space:]]*[=:][[:space:]]*//p" "$2" | tail -n 1 | sed -E 's/[[:space:]]+$//'
}

render_config() {
  mkdir -p "$(dirname "$EE_RUNTIME_CONFIG")"
  {
    grep -v -E "^[[:space:]]*(${OVERRIDDEN_KEYS})[[:space:]]*[=:]" "$EE_BASE_CONFIG" || true
    cat <<EOF

# ---- set by docker/entrypoint.sh for the container ----
inference_address=http://0.0.0.0:${INFERENCE_PORT}
metrics_address=http://0.0.0.0:${METRICS_PORT}
management_address=http://127.0.0.1:${MANAGEMENT_PORT}
grpc_inference_address=127.0.0.1
grpc_management_address=127.0.0.1
model_store=${EE_MODEL_STORE}
metrics_config=${EE_METRICS_CONFIG}
load_models=${EE_MODELS}
EOF
    if [[ "$EE_TOKEN_AUTH" == "off-behind-gateway" ]]; then
      echo "disable_token_authorization=true"
    else
      echo "disable_token_authorization=false"
    fi
  } > "$EE_RUNTIME_CONFIG"
}

# Every problem is reported, then the check fails once.
check() {
  local errors=() cfg="$EE_RUNTIME_CONFIG"
  for f in "$EE_BASE_CONFIG" "$EE_METRICS_CONFIG" "$EE_LOG_CONFIG"; do
    [[ -r "$f" ]] || errors+=("missing file: $f")
  done
  if [[ ${#errors[@]} -gt 0 ]]; then
    printf '[entrypoint] config check FAILED: %s\n' "${errors[@]}" >&2
    return 2
  fi
  render_config

  case "$EE_TOKEN_AUTH" in
    on) [[ "$(prop disable_token_authorization "$cfg")" == "false" ]] \
          || errors+=("token authorization must stay on (disable_token_authorization=false)")
        if [[ "$(prop enable_envvars_config "$cfg")" == "true" && "${TS_DISABLE_TOKEN_AUTHORIZATION:-}" == "true" ]]; then
          errors+=("TS_DISABLE_TOKEN_AUTHORIZATION=true would turn token authorization off")
        fi ;;
    off-behind-gateway) log "WARNING: token authorization is OFF (EE_TOKEN_AUTH=off-behind-gateway): the inference" \
                            "port must only be reachable through an authenticating gateway" ;;
    *) errors+=("EE_TOKEN_AUTH must be 'on' or 'off-behind-gateway', got '$EE_TOKEN_AUTH'") ;;
  esac
  [[ "$(prop enable_model_api "$cfg")" != "true" ]] \
    || errors+=("enable_model_api=true lets any management caller register arbitrary model code: keep it off")
  [[ "$(prop management_address "$cfg")" =~ ^https?://(127\.0\.0\.1|localhost): ]] \
    || errors+=("management_address must bind to loopback, got '$(prop management_address "$cfg")'")
  [[ "$(prop inference_address "$cfg")" == "http://0.0.0.0:${INFERENCE_PORT}" ]] \
    || errors+=("inference_address must be http://0.0.0.0:${INFERENCE_PORT} (the EXPOSEd port)")
  [[ "$(prop metrics_address "$cfg")" == "http://0.0.0.0:${METRICS_PORT}" ]] \
    || errors+=("metrics_address must be http://0.0.0.0:${METRICS_PORT} (the EXPOSEd port)")
  [[ "$(prop metrics_mode "$cfg")" == "prometheus" ]] \
    || errors+=("metrics_mode must be prometheus (Prometheus scrapes :${METRICS_PORT}/metrics), got '$(prop metrics_mode "$cfg")'")

  if [[ -z "$PYTHON" ]]; then
    errors+=("no python3 on PATH")
  elif ! out="$("$PYTHON" - "$EE_METRICS_CONFIG" $REQUIRED_MODEL_METRICS 2>&1 <<'PY'
import sys
import yaml

path, required = sys.argv[1], sys.argv[2:]
doc = yaml.safe_load(open(path))
declared = {m["name"] for kind in (doc.get("model_metrics") or {}).values() for m in kind or []}
missing = [name for name in required if name not in declared]
if missing:
    sys.exit(f"{path} does not declare the model metrics {missing} (TorchServe drops undeclared metrics)")
PY
)"; then
    errors+=("metrics config: ${out##*$'\n'}")
  fi

  if [[ ! -d "$EE_MODEL_STORE" ]]; then
    errors+=("model store $EE_MODEL_STORE does not exist: mount one, or build the image after 'make train-export'")
  elif [[ "${EE_MODELS,,}" == "all" ]]; then
    compgen -G "$EE_MODEL_STORE/*.mar" >/dev/null \
      || errors+=("no .mar archive in $EE_MODEL_STORE: run 'make train-export' before 'docker build', or mount a model store")
  else
    IFS=',' read -r -a wanted <<< "$EE_MODELS"
    for m in "${wanted[@]}"; do
      m="${m#*=}"; m="${m// /}"
      [[ -f "$EE_MODEL_STORE/$m" ]] || errors+=("EE_MODELS names $m, which is not in $EE_MODEL_STORE")
    done
  fi

  command -v torchserve >/dev/null || errors+=("torchserve is not on PATH")
  command -v java >/dev/null || errors+=("java is not on PATH (TorchServe's frontend needs a JRE >= 17)")
  mkdir -p "$LOG_LOCATION" 2>/dev/null && [[ -w "$LOG_LOCATION" ]] || errors+=("LOG_LOCATION $LOG_LOCATION is not writable")
  [[ -w "$EE_HOME" ]] || errors+=("$EE_HOME is not writable (TorchServe writes key_file.json there)")

  if [[ ${#errors[@]} -gt 0 ]]; then
    printf '[entrypoint] config check FAILED: %s\n' "${errors[@]}" >&2
    return 2
  fi
  log "config check passed: token auth ${EE_TOKEN_AUTH}, models ${EE_MODELS} from ${EE_MODEL_STORE}, config ${cfg}"
}

key() {
  local kind="${1:-inference}"
  "$PYTHON" - "$EE_HOME/key_file.json" "$kind" <<'PY'
import json
import sys

path, kind = sys.argv[1], sys.argv[2]
try:
    print(json.load(open(path))[kind]["key"])
except FileNotFoundError:
    sys.exit(f"{path} does not exist: TorchServe is not running, or token authorization is off")
PY
}

healthcheck() {
  "$PYTHON" - "$EE_HOME/key_file.json" "$MANAGEMENT_PORT" <<'PY'
import json
import sys
import urllib.parse
import urllib.request

key_file, port = sys.argv[1], sys.argv[2]
try:
    key = json.load(open(key_file))["management"]["key"]
    headers = {"Authorization": f"Bearer {key}"}
except FileNotFoundError:
    headers = {}  # token authorization off


def get(path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(req, timeout=4) as resp:
        return json.load(resp)


try:
    models = get("/models")["models"]
    if not models:
        sys.exit("unhealthy: no model registered")
    for model in models:
        desc = get("/models/" + urllib.parse.quote(model["modelName"]))
        workers = [w for version in desc for w in version.get("workers", [])]
        if not any(w.get("status") == "READY" for w in workers):
            sys.exit(f"unhealthy: no READY worker for {model['modelName']}")
except Exception as exc:  # connection refused, 4xx/5xx, malformed answer
    sys.exit(f"unhealthy: {exc}")
print("healthy")
PY
}

serve() {
  check
  cd "$EE_HOME"
  log "starting TorchServe: inference :${INFERENCE_PORT}, metrics :${METRICS_PORT}/metrics"
  [[ "$EE_TOKEN_AUTH" == "on" ]] && log "token authorization is on: '$0 key' prints the inference token"
  torchserve --start --foreground --ncs --ts-config "$EE_RUNTIME_CONFIG" --log-config "$EE_LOG_CONFIG" &
  local pid=$!
  trap 'log "stopping TorchServe"; torchserve --stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true' TERM INT
  wait "$pid" || true
  wait "$pid" 2>/dev/null || true  # a trapped signal interrupts the first wait
}

cmd="${1:-serve}"
case "$cmd" in
  serve) serve ;;
  check) check && cat "$EE_RUNTIME_CONFIG" ;;
  healthcheck) healthcheck ;;
  key) shift; key "$@" ;;
  *) exec "$@" ;;
esac
