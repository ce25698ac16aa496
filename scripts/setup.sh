#!/usr/bin/env bash
# Set up .venv: a CPU build of torch, then mmzoo and the model plugins (editable) with test tools.
# Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (bring your own CUDA/NPU build on accelerator machines)"
  "${pip[@]}" torch==2.13.0
fi
echo "setup: installing mmzoo, mmzoo-qwen2_5_vl and mmzoo-internvl3"
"${pip[@]}" -e ".[test]" -e plugins/qwen2_5_vl -e plugins/internvl3
echo "setup: done ($(.venv/bin/mmzoo --version))"
