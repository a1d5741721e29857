#!/usr/bin/env bash
# Everything a session with a GPU should measure for issues 9 and 7, in order, each step
# under its own time limit, results as JSON in OUTDIR (with one log, gpu_checks.log):
#
#     bash benchmarks/gpu_checks.sh OUTDIR [nls] [prune] [sparse] [profile] [nls4]
#
#   nls      issue 9: NLSTrainer vs PEFT LoRA r=32, random Llama of 1B shapes, bf16,
#            batch 8 x 512, Q/K/V/Up/Down, 30 steps (5 warm-up), best of 2 -> nls.json
#   prune    issue 9: Wanda on a random Llama of 7B shapes, all 32 blocks, 128 x 2048
#            calibration ids, reference vs shears batch 1 and 8 -> prune.json
#   sparse   issue 7: benchmarks/bench_sparse_inference.py, if this checkout has it
#            -> sparse_inference.json
#   nls4     issue 13: NLS over a bitsandbytes NF4 base at 7B shapes (random weights), batch
#            4 x 512, 12 steps (2 warm-up), one run per side: PEFT LoRA r=32 over the same NF4
#            base, and NLS over the bf16 base (goal: memory <= 0.45x, throughput >= 0.7x of
#            bf16) -> nls4.json (its "nf4_vs_unquantized"). Limit 420 s: not in the default
#            list (the four above fill one 10-minute call); run it on its own.
#   profile  where Wanda's time goes: one shears run on the first 4 blocks of the 7B
#            shapes under torch.profiler -> prune_profile.txt
#
# With no step named, all four run (limits 180 + 210 + 120 + 60 = 570 s, plus start-up).
# Nothing is downloaded and `datasets` is not needed. The exit status is non-zero if any
# step failed or ran out of time; the others still run.
# SHEARS_GPU_CHECKS_SMOKE=1 runs the same steps on the CPU with tiny shapes (the CI's check
# of this script); PYTHON picks the interpreter (default python3).
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUTDIR [nls] [prune] [sparse] [profile]}
shift
STEPS=${*:-nls prune sparse profile}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"

if [ "${SHEARS_GPU_CHECKS_SMOKE:-0}" = 1 ]; then
    DEV=cpu NLS_MODEL=random-tiny PRUNE_MODEL=random-tiny DTYPE=bfloat16
    NLS_SIZES="--batch 2 --seqlen 16 --steps 3 --warmup 1 --repeats 1 --memory-steps 0 --inline"
    NLS4_MODEL=random-tiny NLS4_SIZES=$NLS_SIZES
    PRUNE_SIZES="--nsamples 4 --seqlen 32 --repeats 1" PROFILE_BLOCKS=1
else
    DEV=cuda NLS_MODEL=random-1b PRUNE_MODEL=random-7b DTYPE=auto
    NLS_SIZES="--batch 8 --seqlen 512 --steps 30 --warmup 5 --repeats 2"
    NLS4_MODEL=random-7b NLS4_SIZES="--batch 4 --seqlen 512 --steps 12 --warmup 2 --repeats 1"
    PRUNE_SIZES="--nsamples 128 --seqlen 2048 --repeats 1" PROFILE_BLOCKS=4
fi

status=0
step() {  # name, limit in seconds, command...
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( SECONDS - t0 )) s$([ "$rc" = 124 ] && echo ', TIMED OUT')" \
        | tee -a "$LOG"
    [ "$rc" = 0 ] || status=1
}

{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"

for s in $STEPS; do
    case $s in
    nls)
        step nls 180 "$PY" benchmarks/bench_nls.py --model "$NLS_MODEL" --device "$DEV" \
            --dtype "$DTYPE" $NLS_SIZES --json "$OUT/nls.json" --out /tmp/shears-bench-nls ;;
    prune)
        step prune 210 "$PY" benchmarks/bench_prune.py --model "$PRUNE_MODEL" --device "$DEV" \
            --dtype "$DTYPE" $PRUNE_SIZES --batch-sizes 1,8 --json "$OUT/prune.json" ;;
    sparse)
        if [ -f benchmarks/bench_sparse_inference.py ]; then
            step sparse 120 "$PY" benchmarks/bench_sparse_inference.py \
                --json "$OUT/sparse_inference.json"
        else
            echo "=== sparse: benchmarks/bench_sparse_inference.py is not in this checkout" \
                | tee -a "$LOG"
        fi ;;
    profile)
        step profile 60 "$PY" benchmarks/bench_prune.py --model "$PRUNE_MODEL" --device "$DEV" \
            --dtype "$DTYPE" --blocks "$PROFILE_BLOCKS" $PRUNE_SIZES \
            --profile "$OUT/prune_profile.txt" ;;
    nls4)
        step nls4 420 "$PY" benchmarks/bench_nls.py --model "$NLS4_MODEL" --base nf4 \
            --device "$DEV" --dtype "$DTYPE" $NLS4_SIZES --json "$OUT/nls4.json" \
            --out /tmp/shears-bench-nls4 ;;
    *)
        echo "unknown step $s (nls, prune, sparse, profile, nls4)" | tee -a "$LOG"
        status=2 ;;
    esac
done
exit $status
