#!/usr/bin/env bash
# One GPU, TP 2, TP 4 (on a 4-GPU machine) and PP 2, dummy Param2-17B weights (uniform random routing):
# decode latency at batch 1 and 64 and offline throughput (256 requests x (128 in, 512 out)), then a
# float32 check that TP / EP / PP give one GPU's tokens. Run from the repository root; results under $OUT.
#   [MODES="latency throughput"] bash benchmarks/gpu_parallel.sh [gpu1 tp2 tp4 pp2 check]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
P2M=(python3 -m param2moe.cli bench --load-format dummy --preset param2-17b --max-model-len 2048)
run() {  # name, extra args
  local name=$1; shift
  echo "== $name"
  [[ " ${MODES:-latency throughput} " == *" latency "* ]] && timeout 150 "${P2M[@]}" latency --max-num-seqs 64 --batch-size 1 64 --input-len 128 --output-len 32 \
    --output-json "$OUT/parallel_${name}_latency.json" "$@"
  [[ " ${MODES:-latency throughput} " == *" throughput "* ]] && timeout 150 "${P2M[@]}" throughput --max-num-seqs 256 --max-num-batched-tokens 8192 --num-prompts 256 \
    --input-len 128 --output-len 512 --output-json "$OUT/parallel_${name}_throughput.json" "$@"
}
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(gpu1 tp2 tp4 pp2 check)
for part in "${parts[@]}"; do
  case $part in
    gpu1) run gpu1 ;;
    tp2) run tp2 --tensor-parallel-size 2 ;;
    tp4) run tp4 --tensor-parallel-size 4 ;;
    pp2) run pp2 --pipeline-parallel-size 2 ;;
    check) timeout 200 python3 benchmarks/gpu_parallel_check.py "$OUT/parallel_check.json" ;;
  esac
done
