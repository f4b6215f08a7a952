#!/bin/bash
# issue 18: the engine's batch-1 decode step with each one-token variant (fp8, int4), the speculated decode
# attention (fp8, int4, bf16), then the kernel timings of the variants with what time is left
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source .gpu/lat.sh
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .gpu/commit.txt; date -u; } > $OUT/card.txt
T0=$(date +%s)
for m in fp8 int4; do
  for v in default down_preload rows4 rows8; do lat ${m}_$v $v --quantization $m; done
  P2M_ATTN_SPECULATE=1 lat ${m}_spec default --quantization $m
done
lat bf16_default default
P2M_ATTN_SPECULATE=1 lat bf16_spec default
lat fp8_default_r2 default --quantization fp8
summary lat; echo "lat done in $(( $(date +%s) - T0 )) s"
LEFT=$(( 560 - ($(date +%s) - T0) ))
[ $LEFT -gt 60 ] && timeout -s INT -k 5 $LEFT python3 benchmarks/quant_gpu_bench.py --quick --no-tests --methods int4,fp8 \
  --variants down_preload,rows2,rows4,rows8 --budget $(( LEFT - 40 )) --out $OUT/kern > $OUT/kern.log 2>&1
echo "kern rc=$?"; grep -v "^\[" $OUT/kern.log | tail -30
mv $OUT/kern/quant_gpu_bench.json $OUT/kern_bench.json 2>/dev/null; rm -rf $OUT/kern; date -u
