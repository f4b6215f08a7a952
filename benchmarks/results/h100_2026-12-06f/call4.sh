#!/bin/bash
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/card.txt
timeout 200 python benchmarks/router_sweep.py > $OUT/router_sweep.log 2>&1
best=$(python -c "
import json; d=json.load(open('$OUT/router_sweep.json')); ok={k:v for k,v in d.items() if v['same_ids']}
print(min(ok, key=lambda k: ok[k]['us']))")
per=$(echo $best | sed 's/per\([0-9]*\)_w.*/\1/'); warps=$(echo $best | sed 's/.*_w//')
echo "best $best per=$per warps=$warps" >> $OUT/router_sweep.log
lat() {  # name, per, warps, variant, args
  local name=$1 per=$2 warps=$3 var=$4; shift 4
  P2M_QUANT_MOE_VARIANT=$var timeout 120 python -c "
import sys, param2moe.kernels.triton.routing as r
r.EXPERTS_PER_PROGRAM, r.ROUTER_WARPS = $per, $warps
from param2moe.cli import main
sys.exit(main(sys.argv[1:]))" bench latency --load-format dummy --preset param2-17b --batch-size 1 64 --input-len 128 \
    --output-len 128 --max-graph-tokens 0 --output-json $OUT/lat_$name.json "$@" > $OUT/lat_$name.log 2>&1
}
for rep in 1 2; do
  lat bf16_default_r$rep 2 4 default
  lat bf16_best_r$rep $per $warps default
  lat fp8_default_r$rep 2 4 default --quantization fp8
  lat fp8_best_r$rep $per $warps default --quantization fp8
done
lat int8_default 2 4 default --quantization int8
lat int8_gemv_plain 2 4 gemv_plain --quantization int8
cd $OUT && python - <<'PY'
import glob, json
rows = {}
for f in sorted(glob.glob("lat_*.json")):
    d = json.load(open(f)); rows[f[4:-5]] = {r["batch"]: round(r["itl_s"] * 1e3, 3) for r in d["rows"]}
json.dump(rows, open("summary.json", "w"), indent=1); print(rows)
PY
tar czf all.tgz *.log lat_*.json && rm -f *.log lat_*.json; ls
