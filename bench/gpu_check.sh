#!/usr/bin/env bash
# The one-shot GPU check, run as is on a machine with one CUDA GPU and no network (< 8 minutes):
#   1. tcli's dependencies that such a machine may lack (orjson, math-verify, ...) from the wheels
#      in .whl/ (`make gpu-wheels` fills it), never from an index;
#   2. the CUDA tests: graphed vs eager decode (tests/unit/test_cuda_graphs.py), then the hf-engine
#      tests (they take no device option: they pin the CPU and check that nothing changed there);
#   3. bench/bench_gpu.py: decode tokens/s eager vs graphed, tree vs independent per leaf,
#      train-step with and without prefix sharing, a demo loop step, and the PASS/FAIL targets.
# Exit status 0 only when every part passed; everything is printed either way.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false
status=0

echo "== environment"
$PY - <<'PY'
import sys, torch, transformers
print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY

if [ -d .whl ]; then
    echo "== wheels from .whl/"
    need=$($PY -c 'import importlib.util as u; print(" ".join(p for m, p in (("orjson", "orjson"), ("math_verify", "math-verify")) if u.find_spec(m) is None))')
    if [ -n "$need" ]; then
        $PY -m pip install -q --no-index --find-links .whl $need \
            || $PY -m pip install -q --no-index --find-links .whl --break-system-packages $need \
            || { echo "gpu_check: could not install $need from .whl/"; status=1; }
    fi
fi

echo "== CUDA tests"
timeout 100 $PY -m pytest -q -p no:cacheprovider -rs tests/unit/test_cuda_graphs.py || status=1
echo "== hf-engine tests"
timeout 80 $PY -m pytest -q -p no:cacheprovider tests/unit/test_sample_kvcache.py \
    tests/unit/test_entropy_branch.py tests/unit/test_sample_temperature.py || status=1

echo "== bench/bench_gpu.py"
PYTHONUNBUFFERED=1 timeout 300 $PY bench/bench_gpu.py --device cuda || status=1
echo "== gpu_check: exit $status"
exit $status
