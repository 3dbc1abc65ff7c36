#!/usr/bin/env bash
# The GPU work of one device session, in one call (a lent GPU machine has torch, transformers and peft, no
# diffusers, no network, 15 minutes a session, and returns at most 8 files of 16 MiB):
#   1. the embedded base model (flowbp_core/world) trained on the GPU at the committed size (6 layers, 4 x 64
#      heads: the largest whose float16 checkpoint stays under 30 MB), two batch sizes side by side (one small
#      model leaves the GPU mostly idle); each final checkpoint comes back split in two (split -b 15M; join
#      with cat), evaluated here afterwards;
#   2. the real-size learner-step costs, benchmarks/gpu_step.py (SD3.5-M, FLUX.1, FLUX.2-Klein), after the
#      training so that nothing shares the GPU with its timings.
# CHECKS=rollout runs, instead and alone (it takes the call's 10 minutes: 540 s budget, 570 s timeout):
#   3. benchmarks/gpu_rollout.py: SD3.5-M rollout ms per sample-step (batch 1/4/16, eager and compiled, plain,
#      merged LoRA, peft adapter) against the arithmetic limit, one flowbp_sparse learner step, the full
#      state's CUDA IPC handoff between two processes; it needs only whl/ (not minilm.tar.gz).
# What it needs beside the repository, in one folder (default .gpu, listed in .git/info/exclude), carried as
# two paths (.gpu/whl and .gpu/minilm.tar.gz; the repository is ~34 MB of the transfer's 64 MiB):
#   whl/              the diffusers wheel (pip download --no-deps diffusers==0.42.1 -d .gpu/whl)
#   minilm.tar.gz     the text encoder, packed by `python benchmarks/pack_minilm.py --out .gpu` (19.8 MiB)
# Usage there: OUT=<folder> [CHECKS=rollout] bash benchmarks/gpu_checks.sh [.gpu]. SMOKE=1 runs the same steps
# tiny on a CPU.
set -u
C=${1:-.gpu}
CHECKS=${CHECKS:-train,step}
: "${OUT:?set OUT to the folder that receives the results}"
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; MINUTES=0.1; BATCH_A=8; BATCH_B=16; WORKERS=1; LAYERS=1; HEAD=16; STEP_ARGS="--smoke --backbones sd3"
  STEP_TIMEOUT=300
else
  DEV=cuda; MINUTES=4; BATCH_A=256; BATCH_B=1024; WORKERS=6; LAYERS=6; HEAD=64
  STEP_ARGS="--backbones sd3,flux1,flux2 --budget-s 170"; STEP_TIMEOUT=200
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$C"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  nvidia-smi -L
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" || exit 1
if [ "$CHECKS" = rollout ]; then
  ROLLOUT_ARGS=""; [ "${SMOKE:-0}" = 1 ] && ROLLOUT_ARGS="--smoke"
  # shellcheck disable=SC2086
  timeout 570 python3 benchmarks/gpu_rollout.py $ROLLOUT_ARGS --budget-s 540 --out "$OUT" 2>&1 \
    | tee "$OUT/gpu_rollout.log"
  ls -l "$OUT"; exit 0
fi
rm -rf /tmp/gpu_checks; mkdir -p /tmp/gpu_checks
tar -xzf "$C/minilm.tar.gz" -C /tmp/gpu_checks || exit 1
export FLOWBP_MINILM_PATH=/tmp/gpu_checks/minilm

train() {  # name batch lr
  timeout $(( ${MINUTES%.*} * 60 + 120 )) python3 -m services.entrypoints.world.train_base \
    --device "$DEV" \
    --workers "$WORKERS" --threads 2 --out "/tmp/gpu_checks/$1" --batch "$2" --lr "$3" --layers "$LAYERS" \
    --heads 4 --head-dim "$HEAD" --ema 0.999 --minutes "$MINUTES" --ckpt-minutes 100 >"/tmp/gpu_checks/$1.log" 2>&1
  echo "train $1 (batch $2, lr $3): rc $?"; tail -n 2 "/tmp/gpu_checks/$1.log"
  cp "/tmp/gpu_checks/$1/train_log.jsonl" "$OUT/$1_train_log.jsonl"
  split -b 15M "/tmp/gpu_checks/$1/transformer.safetensors" "$OUT/$1.safetensors.part-"
}
train A "$BATCH_A" 1e-3 & train B "$BATCH_B" 1.5e-3 & wait

# shellcheck disable=SC2086
timeout "$STEP_TIMEOUT" python3 benchmarks/gpu_step.py $STEP_ARGS --out "$OUT" 2>&1 | tee "$OUT/gpu_step.log"
ls -l "$OUT"
