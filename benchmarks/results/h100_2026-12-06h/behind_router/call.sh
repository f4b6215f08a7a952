#!/bin/bash
# issue 18: the quantized gate/up launched behind the router (default) vs after it (variant after_router)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source .gpu/lat.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .gpu/commit.txt; date -u; } > $OUT/card.txt
cat $OUT/card.txt
timeout 150 python3 -m pytest -q -n 8 tests/test_triton_quant.py tests/test_triton_kernels.py -k "behind_the_router or round_trip or gate_up_launched or moe_variants or cuda_graph" > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -3 $OUT/pytest.log
lat fp8_behind default --quantization fp8
lat fp8_after after_router --quantization fp8
lat int4_behind default --quantization int4
lat int4_after after_router --quantization int4
lat bf16 default
lat fp8_after_r2 after_router --quantization fp8
lat fp8_behind_r2 default --quantization fp8
lat int4_after_r2 after_router --quantization int4
lat int4_behind_r2 default --quantization int4
summary lat; date -u
