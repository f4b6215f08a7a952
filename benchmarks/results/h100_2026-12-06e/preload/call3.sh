#!/bin/bash
# The preloaded quantized linear (GEMV_PRELOAD) against the pipelined one (variant linear_pipe), same machine.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/card.txt
lat() {  # name, env, args
  local name=$1 var=$2; shift 2
  P2M_QUANT_MOE_VARIANT=$var timeout 120 python -m param2moe.cli bench latency --load-format dummy --preset param2-17b \
    --batch-size 1 64 --input-len 128 --output-len 128 --max-graph-tokens 0 --output-json $OUT/lat_$name.json "$@" \
    > $OUT/lat_$name.log 2>&1
}
for rep in 1 2; do
  for q in fp8 int4; do
    lat ${q}_preload_r$rep default --quantization $q
    lat ${q}_pipe_r$rep linear_pipe --quantization $q
  done
done
lat fp8_preload_head default --quantization fp8 --quantize-head
lat int4_preload_head default --quantization int4 --quantize-head
lat bf16 default
timeout 120 python benchmarks/profile_decode.py --batch 1 --quantization fp8 --top 20 --timeline 14 40 > $OUT/prof_fp8.log 2>&1
timeout 200 python -m pytest -q -x tests/test_triton_quant.py -k "linear" > $OUT/pytest.log 2>&1
timeout 200 python benchmarks/quant_gpu_check.py --methods int4,fp8 > $OUT/check.log 2>&1
cd $OUT && python - <<'PY'
import glob, json
rows = {}
for f in sorted(glob.glob("lat_*.json")):
    d = json.load(open(f)); rows[f[4:-5]] = {r["batch"]: round(r["itl_s"] * 1e3, 3) for r in d["rows"]}
json.dump(rows, open("summary.json", "w"), indent=1); print(rows)
PY
tar czf all.tgz *.log lat_*.json && rm -f *.log lat_*.json; ls
