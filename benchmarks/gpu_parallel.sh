#!/usr/bin/env bash
# One GPU, TP 2 and PP 2 on one two-GPU machine, dummy Param2-17B weights (uniform random routing):
# decode latency at batch 1 and 64 in one table. Run from the repository root; results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
run() {  # name, extra args
  local name=$1; shift
  echo "== $name"
  timeout 150 python3 -m param2moe.cli bench latency --load-format dummy --preset param2-17b --max-model-len 2048 \
    --max-num-seqs 64 --batch-size 1 64 --input-len 128 --output-len 32 --output-json "$OUT/parallel_$name.json" "$@"
}
run gpu1
run tp2 --tensor-parallel-size 2
run pp2 --pipeline-parallel-size 2
