#!/usr/bin/env bash
# GPU check of the loss backends: torch's F.linear_cross_entropy (chunked options) against misa_train.losses'
# chunked loss and the full-logits reference. Peak memory, time, and loss/gradient agreement at LM-head shapes
# (benchmarks/loss_memory.py), then the trainer's step with each backend (benchmarks/bench_gpu.py).
# Needs a CUDA build of torch that has F.linear_cross_entropy (2.13 or later). Writes JSON under $OUT.
set -euo pipefail
out=${OUT:-loss_gpu_out}
mkdir -p "$out"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(), 'transformers', transformers.__version__)"
# vocab hidden seq: Llama-3-8B's head, SmolLM2-135M's head, Qwen2-7B's head
for shape in "128256 4096 8192" "49152 576 8192" "152064 3584 4096"; do
  read -r V H S <<<"$shape"
  for head in "" "--train-head"; do
    python3 benchmarks/loss_memory.py --vocab "$V" --hidden "$H" --seq "$S" --repeats 3 --torch-policies $head \
      --out "$out/loss_V${V}_h${H}_S${S}${head:+_head}.json"
  done
done
for backend in chunked torch; do
  python3 benchmarks/bench_gpu.py --models llama3.2-1b --methods misa3,full --seqs 8192 --ckpt on --steps 4 \
    --loss-backend "$backend" --out "$out" --tag "bench_1b_loss_$backend"
done
