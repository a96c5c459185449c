# Sourced by scripts/quality.sh and scripts/ablation.sh (not run on its own): the SmolLM2 GGUF reaches the GPU
# machine in two halves over two calls (each call carries at most 64 MiB); these put it back together there.
# Needs PY set by the caller.
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

# Call 1: keep the first half and install the gguf wheel (carry .gguf1 and .whl).
stage_first_half() {
  mkdir -p /root/stage
  cp .gguf1/part_aa /root/stage/
  "$PY" -m pip install -q --no-index --no-deps --target /root/site .whl/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

# Call 2 (machine still warm; carry .gguf2): join, verify and dequantise once to /root/smollm2.
join_and_convert() {
  if [ ! -f /root/stage/part_aa ] || [ ! -d /root/site/gguf ]; then
    echo "machine went cold (no /root/stage/part_aa or /root/site/gguf): run stage1 again" >&2
    exit 3
  fi
  [ -f /root/smollm2/config.json ] && return 0
  cp .gguf2/part_ab /root/stage/
  cat /root/stage/part_aa /root/stage/part_ab > "/root/stage/$GGUF"
  echo "$(cat .gguf2/sha256)  /root/stage/$GGUF" | sha256sum -c
  "$PY" benchmarks/quality.py convert --gguf "/root/stage/$GGUF" --out /root/smollm2
}
