#!/usr/bin/env bash
# Quality comparison (issue 5, item 4) on one lent GPU machine, in two calls that follow each other while the
# machine is warm (each call carries at most 64 MiB, and the SmolLM2 GGUF is split in two halves):
#
#   stage1  carry [.gguf1, .whl, .data, .qsnap]: stage the first GGUF half, install the gguf wheel, then run the
#           from-scratch pre-training comparison (tinyshakespeare, random Llama 6x384, full Adam vs MISA δ=25%)
#           and a 6-step SFT smoke test of the grid's code path -> $OUT/quality_pretrain.json
#   stage2  carry [.gguf2, .data, .qsnap]: join + verify the GGUF, dequantise it to /root/smollm2, then the SFT
#           grid on GSM8K (6 methods, lr grid per family, 2 seeds) -> $OUT/quality_sft.json
#
# .qsnap (optional, ignored) holds a frozen copy of misa_train/ and misa_theory/ that was smoke-tested on CPU
# before the call, so the device runs exactly that code even while the checkout is being edited.
# Local CPU smoke test of both stages' Python: see docs/results.md, section Quality.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/quality-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SNAP=""
[ -d .qsnap/misa_train ] && SNAP="$PWD/.qsnap"
export PYTHONPATH="${SNAP:+$SNAP:}/root/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
source scripts/smollm2_stage.sh

case "${1:-}" in
  stage1)
    stage_first_half
    "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers",
      transformers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())'
    "$PY" benchmarks/quality.py make-tiny --out /root/tiny --seeds 0,1 --layers 6 --hidden 384 \
      --intermediate 1024 --heads 6
    "$PY" benchmarks/quality.py pretrain --work /root/qpt --out "$OUT/quality_pretrain.json" \
      --models /root/tiny --text .data/tinyshakespeare.txt --seeds 0,1 --steps "${PT_STEPS:-1000}" \
      --workers 6 --deadline "${PT_DEADLINE:-110}" --hard "${PT_HARD:-150}" \
      --smoke-sft-train .data/smoke_train.jsonl --smoke-sft-test .data/smoke_test.jsonl
    ;;
  stage2)
    join_and_convert
    "$PY" benchmarks/quality.py grid --model /root/smollm2 --train .data/train.jsonl --test .data/test.jsonl \
      --work /root/qsft --out "$OUT/quality_sft.json" --seeds 0,1 --steps "${SFT_STEPS:-300}" \
      --workers "${SFT_WORKERS:-4}" --deadline "${SFT_DEADLINE:-460}" --hard "${SFT_HARD:-505}" --est 90
    ;;
  *)
    echo "usage: scripts/quality.sh stage1|stage2" >&2
    exit 2
    ;;
esac
