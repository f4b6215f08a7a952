#!/bin/bash
# issue 18: int4 GEMVs with x in int8 (the default on this commit) vs x in bf16 (gemv_a16, the previous default);
# the router's one-pass loads (default) vs two passes (P2M_ROUTER_WHOLE_ROW=0)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source .gpu/lat.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .gpu/commit.txt; date -u; } > $OUT/card.txt
cat $OUT/card.txt
timeout 120 python3 -m pytest -q -n 8 tests/test_triton_quant.py tests/test_triton_kernels.py -k "x_in_int8 or x_int8_reference or behind or gemv_variants or rout or param2_shapes or cuda_graph or dispatch or moe_experts" > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -3 $OUT/pytest.log
lat bf16 default
lat int4_a8 default --quantization int4
lat int4_a16 gemv_a16 --quantization int4
lat int4_a8_head default --quantization int4 --quantize-head
lat int4_a16_head gemv_a16 --quantization int4 --quantize-head
lat fp8 default --quantization fp8
P2M_ROUTER_WHOLE_ROW=0 lat fp8_tworouter default --quantization fp8
P2M_ROUTER_WHOLE_ROW=0 lat int4_a8_tworouter default --quantization int4
P2M_ROUTER_WHOLE_ROW=0 lat bf16_tworouter default
lat int4_a8_r2 default --quantization int4
lat int4_a16_r2 gemv_a16 --quantization int4
summary lat; date -u
