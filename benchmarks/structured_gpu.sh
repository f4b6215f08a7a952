#!/usr/bin/env bash
# Structured-output benchmark on the GPU machine, which has no network and no xgrammar: the wheels travel
# with the working tree in .structured_whl/ (git-ignored). Once, on the CPU machine, in the repo root:
#   echo /.structured_whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .structured_whl xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# Then run(carry=[".structured_whl"], command="bash benchmarks/structured_gpu.sh").
# Arguments go to benchmarks/structured_bench.py; results in $OUT/structured_bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import xgrammar" 2>/dev/null; then
  site=/tmp/structured_site
  mkdir -p "$site"
  for w in .structured_whl/*.whl; do python3 -m zipfile -e "$w" "$site"; done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/structured_bench.py "$@"
