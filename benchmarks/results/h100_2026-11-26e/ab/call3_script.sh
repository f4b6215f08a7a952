#!/usr/bin/env bash
set -u
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONUNBUFFERED=1
P2M=(python3 -m param2moe.cli bench --load-format dummy --preset param2-17b --max-model-len 4096 latency
     --batch-size 1 --input-len 128 --output-len 64 --max-num-seqs 8)
R=$PWD
show() { python3 -c "
import json,sys
d=json.load(open('$OUT/$1.json')); r=d['rows'][0]; print('$1', round(r['itl_s']*1e3,3), round(r['graph_gpu_s']*1e3,3))" 2>/dev/null || echo "$1 FAILED"; }
run() { name=$1; set_=$2; P2M_PDL_SET=$set_ PYTHONPATH=$R timeout 100 "${P2M[@]}" --output-json $OUT/$name.json > $OUT/$name.log 2>&1; show $name; }
run old1 gemv,reduce
run c1 gemv,reduce,attn,norm,route
run c2 gemv,reduce,norm
run c3 gemv,reduce,norm,route
run c4 gemv,reduce,attn,norm
run c5 gemv,reduce,attn,norm,route,gemvrel
run c6 gemv,reduce,attn,norm,route,down
run old2 gemv,reduce
run c1b gemv,reduce,attn,norm,route
P2M_PDL_SET=gemv,reduce timeout 100 python3 benchmarks/profile_decode.py --batch 1 --top 12 --timeline 5 40 > $OUT/tl_old.txt 2>&1; grep -v Warn $OUT/tl_old.txt | tail -38
P2M_PDL_SET=gemv,reduce,attn,norm,route timeout 100 python3 benchmarks/profile_decode.py --batch 1 --top 12 --timeline 5 40 > $OUT/tl_c1.txt 2>&1; grep -v Warn $OUT/tl_c1.txt | tail -38
