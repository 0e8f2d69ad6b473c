#!/usr/bin/env bash
# Every GPU benchmark the open issues ask for, in one call of the device tool (8-10 minutes).
#
# The device machines have Python 3.12 with torch, transformers, pyarrow, timm, opencv, but no
# open_clip, diffusers, segment-anything, pycocotools or faiss, and no network. Download their
# wheels here first (git-ignored folder, carried with the call):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .gpuwheels open_clip_torch==3.3.0 ftfy wcwidth pycocotools==2.0.11 diffusers==0.42.1 \
#     segment-anything==1.0
#
# The machines' pyarrow 25.0.1 cannot read null fixed-size lists (export's aug_crop), so
# cuda_smoke, which trains on the real export, needs our pyarrow 26.0.1. Its wheel (55 MB) does not
# fit the tool's 64 MiB carry beside the data, so carry a trimmed copy (24 MB; no Flight, S3,
# headers or tests), used by cuda_smoke only:
#
#   pip download (as above) -d /tmp/pa pyarrow==26.0.1 && mkdir /tmp/pa26 && cd /tmp/pa26 &&
#   python3 -m zipfile -e /tmp/pa/pyarrow-26.0.1-*.whl . && rm -rf pyarrow/{include,tests,src} \
#     pyarrow/*flight* pyarrow/*s3* pyarrow/libarrow_python.so pyarrow/libarrow_python.so.2600.1.0 &&
#   tar -cJf $REPO/.gpuwheels/pyarrow26-cp312.tar.xz pyarrow pyarrow-26.0.1.dist-info
#
# Device tool call:  command "bash benchmarks/gpu_checks.sh", timeout_s 600, carry [".gpuwheels",
#   "data/export", "data/embed/embeddings.parquet", "data/similarity/near_duplicates.parquet"]
#   (the last three, 16 MB after make repro, feed cuda_smoke; it fails without them, the rest runs).
# Results: $OUT/NAME.out (each benchmark's stdout), $OUT/results.jsonl (exit code and seconds per
# check) and $OUT/log.txt (stderr, versions). At most 8 files come back: keep it at 6 checks.
#
# CPU smoke test of this script (tiny sizes, the local venv, no wheels):
#   GPU_CHECKS_SMOKE=1 OUT=/tmp/gpu-checks bash benchmarks/gpu_checks.sh
#
# Order = priority, each check under its own timeout, so a slow or failing one never costs the rest.
set -u
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/log.txt"
: >"$RESULTS"
: >"$LOG"

if [ "${GPU_CHECKS_SMOKE:-0}" = 1 ]; then
    PY=${PY:-.venv/bin/python}
    DEVICE=cpu
    EMBED="--profile tiny --batch 16 --n-images 64 --workers 1 --repeats 1"
    SIM="--n 3000 --d 64 --k 8 --dry-run --skip-naive --device cuda"  # last --device wins: the GPU code path
    SEG="--profile tiny --batch 2 --n-images 4 --compare-rle"
    TRAIN="--profile tiny --dtype fp32 --batch 2 --steps 1 --repeats 1 --warmup 1"
    PROFILE="--profile tiny --dtype fp32 --batch 2 --steps 1 --warmup 1"
else
    PY=${PY:-python3}
    DEVICE=cuda
    # 24576 images amortise forking 14 workers and their first batches (~1 s); generation reuses
    # 256 distinct JPEGs, so it takes seconds
    EMBED="--profile vit-l-14-random --batch 256 --n-images 24576 --workers 14 --repeats 2"
    # engines at their default block size, then the stage's own call (block_rows from params.yaml)
    SIM="--n 1000000 --d 768 --k 32 --skip-naive --stage-block-rows 4096 --triton-levels 16,16,16 32,16 \
         --triton-tiles 128,128,64,8,3 128,256,64,8,4"
    SEG="--profile vit_h-random --batch 8 --n-images 256 --compare-rle"  # 128 left ~1 s of fixed costs in 6 s
    TRAIN="--profile sd15-random --dtype bf16 --batch 16 --steps 10 --repeats 5"  # noise ~0.05 at 5 x 3
    PROFILE="--profile sd15-random --dtype bf16 --batch 16 --steps 3"
    if [ -d .gpuwheels ]; then
        "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site .gpuwheels/*.whl >>"$LOG" 2>&1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        if [ -f .gpuwheels/pyarrow26-cp312.tar.xz ]; then
            mkdir -p /tmp/pa26 && tar -C /tmp/pa26 -xJf .gpuwheels/pyarrow26-cp312.tar.xz >>"$LOG" 2>&1
            SMOKE_PATH=/tmp/pa26:$PYTHONPATH
        fi
    fi
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; } >>"$LOG" 2>&1
fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)" >>"$LOG" 2>&1
"$PY" - >>"$LOG" 2>&1 <<'VERSIONS'
import importlib  # the versions the checks will import, for diagnosis
for name in ("transformers", "huggingface_hub", "diffusers", "open_clip", "segment_anything", "pyarrow", "triton"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(name, "not importable:", type(exc).__name__, exc)
VERSIONS

# Past DEADLINE seconds from the start no check begins, and each is cut to what is left, so the
# call ends inside the device tool's timeout with every finished result under $OUT.
DEADLINE=${GPU_CHECKS_DEADLINE:-570}

# GPU_CHECKS_ONLY="embed segment": run only the named checks (a short follow-up call).
ONLY=${GPU_CHECKS_ONLY:-}

check() {  # check NAME SECONDS SCRIPT ARGS...: stdout to $OUT/NAME.out, stderr to the log
    local name=$1 seconds=$2 script=$3
    shift 3
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        return
    fi
    local start=$SECONDS left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "{\"check\": \"$name\", \"exit\": null, \"skipped\": \"deadline\"}" >>"$RESULTS"
        echo "=== $name: skipped, $left s left before the deadline" >>"$LOG"
        return
    fi
    [ "$left" -lt "$seconds" ] && seconds=$left
    echo "=== $name: $script $* (limit $seconds s)" >>"$LOG"
    timeout "$seconds" "$PY" "$script" "$@" >"$OUT/$name.out" 2>>"$LOG"
    local rc=$?
    echo "{\"check\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}" >>"$RESULTS"
    echo "=== $name: exit $rc after $((SECONDS - start)) s" >>"$LOG"
}

# Limits (seconds) sum to 670; the deadline cuts the last, least important check instead of the
# device tool's timeout. Call with timeout_s 600.
# shellcheck disable=SC2086  # the argument strings are split on purpose
{
    check embed 150 benchmarks/bench_embed.py --device "$DEVICE" $EMBED
    check train_step 120 benchmarks/bench_train_step.py --device "$DEVICE" $TRAIN
    check segment 100 benchmarks/bench_segment.py --device "$DEVICE" $SEG
    PYTHONPATH=${SMOKE_PATH:-${PYTHONPATH:-}} \
        check cuda_smoke 60 benchmarks/cuda_smoke.py --device "$DEVICE"  # bf16 train + generate, syncs per step
    check train_profile 120 benchmarks/profile_train_step.py --device "$DEVICE" $PROFILE
    check similarity 120 benchmarks/bench_similarity.py --device "$DEVICE" $SIM
}
for f in "$RESULTS" "$OUT"/*.out; do echo "--- $f"; cat "$f"; done
