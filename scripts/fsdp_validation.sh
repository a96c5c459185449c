#!/usr/bin/env bash
# Issue #6 GPU validation on a 2-GPU host (device kind nvidia-h200-x2): Llama-3-8B architecture, random bf16
# weights, seq 8192, MISA delta = 1%, 1 GPU vs 2 GPUs (FSDP2, weak scaling: global batch 1 vs 2).
#   bash scripts/fsdp_validation.sh setup   # random-weight model folder + packed-text data in /tmp
#   bash scripts/fsdp_validation.sh one     # single-process run  -> runs/fsdp-1gpu
#   bash scripts/fsdp_validation.sh two     # torchrun, 2 processes -> runs/fsdp-2gpu
#   bash scripts/fsdp_validation.sh report  # per-GPU peak (MiB) and tokens/s, median of the train events
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
COMMON=(--model /tmp/llama3-8b-rand --data /tmp/pretrain.txt --task pretrain --method misa --delta 0.01
        --max-seq-len 8192 --grad-checkpointing --dtype bf16 --max-steps 30 --period 10 --log-every 5
        --eval-every 0 --eval-batches 1 --gen-eval-examples 0 --save-every 0 --lr 1e-5 --no-progress --overwrite)
case "${1:-}" in
  setup)
    python3 - <<'PY'
import random, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from benchmarks.bench_grid import ARCHS
from misa_train.models import tiny_tokenizer
torch.manual_seed(0)
with torch.device("cuda"):
    m = AutoModelForCausalLM.from_config(LlamaConfig(**ARCHS["llama3-8b"]), dtype=torch.bfloat16)
m.save_pretrained("/tmp/llama3-8b-rand"); tiny_tokenizer().save_pretrained("/tmp/llama3-8b-rand")
rng = random.Random(0); words = ["alpha", "beta", "gamma", "delta", "misa", "module", "gradient", "sample"]
open("/tmp/pretrain.txt", "w").write(" ".join(rng.choice(words) for _ in range(3_000_000)))
PY
    ;;
  one) python3 -m misa_train "${COMMON[@]}" --batch-size 1 --output-dir runs/fsdp-1gpu ;;
  two) torchrun --standalone --nproc_per_node 2 -m misa_train "${COMMON[@]}" --batch-size 2 --output-dir runs/fsdp-2gpu ;;
  report)
    python3 - runs/fsdp-1gpu runs/fsdp-2gpu <<'PY'
import json, statistics, sys
for run in sys.argv[1:]:
    ev = [json.loads(line) for line in open(run + "/metrics.jsonl")]
    train = [e for e in ev if e["event"] == "train"][1:]
    print(run, "peak MiB", max(e["peak_mem_mb"] for e in train), "tokens/s median",
          statistics.median(e["tokens_per_s"] for e in train), "n", len(train))
PY
    ;;
  *) echo "usage: $0 setup|one|two|report" >&2; exit 2 ;;
esac
