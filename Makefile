# Robust early-exit inference server. The two commands a new user needs:
#   make train-export   set up, get data, train (PRESET), evaluate + calibrate, export, archive
#   make test           the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

PRESET ?= mnist-quick
NAME   ?= $(firstword $(subst -, ,$(PRESET)))
RUN    := runs/$(PRESET)
CKPT   := $(RUN)/checkpoint.pt
EVAL   := $(RUN)/eval/eval.json
CALIB  := $(RUN)/calibration.json
EXPORT := artifacts/export/$(NAME)
MAR    := model_store/$(NAME).mar
DATASET = $(shell sed -n 's/^dataset: *//p' training/configs/$(PRESET).yaml)
FORCE  ?=

.PHONY: help setup data train evaluate export archive train-export test test-unit test-integration \
        bench-train bench-serve bench-export bench-compute serve stop clean audit

help:
	@echo "make train-export [PRESET=mnist-quick]   train, evaluate, calibrate, export and archive a model"
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
# Artifacts flow one way: train -> checkpoint.pt; evaluate -> calibration.json beside it + eval/; export reads
# both -> artifacts/export/NAME -> model_store/NAME.mar. The archive also depends on the code it ships or that
# builds it, so editing the handler and running `make train-export` or `make serve` never serves a stale one.
ARCHIVE_SOURCES := $(wildcard serving/*.py serving/*.yaml early_exit/*.py export/*.py)
ifneq ($(FORCE),)
.PHONY: $(CKPT) $(EVAL) $(MAR)
endif

$(CKPT): training/configs/$(PRESET).yaml | $(STAMP)
	$(PY) -m training.data --root data $(DATASET)
	$(PY) -m training.train --preset $(PRESET) $(if $(FORCE),,--resume)

$(EVAL): $(CKPT)
	$(PY) -m training.evaluate $(CKPT)

$(MAR): $(EVAL) $(ARCHIVE_SOURCES)
	$(PY) -m export --checkpoint $(CKPT) --name $(NAME) --out-dir $(EXPORT) --model-store model_store \
		--data-dir data --force

train: $(CKPT)
evaluate: $(EVAL)
export: $(MAR)

# Re-export and re-archive the existing checkpoint and calibration (no training, no evaluation).
archive: $(STAMP)
	@test -f $(CKPT) && test -f $(CALIB) || { echo "no $(CKPT) + $(CALIB): run make train-export PRESET=$(PRESET)"; exit 2; }
	$(PY) -m export --checkpoint $(CKPT) --name $(NAME) --out-dir $(EXPORT) --model-store model_store \
		--data-dir data --force

train-export: $(MAR)
	@echo
	@echo "Archive: $(MAR)   (evaluation: $(EVAL), plots beside it)"
	@echo "Serve it with:  make serve NAME=$(NAME)"

# --- tests -------------------------------------------------------------------
test: setup
	$(PY) -m pytest tests -q

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration -q

# --- benchmarks ----------------------------------------------------------------
bench-train: $(STAMP)
	$(PY) -m training.data --root data mnist
	$(PY) -m bench.bench_train --preset mnist-quick

# Where compute dominates: the CIFAR multi-exit ResNet (random weights) served per forced exit vs the full graph.
bench-compute: $(STAMP)
	$(PY) -m bench.bench_compute

# The export's own parity and robustness report (written beside the graphs), published with the benchmarks.
bench-export: $(MAR)
	cp $(EXPORT)/export-parity.json bench/results/export-parity.json

bench-serve: $(MAR)
	$(PY) -m bench.bench_serve --archive $(MAR) --data-dir data

# --- serving -------------------------------------------------------------------
# TOKEN_AUTH=off for local work without the bearer token (the shipped configuration keeps it on).
# The archive's sha256 is pinned to the one just built (a deployment pins it in its configuration instead).
serve: $(STAMP) $(MAR)
	$(PY) -m serving.server start --model-store model_store --models $(NAME).mar $(if $(filter off,$(TOKEN_AUTH)),--no-token-auth) \
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
	rm -rf runs artifacts model_store/*.mar .serve logs
