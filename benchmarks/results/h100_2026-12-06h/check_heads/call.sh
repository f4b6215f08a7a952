#!/bin/bash
# issue 18: correctness of the engine with the gate/up behind the router (graphs vs eager vs oracle); heads quantized
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source .gpu/lat.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .gpu/commit.txt; date -u; } > $OUT/card.txt
timeout 300 python3 benchmarks/quant_gpu_check.py --methods int4,fp8 --out $OUT > $OUT/check.log 2>&1; echo "check rc=$?"; tail -15 $OUT/check.log
lat fp8_head default --quantization fp8 --quantize-head
lat int4_head default --quantization int4 --quantize-head
lat fp8_head_after after_router --quantization fp8 --quantize-head
lat int4_head_after after_router --quantization int4 --quantize-head
summary lat2; date -u
