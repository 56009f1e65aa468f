#!/usr/bin/env bash
# Everything that needs a GPU, in one run of under 8 minutes on one GPU (issue #17), printing ratios.
#
#   bash benchmarks/gpu.sh [--out DIR]     # on a machine with CUDA; default DIR benchmarks/results/gpu
#   bash benchmarks/gpu.sh --smoke         # the same steps, tiny, on the CPU (checks the script itself)
#   ... --skip NAME                         # leave a step out (checks, hook_overhead, hook_per_step, hook_overhead_adaptive,
#                                           # inception_throughput, eval, eval_report); repeatable
#
# 1. device-sensitive checks on CUDA (benchmarks/gpu_checks.py: hook exactness, per-image seeds, AG
#    sub-batches, Dynamic CFG's device generator restore, denoiser and Inception against the CPU);
# 2. hook overhead, SD 1.5-size UNet at 64x64 latents (fp16 when bench_hook_overhead.py offers
#    --dtype): CFG, APG against native CFG; their fixed cost per step on the tiny test pipeline
#    (--suite per-step, fp16); AG, LinearAG (--suite adaptive) against native CFG;
# 3. Inception extraction throughput against torchmetrics' FID update (bench_metrics.py);
# 4. one 10,000-image evaluation of a few settings (benchmarks/effects.py, resumable, with
#    bootstrap intervals) and its verdicts (effects_report.py).
# Each step has its own time limit, so one slow step cannot eat the others' time; a step that
# fails or times out is reported and the script goes on. Python: $PYTHON, else `python`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results/gpu
SMOKE=0
SKIP=" "
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; OUT=runs/gpu-smoke ;;
    --out) OUT=$2; shift ;;
    --skip) SKIP="$SKIP$2 "; shift ;;
    *) echo "gpu.sh: unknown argument $1; allowed: --smoke, --out DIR, --skip STEP" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
if [ $SMOKE = 1 ]; then
  DEV=cpu; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  HOOK="--latent-size 8 --steps 1 --repeats 1 --threads 1"
  METRICS="--devices cpu --images 8 --batch 4 --no-scipy --repeats 1 --samples 256 --dim 256"
  EVAL="--stages 20 --batch-size 10 --steps 2 --replicates 10 --threads 1"
  ROWS=("CFG@3" "APG@10")
  LIMITS=(300 600 300 300)  # the SD 1.5-size UNet alone takes minutes to build on a busy CPU
else
  DEV=cuda
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device; use --smoke for the CPU path" >&2; exit 2
  fi
  HOOK="--latent-size 64 --steps 20 --repeats 5"
  METRICS="--devices cuda --images 4096 --batch 256 --no-scipy"
  EVAL="--stages 10000 --batch-size 1000 --replicates 50"
  ROWS=("CFG@3" "CFG@10" "CFG@15" "APG@10" "APG@15" "Interval 0-0.25@3" "AG x0 0.995@3" "DynamicCFG alignment@3")
  LIMITS=(45 60 40 210)  # + 30 s report: 445 s of steps, under 8 minutes with start-up
fi
FAILED=()
step() {  # step NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  if [[ "$SKIP" == *" $name "* ]]; then echo; echo "=== $name: skipped"; return; fi
  echo; echo "=== $name (limit ${limit}s) ==="
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "^Loading pipeline components" | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "--- $name: exit $rc in $((SECONDS - start)) s"
  [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
}
DTYPE=()
if [ $SMOKE = 1 ]; then
  :  # float32 on the CPU (half-precision CPU kernels are slow or missing)
elif $PY benchmarks/bench_hook_overhead.py --help 2>/dev/null | grep -q -- "--dtype"; then
  DTYPE=(--dtype float16)
else
  echo "note: bench_hook_overhead.py has no --dtype flag here: the hook overhead runs in float32"
fi
PER_STEP="--steps 50 --repeats 9"; [ $SMOKE = 1 ] && PER_STEP="--steps 2 --repeats 1 --threads 1"
SMOKE_FLAG=(); [ $SMOKE = 1 ] && SMOKE_FLAG=(--smoke)
step checks "${LIMITS[0]}" $PY benchmarks/gpu_checks.py --device $DEV "${SMOKE_FLAG[@]}"
step hook_overhead "${LIMITS[1]}" $PY benchmarks/bench_hook_overhead.py --device $DEV $HOOK "${DTYPE[@]}" \
  --json "$OUT/hook_overhead.json"
# The hook's fixed cost per step on the tiny test pipeline: on a GPU it is launch-bound, like few-step models.
step hook_per_step 40 $PY benchmarks/bench_hook_overhead.py --suite per-step --device $DEV $PER_STEP "${DTYPE[@]}"
step hook_overhead_adaptive "${LIMITS[1]}" $PY benchmarks/bench_hook_overhead.py --suite adaptive --device $DEV \
  $HOOK "${DTYPE[@]}" --json "$OUT/hook_overhead_adaptive.json"
step inception_throughput "${LIMITS[2]}" $PY benchmarks/bench_metrics.py $METRICS
step eval "${LIMITS[3]}" $PY benchmarks/effects.py --device $DEV $EVAL --state "$OUT/state" --out "$OUT/effects" \
  --only "${ROWS[@]}"
step eval_report 30 $PY benchmarks/effects_report.py --rows "$OUT/effects/rows.json"
echo
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu.sh: ${#FAILED[@]} step(s) failed or timed out: ${FAILED[*]} (logs in $OUT)"; exit 1
fi
echo "gpu.sh: all steps done in $SECONDS s; logs and results in $OUT"
