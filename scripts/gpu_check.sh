#!/usr/bin/env bash
# One prepared GPU check, run in one call on a lent GPU machine (an H100/H200 with torch, no DALI, no FFCV):
#   1. DALI for that machine's Python, from wheel parts carried under .whl/ (scripts/gpu_wheels.sh makes them)
#   2. the GPU tests: DALI's GPU pipeline, RoI pool, loss, the step (graph capture, side-stream prefetch)
#   3. make bench's figures at 32 and 128 images per GPU (ResNet-50, 224 px, bf16): the step eager /
#      compiled / graph-captured, and end to end per backend (torch with prefetch off and on, DALI)
#   4. a short ResNet-50 pretrain with --compile=true
# Logs and bench.jsonl under ${OUT:-runs/gpu_check}. Budget: at most 9.5 minutes (the parts' timeouts add up
# to 565 s; what a part measured before its timeout stays in its log), in one call of timeout_s=590.
#
#   device call 1..k (warm machine):  carry .whl/part-XX (one 50 MiB part each); the command is `true`
#   device call k+1:                  carry the last part; command: bash scripts/gpu_check.sh
# (a warm machine keeps ignored paths between calls; see scripts/gpu_wheels.sh)
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
DATA=${DATA:-data/bench1000}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    | tee -a "$OUT/gpu.txt"

# ---- 1. DALI from the carried parts (joined in order), installed beside the machine's torch
if ls .whl/part-* > /dev/null 2>&1; then
    mkdir -p /tmp/wheels && cat .whl/part-* > "/tmp/wheels/$(cat .whl/NAME)" \
        && sha256sum -c .whl/SHA256SUMS \
        && tar -C /tmp/wheels -xf /tmp/wheels/wheels.tar \
        && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            /tmp/wheels/wheels/*.whl \
        && export PYTHONPATH=$PWD:/tmp/site
fi
$PY -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -n 1 | tee -a "$OUT/gpu.txt"
BACKENDS=torch
$PY -c "import nvidia.dali" 2>/dev/null && BACKENDS=torch,dali

# ---- 2. the GPU tests (CPU-only tests ran in CI)
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor  # one compilation cache for the bench and the pretrain
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/test_dali.py tests/test_roi.py tests/test_loss.py \
    "tests/test_step.py::test_graph_captured_and_prefetched_steps_match_eager_on_cuda" 2>&1 | tail -n 25 \
    | tee "$OUT/tests.txt"

# ---- 3. the bench at 32 and 128 images per GPU: every mode, then end to end per backend (graph-captured)
$PY -c "from pipelines.sample_data import make_sample_data as m; m('$DATA', num_images=1000)" > /dev/null
for BATCH in 32 128; do
    timeout $([ $BATCH = 32 ] && echo 200 || echo 150) $PY -m maskco.bench --backend=$BACKENDS --data="$DATA" --batch-size=$BATCH --threads=16 \
        --batches=20 --steps=20 --repeats=3 --modes=eager,compiled,graphs --skip=decode,baseline,roi \
        --out-dir="$OUT/bench$BATCH" 2>&1 | grep -v '^{' | tee "$OUT/bench$BATCH.txt"
done

# ---- 4. a short compiled ResNet-50 pretrain (graph-captured), the trainer's own img/s in its log
timeout 95 $PY -m maskco.train r50_imagenet_200ep --data="$DATA" --batch_size=32 --max_steps=60 --log_every=20 \
    --workers=14 --resume=none --out_dir=/tmp/r50 --export=false --compile=true --compile_mode=reduce-overhead \
    2>&1 | tail -n 6 | tee "$OUT/pretrain.txt"
