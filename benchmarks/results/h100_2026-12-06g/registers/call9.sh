#!/bin/bash
# issue 18: the one-token GEMV with registers capped (variants reg96, reg80): the engine's batch-1 step; CUDA tests
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source .gpu/lat.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .gpu/commit.txt; date -u; } > $OUT/card.txt
timeout 90 python3 -m pytest -q -x -n 8 tests/test_triton_quant.py -k "moe_variants and reg" > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -1 $OUT/pytest.log
lat int4_default default --quantization int4
lat int4_reg96 reg96 --quantization int4
lat int4_reg80 reg80 --quantization int4
lat fp8_default default --quantization fp8
lat fp8_reg80 reg80 --quantization fp8
lat int4_reg96_r2 reg96 --quantization int4
lat int4_default_r2 default --quantization int4
summary lat; date -u
