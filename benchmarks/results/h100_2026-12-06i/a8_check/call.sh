#!/bin/bash
# issue 18: quality of the int4 GEMVs with x in int8 (quant_gpu_check), then the int4 MoE kernel timings (x in int8 vs bf16)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
date -u
timeout 260 python3 benchmarks/quant_gpu_check.py --methods int4 > $OUT/check.log 2>&1; echo "check rc=$?"; tail -25 $OUT/check.log
date -u
timeout 280 python3 benchmarks/quant_gpu_bench.py --quick --no-tests --methods int4 --variants gemv_a16 --budget 200 > $OUT/bench.log 2>&1; echo "bench rc=$?"; grep -iE "moe|variant" $OUT/bench.log | head -40
date -u
