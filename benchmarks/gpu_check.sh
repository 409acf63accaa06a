#!/usr/bin/env bash
# The one GPU script (H100/H200, JAX with CUDA, no network). Bounded to under 5 minutes of
# benchmarks (150 + 150 s; each script prints JSON lines as it goes, so a timeout keeps what ran):
# installs jaxcore without dependencies, then each GPU benchmark, each of which also checks the
# compiled kernels against the reference before timing. Output: stdout, plus one log per script
# in $OUT. The parallel-solver benchmark (its targets were met on an H200 in session 1) and the
# paged-decode benchmark run only with GPU_CHECK_ALL=1 (100 s more).
#   bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jaxcore_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || $PY -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3
$PY -m jaxcore info
status=0
run() {  # run NAME TIMEOUT_S ARGS...: one benchmark, bounded, failures recorded but not fatal
  local name=$1 limit=$2; shift 2
  if [ ! -f "benchmarks/$name.py" ]; then echo "== $name: missing"; return; fi
  echo "== $name $*"
  timeout "$limit" $PY "benchmarks/$name.py" "$@" 2>&1 | tee "$OUT/$name.log" \
    | grep -vE "^\s*$|TF_CPP|absl" | tail -n 80
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "== $name FAILED rc=$rc"; status=1; }
}
# scans first: #5's GPU target is the open one (session 6: the "fused" ssd and per-kernel
# profiles); attention (#4, resolved) after it as the regression check
run gpu_scan 150
run gpu_attention 150 --reps 3
if [ "${GPU_CHECK_ALL:-0}" = 1 ]; then
  run gpu_fixed_point 70  # 40 s cut it after 3 of its cases in session 5
  run bench_paged_decode 60 --reps 5  # first figures of the paged-decode Pallas kernel
fi
exit $status
