#!/usr/bin/env bash
# The rule ablation of issue 15 on one lent GPU, in two calls made back to back while the machine is warm
# (each call carries at most 64 MiB, so the SmolLM2 GGUF travels in two halves; see docs/results.md):
#
#   stage1  carry [.gguf1, .whl]: stage the first GGUF half, install the gguf wheel
#   stage2  carry [.gguf2, .data_abl]: join + verify the GGUF, dequantise it, then run the grid of
#           benchmarks/quality.py over the ablation keys (METHODS "abl_*") -> $OUT/ablation.json
#
# .data_abl holds train.jsonl / test.jsonl made by `python benchmarks/quality.py make-arith` (reasoning-gym
# arithmetic with worked steps; test expressions never occur in train). Environment knobs: ABL_METHODS,
# ABL_SEEDS, ABL_LRS, ABL_STEPS, ABL_WORKERS, ABL_DEADLINE, ABL_HARD, ABL_EXTRA (more grid flags, e.g.
# --no-base); a later stage2 on the same warm machine reuses the dequantised model.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ablation-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="/root/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
source scripts/smollm2_stage.sh
case "${1:-}" in
  stage1)
    stage_first_half
    ;;
  stage2)
    join_and_convert
    "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers",
      transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name(0))'
    "$PY" benchmarks/quality.py grid --model /root/smollm2 --train .data_abl/train.jsonl --test .data_abl/test.jsonl \
      --work /root/abl --out "$OUT/ablation.json" --methods "${ABL_METHODS:?}" --seeds "${ABL_SEEDS:-0,1,2}" \
      --n-lr 1 --lrs "${ABL_LRS:?}" --steps "${ABL_STEPS:-1000}" --batch 16 --seq 128 --warmup 30 --period 5 \
      --val-fraction 0.05 --eval-every 200 --acc-n 500 --max-new-tokens 48 \
      --workers "${ABL_WORKERS:-7}" ${ABL_EXTRA:-} --deadline "${ABL_DEADLINE:-420}" --hard "${ABL_HARD:-520}" --est 120
    ;;
  *)
    echo "usage: scripts/ablation.sh stage1|stage2" >&2
    exit 2
    ;;
esac
