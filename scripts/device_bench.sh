#!/usr/bin/env bash
# Issue 11's GPU figures in one call on the lent GPU machine (limits of 585 s in all; each is
# a ceiling, and the last GPU call ran 366 s of 505): training throughput of `segpipe fit`
# against a bare loop on the same device (U-Net 16 / batch 8 and U-Net 64 / batch 16 at 224²,
# smp ResNet-34 U-Net / batch 16 at 512², each with where segpipe's host time goes per epoch;
# U-Net 16 again with `model.compile` in torch's reduce-overhead mode, CUDA graphs, and on the
# machine's CPU cores), then `segpipe predict` against a bare decode-forward-write loop on the
# GPU, the per-epoch overhead of short epochs, a profile of training steps
# (scripts/profile_train_step.py), the training loader alone with 8 workers, with and
# without their shared decoded-image cache (scripts/bench_loading.py), and the Lovász-softmax
# of CamVid Lite0's late phase, segpipe's batched loss against smp's (scripts/bench_losses.py).
# Predict on the CPU cores (0.942) and the whole command's
# start-up (0.947) were measured in the call before and are left out for time:
# scripts/bench_predict.py --device cpu, and --skip-throughput --rounds 1, run them.
# Each benchmark has its own time limit, so one that hangs does not cost the others. $OUT gets
# two files (the device tool brings back at most 8): summary.txt, the last lines of each, and
# logs.txt, every log in full, each appended as its benchmark ends.
#
#   bash scripts/device_wheels.sh    # here, first: the wheels its image lacks, into .whl/
#   device run (carry [".whl"]): python3 -m pip install -q --no-index --no-deps --no-compile \
#       --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && \
#       PYTHONPATH=/tmp/site:. bash scripts/device_bench.sh
#
# DEVICE=cpu runs the same list on this machine's CPU; SMOKE=1 with it shrinks every benchmark
# to a few tiny images (a dry run of the script in about a minute, as the tests do).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/segpipe_device_bench}
mkdir -p "$out"
dev=${DEVICE:-cuda}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
logs="$out/logs.txt"
: > "$summary"
: > "$logs"
{ date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 \
  || true; "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
  >> "$summary" 2>&1

train_extra=()
compile_options='{mode: reduce-overhead}'
predict_extra=()
epochs_extra=()
profile_extra=()
loading_extra=()
losses_extra=()
if [ -n "${SMOKE:-}" ]; then  # later flags win in argparse: these override the sizes below
    train_extra=(--images 8 --batch-size 2 --crop 64 --base 4 --classes 3 --precision 32-true
                 --epochs 1 --rounds 1)
    compile_options='{backend: eager}'  # the flags' path, without minutes of compiling
    predict_extra=(--images 4 --batch-size 2 --base-channels 4 --depth 2 --classes 3 --rounds 1
                   --precision 32-true)
    epochs_extra=(--steps 12 --samples-per-epoch 8)
    profile_extra=(--steps 3 --batch-size 2 --crop 32 --base 4 --classes 3 --precision 32-true)
    loading_extra=(--images 8 --batch-size 2 --crop 32 --classes 3 --workers 2 --epochs 2)
    losses_extra=(--batch-size 2 --crop 16 --classes 3 --repeats 1 --rounds 1)
fi

failed=0
bench() {  # bench NAME SECONDS SCRIPT ARGS...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($limit s at most): $*" >> "$summary"
    local log
    log=$(mktemp)
    timeout --kill-after=5 "$limit" "$py" "$@" > "$log" 2>&1
    local rc=$?
    echo "exit $rc" >> "$summary"
    [ "$rc" -eq 0 ] || failed=1
    grep -v -e "it/s" -e "s/it" "$log" | tail -n 12 >> "$summary"
    { echo "===== $name (exit $rc): $*"; cat "$log"; } >> "$logs"
    rm -f "$log"
}

bench train_unet16 70 scripts/bench_train.py --device "$dev" --epochs 4 "${train_extra[@]}"
bench train_unet64 70 scripts/bench_train.py --device "$dev" --base 64 --batch-size 16 --epochs 4 \
    "${train_extra[@]}"
bench train_smp_r34 90 scripts/bench_train.py --device "$dev" --net smp-r34 --batch-size 16 \
    --crop 512 --epochs 3 "${train_extra[@]}"
bench train_unet16_compiled 90 scripts/bench_train.py --device "$dev" --epochs 3 \
    "${train_extra[@]}" -- "--model.compile=$compile_options"
bench train_unet16_cpu 60 scripts/bench_train.py --device cpu --images 96 --epochs 2 \
    "${train_extra[@]}"
bench predict 55 scripts/bench_predict.py --device "$dev" --skip-rss --skip-startup \
    "${predict_extra[@]}"
bench epochs_isbi 40 scripts/bench_epochs.py --device "$dev" --num-workers 4 "${epochs_extra[@]}"
bench profile_step 50 scripts/profile_train_step.py --device "$dev" --steps 20 "${profile_extra[@]}"
bench loading 35 scripts/bench_loading.py --workers 8 --epochs 3 "${loading_extra[@]}"
bench lovasz 25 scripts/bench_losses.py --device "$dev" "${losses_extra[@]}"
cat "$summary"
exit "$failed"
