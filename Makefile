# tcli — the two commands a new user needs are `make demo` and `make test`.
# Everything installs into a local virtual environment (.venv); torch is pinned to the CPU build
# 2.13.0 so CI and laptops never pull multi-GB CUDA wheels.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.tcli-installed
TORCH  ?= torch==2.13.0
DATA   ?= ../shared/data

.PHONY: install test demo demo-pipeline bench test-vllm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH)"
	$(PIP) install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	bash examples/demo.sh

demo-pipeline: install
	bash examples/pipeline_demo.sh

bench: install
	$(PY) bench/bench_tree.py

# vllm is an optional extra in its own environment (it pins transformers < 5.20).
VLLM_VENV ?= .venv-vllm
test-vllm:
	bash examples/vllm/install.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs build *.egg-info
