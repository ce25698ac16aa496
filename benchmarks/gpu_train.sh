#!/usr/bin/env bash
# Training throughput and MFU on one CUDA GPU: a 3B-shaped Qwen2.5-VL image SFT step with packing
# (bf16 autocast, flash attention when flash_attn is installed), mmzoo against transformers'
# Qwen2_5_VLForConditionalGeneration on the same packed row and weights (benchmarks/gpu_train.py).
# Installs nothing: run it with a Python that has mmzoo and its qwen2_5_vl plugin on a CUDA
# build of torch (see benchmarks/gpu_check.sh for an offline install). A few minutes. Memory, an
# estimate not yet measured: 60 GiB of fp32 weights, gradients and AdamW state for 3.75B
# parameters, plus activations and (transformers) full logits: --tokens 8192 (the default) is for
# an H200 or another GPU of 141 GiB; on 80 GiB GPUs start with --tokens 2048. A path that runs out
# of memory is a table row saying so.
# Usage: bash benchmarks/gpu_train.sh [gpu_train.py options, e.g. --tokens 4096 --peak-tflops 989.4]
#        GPU_TRAIN_DEVICE=cpu bash benchmarks/gpu_train.sh    rehearses it on CPU (tiny shape, ~1-2 min)
#        (PYTHON=/path/to/python picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${GPU_TRAIN_DEVICE:-cuda}
extra=()
if [ "$DEVICE" = cpu ]; then
  extra=(--tiny)
fi

DEVICE=$DEVICE "$PY" - <<'PY' || exit 2
import importlib.util, os, sys, torch
if os.environ["DEVICE"] == "cpu":
    print(f"gpu_train: rehearsal on CPU (tiny shape), torch {torch.__version__}")
elif not torch.cuda.is_available():
    sys.exit(f"gpu_train: torch {torch.__version__} sees no CUDA device")
else:
    free, total = torch.cuda.mem_get_info()
    print(f"gpu_train: {torch.cuda.get_device_name()}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
for name in ("flash_attn", "triton"):
    print(f"gpu_train: {name}: {'found' if importlib.util.find_spec(name) else 'not installed'}")
PY

timeout 540 "$PY" benchmarks/gpu_train.py --device "$DEVICE" "${extra[@]}" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_train: stopped after 540 s"
exit "$rc"
