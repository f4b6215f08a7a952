#!/bin/bash
# Profile of quantized batch-1 decode; the head quantized or not; CUDA engine tests.
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
git log -1 --format=%H >> $OUT/card.txt 2>/dev/null
for q in fp8 int4; do
  timeout 150 python benchmarks/profile_decode.py --batch 1 --quantization $q --top 40 --timeline 0 60 > $OUT/prof_b1_$q.log 2>&1
done
timeout 100 python benchmarks/profile_decode.py --batch 1 --top 30 --timeline 0 40 > $OUT/prof_b1_bf16.log 2>&1
for q in none fp8 int4; do
  for head in 0 1; do
    [ $q = none ] && [ $head = 1 ] && continue
    extra=""; [ $q != none ] && extra="--quantization $q"; [ $head = 1 ] && extra="$extra --quantize-head"
    timeout 120 python -m param2moe.cli bench latency --load-format dummy --preset param2-17b $extra --batch-size 1 64 \
      --input-len 128 --output-len 128 --max-graph-tokens 0 --output-json $OUT/lat_${q}_head$head.json > $OUT/lat_${q}_head$head.log 2>&1
  done
done
timeout 200 python -m pytest -q -x tests/test_cuda_engine.py tests/test_mapped.py > $OUT/pytest.log 2>&1
cd $OUT && tar czf logs.tgz *.log && rm -f prof_*.log lat_*.log pytest.log; ls
