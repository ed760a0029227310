#!/usr/bin/env bash
# Every figure the open issues ask of a GPU, in one device call (the step limits add up to 550 s).
#
#   here:   bash benchmarks/gpu_wheels.sh                     # once: .whl/ with what the image lacks
#   there:  the device tool's run, carry [".whl"], timeout_s 590:
#           OUT=$OUT bash benchmarks/gpu_checks.sh
#
# Each step has its own time limit, so one that hangs or fails does not cost the others. The tails
# of all outputs go to $OUT/log.txt; each step's whole output (<step>.out) and numbers (<step>.json)
# go to $OUT/results.tgz, rewritten after every step (the device tool brings back at most 8 files).
# The steps, most wanted first:
#   cuda_checks        correctness on CUDA (capture vs CPU, float16 rows, rerun, batch invariance)
#   capture_sd15       capture overhead, SD-1.5 structure at 512 px (target <= 1.03)
#   regulation_sd15    Attention Regulation overhead, same model (target <= 1.25)
#   tgate_sd15         TGATE speed-up, same model
#   capture_joint      capture overhead and peak GPU memory, Flux/SD3 structures at 4096 image
#                      tokens (their 1024 px; target <= 1.05), default attention backend
#   capture_joint_flash  the same with diffusers' _native_flash backend, Flux only (SD3's processor calls torch's
#                      SDPA itself: set_attention_backend does not reach it)
#   sweep_cuda         attnscope sweep --devices cuda:0 on the shapes model (it runs; traces/s)
#   excite_sd15        Attend-and-Excite's cost on SD-1.5 at 512 px (random weights never reach the
#                      refinement thresholds: every refinement runs to its cap, the worst case)
set -u
OUT=${OUT:-benchmarks/results/gpu}
PY=${PY:-python3}
RES=$(mktemp -d)
mkdir -p "$OUT"
if [ -d .whl ]; then
    $PY -m pip install --quiet --no-index --no-deps .whl/*.whl 2>&1 | tail -n 3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log() { echo "$@" | tee -a "$OUT/log.txt"; }
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    log "== $name ($(date +%T), limit ${limit} s)"
    timeout "$limit" "$@" > "$RES/$name.out" 2>&1
    local rc=$?
    grep -v "^\[transformers\]\|Loading" "$RES/$name.out" | tail -n 14 | tee -a "$OUT/log.txt"
    log "-- $name: exit $rc"
    tar czf "$OUT/results.tgz" -C "$RES" .
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/log.txt"
$PY -c "import torch, diffusers, zarr, dask; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'zarr', zarr.__version__, 'dask', dask.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/log.txt"

step 90 cuda_checks $PY benchmarks/cuda_checks.py --json "$RES/cuda_checks.json"
step 90 capture_sd15 $PY benchmarks/capture_overhead.py --models sd15 --device cuda --resolution 512 \
    --json "$RES/capture_sd15.json"
step 70 regulation_sd15 $PY benchmarks/regulation_overhead.py --models sd15 --device cuda --resolution 512 \
    --json "$RES/regulation_sd15.json"
step 60 tgate_sd15 $PY benchmarks/tgate_speed.py --models sd15 --device cuda --resolution 512 \
    --json "$RES/tgate_sd15.json"
step 80 capture_joint $PY benchmarks/capture_overhead.py --models flux,sd3 --device cuda --resolution 256 \
    --json "$RES/capture_joint.json"
step 60 capture_joint_flash $PY benchmarks/capture_overhead.py --models flux --device cuda --resolution 256 \
    --backend _native_flash --json "$RES/capture_joint_flash.json"
printf '%s\n' "a red circle and a blue square" "a green triangle to the left of a yellow circle" \
    "a blue square and a blue circle" "a yellow triangle" > "$RES/prompts.txt"
SWEEP=$(mktemp -d)
step 50 sweep_cuda $PY -m attnscope sweep "$RES/prompts.txt" --seeds 0-15 --out "$SWEEP/s" --devices cuda:0
rm -rf "$SWEEP"
step 50 excite_sd15 $PY benchmarks/regulation_overhead.py --models sd15 --device cuda --resolution 512 \
    --method attend-excite --repeats 1 --json "$RES/excite_sd15.json"
log "== done $(date +%T)"
