#!/bin/bash
# issue 18: int4 with x in int8: the CUDA tests that missed by the oracle's roundings, GEMV shape variants (kernel and engine), the heads
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source .gpu/lat.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .gpu/commit.txt; date -u; } > $OUT/card.txt
cat $OUT/card.txt
timeout 100 python3 -m pytest -q -n 8 tests/test_triton_quant.py -k "int4 and (behind or moe_experts or dispatch or cuda_graph or param2_shapes or x_in_int8)" > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -3 $OUT/pytest.log
timeout 120 python3 benchmarks/quant_gpu_bench.py --quick --no-tests --methods int4 --variants a8_n16,a8_n16w8,a8_n32,a8_s4,gemv_a16 --budget 100 > $OUT/bench.log 2>&1; echo "bench rc=$?"; grep -A3 "quantized MoE variants" $OUT/bench.log
lat bf16 default
lat int4 default --quantization int4
lat int4_n16 a8_n16 --quantization int4
lat int4_head default --quantization int4 --quantize-head
lat int4_n16_head a8_n16 --quantization int4 --quantize-head
lat fp8_head default --quantization fp8 --quantize-head
summary lat; date -u
