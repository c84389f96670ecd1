#!/usr/bin/env bash
# One prepared GPU check (run on a lent GPU machine): GPU tests, micro-benchmarks, make bench (torch
# backend + step), and a short ResNet-50 bf16 pretrain. Writes logs under ${OUT:-runs/gpu_check}.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
[ -n "${GPU_TESTS:-}" ] && timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_roi.py tests/test_loss.py tests/test_boxes.py tests/test_augment.py tests/test_model.py 2>&1 | tail -n 15 | tee "$OUT/tests.txt"
timeout 60 $PY -m maskco.bench.micro --device cuda --repeats 20 2>&1 | tee "$OUT/micro.txt"
timeout 150 $PY -m maskco.bench --backend=torch --data=data/bench1000 --threads=16 --batches=10 --steps=10 --repeats=3 --skip=decode,baseline,roi --out-dir="$OUT" 2>&1 | grep -v '^{' | tee "$OUT/bench.txt"
timeout 100 $PY -m maskco.train r50_imagenet_200ep --data=data/bench1000 --max_steps=60 --log_every=20 --workers=14 --resume=none --out_dir=/tmp/r50 --export=false 2>&1 | tail -n 6 | tee "$OUT/pretrain.txt"
