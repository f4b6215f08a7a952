#!/usr/bin/env bash
set -u
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 200 python3 -m pytest -q -n 4 tests/test_triton_kernels.py tests/test_cuda_engine.py 2>&1 | tail -3
L=(python3 -m param2moe.cli bench --load-format dummy --preset param2-17b --max-model-len 4096 latency
     --batch-size 1 64 128 256 --input-len 128 --output-len 32 --max-num-seqs 256)
T=(python3 -m param2moe.cli bench --load-format dummy --preset param2-17b --max-model-len 4096 throughput
   --num-prompts 256 --input-len 128 --output-len 1024 --max-num-seqs 256 --max-num-batched-tokens 8192)
showl() { python3 -c "
import json
d=json.load(open('$OUT/$1.json')); print('$1', [(r['batch'], round(r['itl_s']*1e3,3), round(r.get('graph_gpu_s',0)*1e3,3)) for r in d['rows']])" 2>/dev/null || echo "$1 FAILED"; }
showt() { python3 -c "
import json
d=json.load(open('$OUT/$1.json')); print('$1', round(d['rows'][0]['output_tok_per_s'],1))" 2>/dev/null || echo "$1 FAILED"; }
(cd .peer/base && PYTHONPATH=$PWD timeout 150 "${L[@]}" --output-json $OUT/lat_base.json > /dev/null 2>&1); showl lat_base
timeout 150 "${L[@]}" --output-json $OUT/lat_new.json > /dev/null 2>&1; showl lat_new
for i in 1 2; do
  (cd .peer/base && PYTHONPATH=$PWD timeout 100 "${T[@]}" --output-json $OUT/tp_base$i.json > /dev/null 2>&1); showt tp_base$i
  timeout 100 "${T[@]}" --output-json $OUT/tp_new$i.json > /dev/null 2>&1; showt tp_new$i
done
cd $OUT && tar -czf ab7.tgz *.json
