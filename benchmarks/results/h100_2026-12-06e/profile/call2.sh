#!/bin/bash
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
for q in fp8 int4; do
  timeout 150 python benchmarks/profile_decode.py --batch 1 --quantization $q --top 40 --timeline 0 60 > $OUT/prof_b1_$q.log 2>&1
done
timeout 100 python benchmarks/profile_decode.py --batch 1 --top 30 --timeline 0 40 > $OUT/prof_b1_bf16.log 2>&1
ls $OUT
