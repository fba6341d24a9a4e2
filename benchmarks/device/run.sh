#!/usr/bin/env bash
# The GPU proof run (issue #20), one call on a CUDA machine: install the kit, then measure, writing as it goes.
#
#   bash benchmarks/device/run.sh [--dry-run] [--kit DIR]... [OUT_DIR]
#
# OUT_DIR (default $OUT, else .cache/device-out) receives 5 files, each written as its stage ends:
#   results.jsonl   one line per stage: {"stage", "status": ok|failed|timeout|skipped, "rc", "seconds",
#                   "cpu_seconds", "note", "dry_run"}
#   gpu_step.jsonl  benchmarks/gpu_step.py's measurements (one line each) and ratios
#   env.json        qwen3-sft[demo]'s requirements against what the interpreter sees (kit + image)
#   tiny_metrics.json  the tiny end-to-end run's metrics.json
#   run.log         everything printed
# Stages: install (the kit into $DEVICE_WORK/site, offline; torch and the rest of the image untouched), env,
# tiny-assets + tiny-run (the whole job on the tiny Qwen3-VL in bf16 on CUDA: the CUDA paths' smoke test),
# gpu-step (the random-weight 8B in 4-bit: seed stack vs ours on the 1024x768 and mixed sets, Liger off and on, the
# peak memory of batch 1 at 4096 tokens with gradient checkpointing, the vision forward with the patch embedding as a
# GEMM and as the Conv3d, and the micro-batch SFT_PER_DEVICE_BATCH_SIZE=auto picks with tokens/s at it vs batch 2), fa2 (recorded as skipped: no wheel).
# Each stage has its own timeout, cut to what is left of DEVICE_BUDGET_S (default 480 s) for the whole run
# (--dry-run: 1200 s, and the CPU stages' timeouts are 600 s: a busy 2-core CI box is slow, not hung).
# --dry-run: the same stages on the CPU at toy sizes (gpu_step.py --dry-run, 1 step each): the plumbing.
# --kit DIR (repeatable; default .cache/device-kit, from `make device-kit`): folders of wheels; the pins come from
# the first one's requirements.txt and pip takes, for each, the wheel that fits this Python.
# Environment: PYTHON (default python3: on the lent H200 that is /opt/torch/.venv/bin/python3), DEVICE_WORK (default
# /tmp/qwen3-sft-device: the ~17 GB random 8B model lives there, never in OUT_DIR), DEVICE_BUDGET_S.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DRY=0
KITS=()
OUT_ARG=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --kit) KITS+=("$2"); shift ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT_ARG=$1 ;;
  esac
  shift
done
[ ${#KITS[@]} -gt 0 ] || KITS=("$REPO/.cache/device-kit")
OUT_DIR=${OUT_ARG:-${OUT:-$REPO/.cache/device-out}}
PYTHON=${PYTHON:-python3}
WORK=${DEVICE_WORK:-${TMPDIR:-/tmp}/qwen3-sft-device}
if [ $DRY -eq 1 ]; then
  BUDGET_S=${DEVICE_BUDGET_S:-1200} TINY_RUN_S=600 GPU_STEP_S=600
else
  BUDGET_S=${DEVICE_BUDGET_S:-480} TINY_RUN_S=240 GPU_STEP_S=420
fi
mkdir -p "$OUT_DIR" "$WORK"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(cd "$WORK" && pwd)
RESULTS=$OUT_DIR/results.jsonl
: > "$RESULTS"
rm -f "$OUT_DIR/gpu_step.jsonl" "$OUT_DIR/env.json" "$OUT_DIR/tiny_metrics.json"
exec > >(tee -a "$OUT_DIR/run.log") 2>&1
START=$(date +%s)
FAILED=0

SITE=$WORK/site
export PYTHONPATH="$SITE:$REPO" KIT_SITE="$SITE" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME="$WORK/hf"
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled SFT_WANDB_ENABLED=false
cd "$REPO" || exit 2
# The dry run on a small shared CPU: one thread per process (two OpenMP threads spinning against other jobs made CPU
# steps several times slower on the 2-core dev box; benchmarks/README.md).
[ $DRY -eq 1 ] && export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# CPU seconds used so far by this script's children (bash's `times`, second line: user and system).
# cpu_mark must run in this shell, not in a $(...) (that would time the subshell), so it writes to a file.
cpu_mark() { times > "$WORK/.times"; }
cpu_read() { tail -1 "$WORK/.times" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, a, "m");
  s += a[1] * 60 + a[2] }; printf "%.1f", s }'; }

record() {  # stage status rc seconds cpu_seconds note
  "$PYTHON" -c 'import json, sys; a = sys.argv; print(json.dumps({"stage": a[1], "status": a[2], "rc": int(a[3]),
"seconds": float(a[4]), "cpu_seconds": float(a[5]), "note": a[6], "dry_run": a[7] == "1"}))' "$@" "$DRY" >> "$RESULTS"
}

# stage NAME TIMEOUT_S MIN_S -- command...: runs it under `timeout` (the whole process group, workers included),
# cut to the budget that is left; skipped when less than MIN_S is left.
stage() {
  local name=$1 limit=$2 min=$3; shift 4
  local remaining; remaining=$(left)
  [ "$remaining" -lt "$limit" ] && limit=$remaining
  if [ "$limit" -lt "$min" ]; then
    echo "== $name: skipped, ${remaining}s of the ${BUDGET_S}s budget left (needs ${min}s)"
    record "$name" skipped 0 0 0 "budget: ${remaining}s left, needs ${min}s"
    FAILED=1
    return 1
  fi
  echo "== $name (timeout ${limit}s, $(date -u +%H:%M:%S)): $*"
  local t0 c0 rc status; t0=$(date +%s.%N); cpu_mark; c0=$(cpu_read)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local took cpu; took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  cpu_mark
  cpu=$(awk -v a="$c0" -v b="$(cpu_read)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  echo "== $name: $status (exit $rc) in ${took}s, ${cpu} CPU-s"
  record "$name" "$status" "$rc" "$took" "$cpu" "${NOTE:-}"
  [ $rc -eq 0 ] || FAILED=1
  return $rc
}

echo "device run: $(date -u +%FT%TZ), dry run $DRY, out $OUT_DIR, work $WORK, budget ${BUDGET_S}s, python $PYTHON"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. The kit into a private folder: no index, no dependencies resolved (the image's torch stays as it is).
# A DEVICE_WORK kept from an earlier run with the same kit keeps its install (and the .pyc files written into it).
LINKS=()
for kit in "${KITS[@]}"; do LINKS+=(--find-links "$kit"); done
KIT_KEY=$( { cat "${KITS[0]}/requirements.txt"; for kit in "${KITS[@]}"; do ls -l "$kit"; done; } | cksum)
if [ "$(cat "$SITE/.kit-key" 2>/dev/null)" = "$KIT_KEY" ]; then
  echo "== install: the kit is already in $SITE"
  record install ok 0 0 0 "kit: ${KITS[*]} (already installed in $SITE)"
else
  rm -rf "$SITE"
  NOTE="kit: ${KITS[*]}" stage install 120 5 -- "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile \
    --disable-pip-version-check --target "$SITE" "${LINKS[@]}" -r "${KITS[0]}/requirements.txt" || {
    echo "device run: the kit did not install; nothing else can run"; exit 1; }
  echo "$KIT_KEY" > "$SITE/.kit-key"
fi

# 2. What the job needs against what is there (missing or conflicting distributions fail this stage only).
# env.json's "runtime": Python, torch, CUDA, the GPU, transformers, flash-attn.
NOTE="env.json" stage env 60 5 -- "$PYTHON" -m benchmarks.device.kit check --json "$OUT_DIR/env.json"

# 3. The whole job on the tiny Qwen3-VL: on CUDA in bf16 with 4-bit, gradient checkpointing and workers (the
# production paths); --dry-run: the CPU, 1 step, post-eval on 4 rows.
TINY=$WORK/tiny
if [ $DRY -eq 1 ]; then
  TINY_ENV=(SFT_MAX_STEPS=1 SFT_SAVE_STEPS=1 SFT_LOGGING_STEPS=1 SFT_TRAIN_SUBSET=16 SFT_EVAL_SUBSET=4
            SFT_EVAL_PRE=false SFT_EVAL_MAX_NEW_TOKENS=4 SFT_GRADIENT_CHECKPOINTING=false
            SFT_DATALOADER_NUM_WORKERS=0)
else
  TINY_ENV=(SFT_MAX_STEPS=20 SFT_SAVE_STEPS=10 SFT_LOGGING_STEPS=5 SFT_EVAL_MAX_NEW_TOKENS=16
            SFT_GRADIENT_CHECKPOINTING=true SFT_DATALOADER_NUM_WORKERS=2)
fi
rm -rf "$WORK/tiny-out"
if NOTE="$TINY" stage tiny-assets 120 20 -- "$PYTHON" -m job.demo.tiny "$TINY"; then
  NOTE="tiny_metrics.json" stage tiny-run "$TINY_RUN_S" 30 -- env SFT_MODEL_ID="$TINY/model" \
    SFT_DATASET_URI="$TINY/data" SFT_OUTPUT_DIR="$WORK/tiny-out" SFT_RUN_ID=device-smoke SFT_LEARNING_RATE=5e-3 \
    SFT_PER_DEVICE_BATCH_SIZE=4 SFT_GRAD_ACCUM=1 SFT_WARMUP_RATIO=0.05 SFT_LORA_DROPOUT=0 SFT_MAX_LENGTH=512 \
    SFT_IMAGE_MIN_PIXELS=4096 SFT_IMAGE_MAX_PIXELS=16384 SFT_EVAL_BATCH_SIZE=16 "${TINY_ENV[@]}" "$PYTHON" -m job run
else
  record tiny-run skipped 0 0 0 "tiny-assets did not finish"
  FAILED=1
fi
[ -f "$WORK/tiny-out/metrics.json" ] && cp "$WORK/tiny-out/metrics.json" "$OUT_DIR/tiny_metrics.json"

# 4. The 8B step benchmark and the 4096-token memory probe, one process (the model loads once); each measurement
# is a line of gpu_step.jsonl as soon as it ends.
# Then (benchmarks/gpu_auto.py) the vision forward with the patch embedding as a GEMM and as the Conv3d, and the
# micro-batch SFT_PER_DEVICE_BATCH_SIZE=auto picks on this GPU with tokens/s at it against batch 2 (the same effective
# batch: 2 x --auto-accum rows per step; the dry run 2 rows, so it tries 1 and 2 only).
if [ $DRY -eq 1 ]; then
  GPU_STEP=(--dry-run --warmup 0 --assets "$TINY" --auto-accum 1)
else
  GPU_STEP=(--rows 48 --warmup 2 --steps 8 --work-dir "$WORK/gpu-step" --auto-accum 4)
fi
NOTE="gpu_step.jsonl" stage gpu-step "$GPU_STEP_S" 60 -- "$PYTHON" -m benchmarks.gpu_step "${GPU_STEP[@]}" --liger-ab \
  --memory-probe 4096 --patch-embed-ab --auto-batch --json "$OUT_DIR/gpu_step.jsonl"

# 5. SDPA vs FlashAttention-2: only with a flash-attn built for this torch, and PyPI has none (sdist only; a source
# build needs nvcc and takes about an hour on 16 cores), so the kit carries none.
if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('flash_attn') is None)"; then
  record fa2 skipped 0 0 0 "flash-attn is installed here: gpu_step's ours stack used it (see gpu_step.jsonl attn)"
else
  record fa2 skipped 0 0 0 "no flash-attn wheel for this torch: PyPI has only the sdist; ours ran on sdpa"
fi

echo "device run: done in $(( $(date +%s) - START ))s; $(grep -c '"ok"' "$RESULTS") stage(s) ok; results in $OUT_DIR"
cat "$RESULTS"
exit $FAILED
