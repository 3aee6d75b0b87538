# One entry point for everything. `make install` once, then `make run` or `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
PY := $(BIN)/python
export PATH := $(abspath $(BIN)):$(PATH)
# Compiled through gpubroker/protos (a link to protos/), so the generated imports read
# `from gpubroker.protos import task_pb2`.
PROTOS := $(wildcard gpubroker/protos/*.proto)

.PHONY: install protos check-protos lint format typecheck test test-fast run bench cost migrate certs clean all

all: check-protos lint test

$(PY):
	$(PYTHON) -m venv $(VENV)

# constraints.txt keeps torch on the local CPU wheel; GPU VMs install without it.
install: $(PY)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'

protos:
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
	    --mypy_out=quiet:. --mypy_grpc_out=quiet:. $(PROTOS)

check-protos: protos
	git diff --exit-code -- protos/
	@test -z "$$(git status --porcelain -- protos/)" || { git status --porcelain -- protos/; exit 1; }

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck:
	$(BIN)/mypy

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

run:
	$(PY) examples/sample_job.py

bench:
	$(PY) -m bench

# The autoscaler's cost against baselines on simulated traces (bench/cost, docs/cost.md).
cost:
	$(PY) -m bench.cost

migrate:
	$(PY) -m gpubroker.billing migrate

# Development CA, broker and client/agent certificates (broker/certs.py). The server
# certificate covers CERT_HOSTS: `make certs CERT_HOSTS=localhost,127.0.0.1,10.0.0.5`.
CERT_HOSTS ?= localhost,127.0.0.1,::1
certs:
	$(PY) -m gpubroker.broker.certs --out certs/ --hosts $(CERT_HOSTS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info gpubroker-data
