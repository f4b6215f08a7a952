#!/usr/bin/env bash
# One GPU call: correctness of every GPU path (concurrently), then timings one at a time, by priority,
# inside a deadline. Results under $OUT; summary.txt lists each step's exit code and seconds.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD CUBLAS_WORKSPACE_CONFIG=:4096:8
T0=$SECONDS; END=${END:-565}
left() { echo $((END - (SECONDS - T0))); }
step() {  # name seconds-needed timeout command...
  local name=$1 need=$2 tmo=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then echo "SKIP $name (left ${l}s)" | tee -a "$OUT/summary.txt"; return; fi
  [ "$tmo" -gt "$l" ] && tmo=$l
  local s=$SECONDS
  timeout -s INT -k 15 "$tmo" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc secs=$((SECONDS - s)) at=$((SECONDS - T0))" | tee -a "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/card.txt"
# 1. correctness, concurrently (timings come after); SIGINT at the limit so pytest prints its summary
PH1=${PH1:-170}
step pytest_gpu 60 $PH1 python3 -m pytest -q -n 8 --timeout 120 -p no:cacheprovider -rfE \
  tests/test_triton_kernels.py tests/test_triton_quant.py tests/test_lora_kernels.py tests/test_eplb_kernels.py \
  tests/test_cuda_engine.py tests/test_graph_runner_cpu.py &
step gpu_correctness 60 $PH1 python3 benchmarks/gpu_correctness.py "$OUT/gpu_correctness.json" &
step quant_gpu_check 60 $PH1 python3 benchmarks/quant_gpu_check.py --out "$OUT" &
step lora_correct 60 $PH1 python3 benchmarks/lora_bench.py --sections correctness --out "$OUT/lora_c" &
wait
# 2. timings, one process at a time: the refactor before/after (c390032 = .gpu/base) with the same command,
#    quantized (fp8, int4: the same command with --quantization), EPLB's cost, LoRA's cost
B=(bench --load-format dummy --preset param2-17b latency --batch-size 1 64 --input-len 128 --output-len 128
   --max-graph-tokens 0)
for side in base main; do
  dir=$PWD/.gpu/base; [ $side = main ] && dir=$PWD
  ( cd "$dir" && PYTHONPATH=$dir step e2e_$side 50 110 python3 -m param2moe.cli "${B[@]}" \
      --output-json "$OUT/e2e_$side.json" )
done
step quant_e2e 100 200 python3 benchmarks/quant_gpu_bench.py --out "$OUT/quant" --e2e fp8,int4 --e2e-only
step eplb_bench 80 130 env OUT="$OUT/eplb" python3 benchmarks/eplb_bench.py --batch 64 --redundant 0 --rounds 1
step lora_ours 80 150 python3 benchmarks/lora_bench.py --sections ours --out "$OUT/lora"
cat "$OUT/summary.txt"
for f in "$OUT"/*.log; do echo "=== $f"; tail -8 "$f"; done
