#!/bin/bash
# issue 18: the committed defaults (int4 MoE GEMV 16 rows, x in int8): CUDA tests, the batch-1 step
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source .gpu/lat.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .gpu/commit.txt; date -u; } > $OUT/card.txt
timeout 120 python3 -m pytest -q -n 8 tests/test_triton_quant.py tests/test_triton_kernels.py -k "int4 or rout or behind" > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -1 $OUT/pytest.log
lat bf16 default
lat int4 default --quantization int4
lat int4_head default --quantization int4 --quantize-head
lat fp8 default --quantization fp8
summary lat; date -u
