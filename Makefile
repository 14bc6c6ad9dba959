# Robust early-exit inference server. The two commands a new user needs:
#   make train-export   set up, get data, train (PRESET), calibrate, evaluate, export, archive
#   make test           the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# PRESET: a preset of training/configs/ (mnist-quick) or the path of your own YAML file of config keys
# (/home/me/my-photos.yaml: a word holding a '/' or ending in .yaml/.yml is a file). Relative paths inside it
# (data_dir, ...) are taken from the repository root, where make runs. NAME, the run's name, is the file's `name:`
# key, else the preset's name (a file's stem: my-photos); it names the run (runs/NAME), the archive
# (model_store/NAME.mar) and the served model (/predictions/NAME), so two presets never share an archive.
# NAME=x on the command line renames the run; NAME from the environment is ignored (WSL sets it to the host).
# `make serve NAME=x` without PRESET finds the run's preset: training/configs/x.yaml, else runs/x/config.yaml.
ifeq ($(origin PRESET)$(origin NAME),undefinedcommand line)
PRESET := $(if $(wildcard training/configs/$(NAME).yaml),$(NAME),$(firstword $(wildcard runs/$(NAME)/config.yaml) $(NAME)))
PRESET_FROM_NAME := 1
endif
PRESET ?= mnist-quick
PRESET_FILE := $(if $(or $(findstring /,$(PRESET)),$(filter %.yaml %.yml,$(PRESET))),$(PRESET),training/configs/$(PRESET).yaml)
# A top-level key of the preset file as written (surrounding quotes and a trailing comment dropped); empty if absent.
preset_key = $(shell sed -n 's/^$(1):[[:space:]]*//p' '$(PRESET_FILE)' 2>/dev/null | head -n 1 \
	| sed -e 's/[[:space:]]\{1,\}\#.*//' -e 's/^["'"'"']\(.*\)["'"'"'][[:space:]]*$$/\1/')
ifneq ($(origin NAME),command line)
NAME   := $(or $(call preset_key,name),$(patsubst %.yml,%,$(patsubst %.yaml,%,$(notdir $(PRESET_FILE)))))
endif
OUT_DIR := $(or $(call preset_key,out_dir),runs)
RUN    := $(OUT_DIR)/$(NAME)
CKPT   := $(RUN)/checkpoint.pt
EVAL   := $(RUN)/eval/eval.json
CALIB  := $(RUN)/calibration.json
EXPORT := artifacts/export/$(NAME)
MAR    := model_store/$(NAME).mar
TIMINGS := $(RUN)/timings.tsv
SESSION := $(shell date +%s%N)
# `$(TIMED) STEP -- CMD` runs CMD and appends its wall time to $(TIMINGS) under this make run's SESSION.
TIMED   = $(PY) -m training.step_times run --file $(TIMINGS) --session $(SESSION) --step
PIPELINE_STEPS := data train calibrate evaluate export
DATASET := $(or $(call preset_key,dataset),mnist)
DATA_DIR := $(call preset_key,data_dir)
# What the data step prepares: the preset's dataset; for an image folder, the shared archive its data_dir unpacks
# from when it is a missing folder under data/ (data_dir: data/cifar10-jpeg/train -> cifar10-jpeg), else nothing
# (your own folder).
PRESET_DATA := $(if $(filter imagefolder,$(DATASET)),$(if $(and $(filter data,$(firstword $(subst /, ,$(DATA_DIR)))),\
	$(if $(wildcard $(DATA_DIR)),,missing)),$(word 2,$(subst /, ,$(DATA_DIR)))),$(DATASET))
PORT   ?= 8080
# The goals that read the run: a missing preset file or a name TorchServe would refuse stops them at once (one line).
RUN_GOALS := train calibrate evaluate export archive train-export serve bench-export bench-serve
ifneq ($(filter $(RUN_GOALS),$(MAKECMDGOALS)),)
ifneq ($(shell printf '%s' '$(NAME)' | grep -xE '[A-Za-z0-9][A-Za-z0-9_-]*'),$(NAME))
$(error NAME '$(NAME)' may hold only letters, digits, '-' and '_' (it names runs/NAME, model_store/NAME.mar and /predictions/NAME): set name: in the preset)
endif
ifeq ($(wildcard $(PRESET_FILE)),)
ifdef PRESET_FROM_NAME
$(error no run runs/$(NAME) and no preset training/configs/$(NAME).yaml: make train-export PRESET=<your preset file> first)
else
$(error no preset file $(PRESET_FILE): PRESET is one of $(patsubst training/configs/%.yaml,%,$(wildcard training/configs/*.yaml)) or the path of your own YAML file)
endif
endif
endif
FORCE  ?=

.PHONY: help setup data train calibrate evaluate export archive train-export test test-unit test-integration \
        bench-train bench-serve bench-export bench-compute serve stop clean audit

help:
	@echo "make train-export [PRESET=mnist-quick]   train, calibrate, evaluate, export and archive a model"
	@echo "                  [PRESET=path/to/my.yaml]  your own preset file (archive: model_store/my.mar)"
	@echo "make test                                 run the whole test suite"
	@echo "make archive                              re-export the trained checkpoint (no retraining)"
	@echo "make serve / make stop                    start / stop TorchServe on model_store/ (builds the archive)"
	@echo "make bench-train / make bench-serve       benchmarks (write bench/results/*.json)"
	@echo "make bench-compute / make bench-export    compute-bound serving (CIFAR ResNet); the export's parity report"

# --- environment -----------------------------------------------------------
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Debian packages the tests also need: prometheus + promtool (the monitoring tests), wrk (the serving
# benchmark's load generator, bench/wrk.py) and haproxy (the front door, deploy/proxy; tests/integration/test_proxy.py). Installed here when running as root with apt-get, otherwise the
# command to run is printed and setup goes on.
SYSTEM_PACKAGES := prometheus wrk haproxy
SYSTEM_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES)
setup: $(STAMP)
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v wrk >/dev/null \
	    && command -v haproxy >/dev/null; then \
	  echo "prometheus, promtool, wrk and haproxy: $$(command -v prometheus), $$(command -v promtool), $$(command -v wrk), $$(command -v haproxy)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing what the tests need beside Python: $(SYSTEM_INSTALL)"; \
	  $(SYSTEM_INSTALL) >/dev/null \
	    || echo "WARNING: installing $(SYSTEM_PACKAGES) failed; make test needs them: $(SYSTEM_INSTALL)"; \
	else \
	  echo "WARNING: prometheus/promtool, wrk or haproxy are missing and make test needs them; install them with:"; \
	  echo "  sudo sh -c '$(SYSTEM_INSTALL)'"; \
	fi

data: $(STAMP)
	$(PY) -m training.data --root data mnist fashion-mnist

# --- the pipeline: each step is skipped when its output is newer than its inputs (FORCE=1 redoes it) ---
# Artifacts flow one way, each step reading the one before it: train -> checkpoint.pt; calibrate ->
# calibration.json beside it; evaluate (checkpoint + calibration) -> eval/; export (checkpoint, calibration,
# eval/eval.json) -> artifacts/export/NAME -> model_store/NAME.mar. The archive also depends on the code it
# ships or that builds it, so editing the handler and running `make train-export` or `make serve` never
# serves a stale one.
ARCHIVE_SOURCES := $(wildcard serving/*.py serving/*.yaml early_exit/*.py export/*.py)
ifneq ($(FORCE),)
.PHONY: $(CKPT) $(CALIB) $(EVAL) $(MAR)
endif

$(CKPT): $(PRESET_FILE) | $(STAMP)
	$(if $(PRESET_DATA),$(TIMED) data -- $(PY) -m training.data --root data $(PRESET_DATA))
	$(TIMED) train -- $(PY) -m training.train --preset $(PRESET) name=$(NAME) out_dir=$(OUT_DIR) $(if $(FORCE),,--resume)

$(CALIB): $(CKPT)
	$(TIMED) calibrate -- $(PY) -m training.calibrate $(CKPT)

$(EVAL): $(CALIB)
	$(TIMED) evaluate -- $(PY) -m training.evaluate $(CKPT)

$(MAR): $(EVAL) $(CALIB) $(ARCHIVE_SOURCES)
	$(TIMED) export -- $(PY) -m export --checkpoint $(CKPT) --name $(NAME) --out-dir $(EXPORT) \
		--model-store model_store --data-dir data --force

train: $(CKPT)
calibrate: $(CALIB)
evaluate: $(EVAL)
export: $(MAR)

# Re-export and re-archive from the existing checkpoint, calibration and evaluation (none of them is redone).
archive: $(STAMP)
	@test -f $(CKPT) && test -f $(CALIB) && test -f $(EVAL) || \
		{ echo "no $(CKPT) + $(CALIB) + $(EVAL): run make train-export PRESET=$(PRESET)"; exit 2; }
	$(PY) -m export --checkpoint $(CKPT) --name $(NAME) --out-dir $(EXPORT) --model-store model_store \
		--data-dir data --force

train-export: $(MAR)
	@echo
	@echo "Archive: $(MAR)   (evaluation: $(EVAL), plots beside it)"
	@echo "Serve it with:  make serve $(if $(filter runs,$(OUT_DIR)),NAME=$(NAME),PRESET=$(PRESET))"
	@echo
	@$(PY) -m training.step_times table --file $(TIMINGS) --session $(SESSION) $(PIPELINE_STEPS)

# --- tests -------------------------------------------------------------------
test: setup
	$(PY) -m pytest tests -q

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration -q

# --- benchmarks ----------------------------------------------------------------
# The preset's data is prepared as for training (PRESET_DATA).
bench-train: $(STAMP)
	$(if $(PRESET_DATA),$(PY) -m training.data --root data $(PRESET_DATA))
	$(PY) -m bench.bench_train --preset $(PRESET)

# Where compute dominates: the CIFAR multi-exit ResNet (random weights) served per forced exit vs the full graph.
bench-compute: $(STAMP)
	$(PY) -m bench.bench_compute

# The export's own parity and robustness report (written beside the graphs), published with the benchmarks.
bench-export: $(MAR)
	cp $(EXPORT)/export-parity.json bench/results/export-parity.json

# Every preset also serves stock TorchServe without spinning (--stock-no-spin: the compute-bound and p99
# baseline). A photo preset (dataset: imagefolder) also sends the DeepSloth loads on the first ATTACKED test
# images (bench/photos.py, needs torch).
ATTACKED ?= 200
BENCH_SERVE_PHOTO = $(if $(filter imagefolder,$(DATASET)),--checkpoint $(CKPT) --attacked $(ATTACKED))
bench-serve: $(MAR)
	$(PY) -m bench.bench_serve --archive $(MAR) --data-dir data --stock-no-spin $(BENCH_SERVE_PHOTO)

# --- serving -------------------------------------------------------------------
# TOKEN_AUTH=off for local work without the bearer token (the shipped configuration keeps it on). PORT=8090:
# inference on 8090, management and metrics on the next two ports (another server can keep 8080).
# The archive's sha256 is pinned to the one just built (a deployment pins it in its configuration instead).
serve: $(STAMP) $(MAR)
	$(PY) -m serving.server start --model-store model_store --models $(NAME).mar --port $(PORT) $(if $(filter off,$(TOKEN_AUTH)),--no-token-auth) \
		--model-sha256 "$$($(PY) -m serving.server pin $(MAR) | cut -d= -f2-)"

stop: $(STAMP)
	$(PY) -m serving.server stop

# pip-audit (PyPI's vulnerability data; needs https://pypi.org) over the image's packages: docker/requirements.txt
# and the CPU variant's onnxruntime, resolved to exact versions by pip (their dependencies included). pip-audit
# runs from a throwaway venv in a temporary folder (removed afterwards), never from .venv; not part of `make test`.
# --strict: a package pip-audit could not look up fails the audit instead of passing unchecked.
audit:
	@set -euo pipefail; tmp=$$(mktemp -d -t ee-audit.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON_BOOT) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install -q pip-audit; \
	"$$tmp/venv/bin/pip" install -q --dry-run --ignore-installed --report "$$tmp/resolved.json" \
		-r docker/requirements.txt "$$(sed -n 's/^ARG ORT_CPU=//p' Dockerfile)"; \
	"$$tmp/venv/bin/python" -c 'import json, sys; [print(i["metadata"]["name"] + "==" + i["metadata"]["version"]) for i in json.load(open(sys.argv[1]))["install"]]' \
		"$$tmp/resolved.json" | sort > "$$tmp/resolved.txt"; \
	test -s "$$tmp/resolved.txt"; \
	echo "auditing $$(wc -l < "$$tmp/resolved.txt") packages: $$(tr '\n' ' ' < "$$tmp/resolved.txt")"; \
	"$$tmp/venv/bin/pip-audit" --strict --no-deps --disable-pip --desc off -r "$$tmp/resolved.txt"

clean:
	rm -rf runs artifacts model_store/*.mar model_store/*.mar.sha256 .serve logs
