#!/usr/bin/env bash
# The whole engine on the lent GPU, with dummy weights of the real Param2-17B shapes (experts chosen
# uniformly at random, docs/model.md §7). Run on the device machine from the repository root; results under $OUT.
#   bash benchmarks/gpu_engine.sh correctness   # fast path vs plain torch path (small checkpoint)
#   bash benchmarks/gpu_engine.sh fast          # our fast path: latency by batch, TTFT at 1024, throughput
#   bash benchmarks/gpu_engine.sh smoke         # a quick fast-path latency check
#   bash benchmarks/gpu_engine.sh baseline      # the plain torch path (no Triton, no CUDA graphs)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
P2M=(python3 -m param2moe.cli bench --load-format dummy --preset param2-17b --max-model-len 4096)
for part in "$@"; do
  case $part in
    correctness) timeout 300 python3 benchmarks/gpu_correctness.py "$OUT/gpu_correctness.json" ;;
    ttft)
      timeout 100 "${P2M[@]}" latency --batch-size 1 --input-len 1024 --output-len 4 --max-num-seqs 64 \
        --output-json "$OUT/ours_ttft1024.json" ;;
    throughput)
      timeout 200 "${P2M[@]}" throughput --num-prompts 256 --input-len 128 --output-len 1024 --max-num-seqs 256 \
        --max-num-batched-tokens 8192 --output-json "$OUT/ours_throughput.json" ;;
    fast)
      timeout 200 "${P2M[@]}" latency --batch-size 1 8 32 64 --input-len 128 --output-len 128 \
        --max-num-seqs 256 --output-json "$OUT/ours_latency.json"
      timeout 60 "${P2M[@]}" latency --batch-size 1 --input-len 1024 --output-len 4 --max-num-seqs 64 \
        --output-json "$OUT/ours_ttft1024.json"
      timeout 200 "${P2M[@]}" throughput --num-prompts 256 --input-len 128 --output-len 1024 --max-num-seqs 256 \
        --max-num-batched-tokens 8192 \
        --output-json "$OUT/ours_throughput.json" ;;
    smoke)
      timeout 150 "${P2M[@]}" latency --batch-size 1 64 --input-len 64 --output-len 16 --max-num-seqs 64 \
        --output-json "$OUT/ours_smoke.json" ;;
    baseline)
      timeout 200 "${P2M[@]}" latency --kernels torch --enforce-eager --batch-size 1 8 64 --input-len 128 \
        --output-len 16 --max-num-seqs 64 --output-json "$OUT/torch_latency.json" ;;
  esac
done
