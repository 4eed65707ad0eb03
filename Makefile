# Two commands on a fresh machine with Python 3.11 (see README):
#   make serve   serving install only in .venv, then the shipped model on http://127.0.0.1:8000
#   make test    everything in .venv (serving + train extra + dev group), lint, then the whole suite
# Every install is pinned by constraints.txt. The .venv is (re)built only when pyproject.toml or
# constraints.txt change (stamp files); `make clean` removes it.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := constraints.txt
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# The recipe of the shipped model (`make train` reruns it, about 35 min on 2 cores): the final fit,
# a grouped 5-fold cross-validation of the same recipe, then a re-export adding the CV figures.
DATA ?= ../shared/data/ballscrew-pitting
MODEL_OUT ?= models/ballscrew-pitting
RECIPE ?= --group-column location
SOURCE ?= ballscrew-pitting: BSData (Schlagenhauf, Landwehr, Fleischer 2021, arXiv:2103.13003), downscaled subset
# Builds use the host's network (engines without a bridge network, see README).
COMPOSE ?= docker compose -f docker-compose.yml -f docker-compose.build.yml
IMAGE ?= defect-inspection:latest
BASE_IMAGE ?= python:3.11-slim
# Folders mypy checks: those that exist and hold Python files (mypy fails on an empty one).
MYPY_PATHS = $(foreach d,app training tests bench,$(if $(wildcard $(d)/*.py),$(d)))


.PHONY: help venv serve test lint train bench docker-build docker-build-gpu docker-train up down logs image-size clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

# --- virtual environment ------------------------------------------------------------------------

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))' \
		|| { echo "Python 3.11 or 3.12 is needed (found: $$($(PYTHON) --version 2>&1)); set PYTHON=..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }
	@# pip >= 25.1 understands `--group dev`; the version comes from constraints.txt.
	$(PIP) install --quiet --upgrade -c $(CONSTRAINTS) pip || { rm -rf $(VENV); exit 1; }

$(VENV)/.serve.stamp: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e .
	@touch $@

$(VENV)/.dev.stamp: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[train]' --group dev
	@touch $@ $(VENV)/.serve.stamp

venv: $(VENV)/.dev.stamp ## .venv with everything (serving + train extra + dev group), nothing run

# --- the two headline commands ------------------------------------------------------------------

serve: $(VENV)/.serve.stamp ## serving install, then the shipped model on http://127.0.0.1:8000 (HOST=, PORT=)
	$(BIN)/defect-serve --host $(HOST) --port $(PORT)

test: lint ## full install, lint (ruff, mypy, hadolint, compose), then the whole pytest suite
	@# pytest exits 5 when it collected no test: say so loudly instead of failing the run.
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected (exit 5)"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; fi

lint: $(VENV)/.dev.stamp ## ruff check + format check, mypy (strict), hadolint, docker compose config
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_PATHS)
	$(BIN)/hadolint Dockerfile
	@if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then \
		echo "$(COMPOSE) --profile gpu --profile train config -q"; \
		$(COMPOSE) --profile gpu --profile train config -q; \
	else echo "docker compose not found: compose file not validated"; fi

# --- training -----------------------------------------------------------------------------------

train: $(VENV)/.dev.stamp ## reproduce the shipped model: fit, grouped 5-fold CV, export with CV figures
	$(BIN)/python -m training train --data $(DATA) --out $(MODEL_OUT) --name $(notdir $(MODEL_OUT)) \
		$(RECIPE) --source "$(SOURCE)" --licence "CC BY-SA 4.0"
	$(BIN)/python -m training evaluate --data $(DATA) --out $(MODEL_OUT)/cv $(RECIPE) \
		--breakdown capture --cv-folds 5
	$(BIN)/python -m training export --model-dir $(MODEL_OUT) --cv-report $(MODEL_OUT)/cv/report.json

bench: $(VENV)/.dev.stamp ## throughput: service vs onnxruntime ceiling vs naive Keras, one run (~4 min, idle machine)
	$(BIN)/python -m bench.throughput

# --- containers ---------------------------------------------------------------------------------

docker-build: ## build the serving image (defect-inspection:latest)
	$(COMPOSE) build api

docker-build-gpu: ## build the CUDA serving image (onnxruntime-gpu)
	$(COMPOSE) --profile gpu build api-gpu

docker-train: ## train in the container: DATA_DIR=... [TRAIN_COMMAND="train ..."]
	TRAIN_USER="$$(id -u):$$(id -g)" $(COMPOSE) --profile train run --rm --build train

up: ## docker compose up: build, start, wait until ready (http://127.0.0.1:8000)
	$(COMPOSE) up --build --detach --wait
	@echo "serving on http://127.0.0.1:$${HOST_PORT:-8000} (make logs, make down)"

down: ## stop and remove the compose services
	$(COMPOSE) down --remove-orphans

logs: ## follow the service logs
	$(COMPOSE) logs --follow

image-size: ## size of the serving image, and what it adds to the base image
	@img=$$(docker image inspect -f '{{.Size}}' $(IMAGE)); base=$$(docker image inspect -f '{{.Size}}' $(BASE_IMAGE)); \
	echo "$(IMAGE): $$((img / 1000000)) MB; $(BASE_IMAGE): $$((base / 1000000)) MB; added: $$(((img - base) / 1000000)) MB"

clean: ## remove .venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
