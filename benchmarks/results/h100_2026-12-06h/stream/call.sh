#!/bin/bash
# issue 18: a gentler shared-expert stream beside the router (pre4, pre16) vs the default (pre1) and after_router
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source .gpu/lat.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .gpu/commit.txt; date -u; } > $OUT/card.txt
cat $OUT/card.txt
timeout 60 python3 -m pytest -q -n 8 tests/test_triton_quant.py -k "behind_the_router" > $OUT/pytest.log 2>&1; echo "pytest rc=$?"; tail -1 $OUT/pytest.log
lat fp8_pre1 default --quantization fp8
lat fp8_pre4 pre4 --quantization fp8
lat fp8_pre16 pre16 --quantization fp8
lat fp8_after after_router --quantization fp8
lat int4_pre1 default --quantization int4
lat int4_pre4 pre4 --quantization int4
lat int4_pre16 pre16 --quantization int4
lat fp8_pre1_r2 default --quantization fp8
summary lat; date -u
timeout 45 python3 benchmarks/grid_barrier.py > $OUT/grid_barrier.log 2>&1; echo "grid_barrier rc=$?"; tail -6 $OUT/grid_barrier.log
