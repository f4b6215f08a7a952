#!/usr/bin/env bash
set -u
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONUNBUFFERED=1
P2M=(python3 -m param2moe.cli bench --load-format dummy --preset param2-17b --max-model-len 4096 latency
     --batch-size 1 --input-len 128 --output-len 64 --max-num-seqs 8)
R=$PWD
ALL=route,align,gate_up,down,norm,attn,gemv,gemvrel,fold,reduce
show() { python3 -c "
import json,sys
d=json.load(open('$OUT/$1.json')); r=d['rows'][0]; print('$1', round(r['itl_s']*1e3,3), round(r['graph_gpu_s']*1e3,3))" 2>/dev/null || echo "$1 FAILED"; }
run() { name=$1; set_=$2; P2M_PDL_SET=$set_ PYTHONPATH=$R timeout 100 "${P2M[@]}" --output-json $OUT/$name.json > $OUT/$name.log 2>&1; show $name; }
(cd .peer/base && PYTHONPATH=$PWD timeout 100 "${P2M[@]}" --output-json $OUT/base1.json > $OUT/base1.log 2>&1); show base1
run all1 $ALL
run old1 gemv,reduce
for x in gemvrel fold attn norm route down gate_up; do
  run no_$x $(echo $ALL | tr ',' '\n' | grep -vx $x | paste -sd,)
done
run attn_only gemv,reduce,attn
run fold_only gemv,fold
run moe_only gemv,reduce,route,align,gate_up,down,norm
(cd .peer/base && PYTHONPATH=$PWD timeout 100 "${P2M[@]}" --output-json $OUT/base2.json > $OUT/base2.log 2>&1); show base2
run all2 $ALL
