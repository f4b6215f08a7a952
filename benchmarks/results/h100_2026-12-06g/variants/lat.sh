# sourced: lat NAME VARIANT [args]: the engine's batch-1 decode step (bench latency) with P2M_QUANT_MOE_VARIANT=VARIANT
lat() {
  local name=$1 var=$2; shift 2
  P2M_QUANT_MOE_VARIANT=$var timeout 100 python3 -m param2moe.cli bench latency --load-format dummy --preset param2-17b \
    --batch-size 1 --input-len 128 --output-len 128 --max-graph-tokens 0 --output-json $OUT/lat_$name.json "$@" \
    > $OUT/lat_$name.log 2>&1 || echo "lat $name failed"
  python3 -c "import json; print('$name', [round(r['itl_s']*1e3, 4) for r in json.load(open('$OUT/lat_$name.json'))['rows']])" 2>/dev/null
}
summary() {
  (cd $OUT && python3 - <<'PY'
import glob, json
rows = {}
for f in sorted(glob.glob("lat_*.json")):
    d = json.load(open(f)); rows[f[4:-5]] = {r["batch"]: round(r["itl_s"] * 1e3, 4) for r in d["rows"]}
json.dump(rows, open("summary.json", "w"), indent=1)
PY
  tar czf $1.tgz *.log lat_*.json 2>/dev/null && rm -f *.log lat_*.json)
}
