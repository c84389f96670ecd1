#!/usr/bin/env bash
# The prepared GPU run: everything the first lent GPU (H100 / H200 with torch, no DALI, no FFCV) should
# bring back, in two device calls, every figure kept as it is measured (scripts/gpu_plan.py runs the stages).
#
#   call 1, torch only (timeout_s=270; its stages get 255 s):
#     env (card, driver, versions) | data (4,096 JPEGs) | compile: the six graph sets of the bench at 32 and
#     128 (compiled, graph-captured, the prefetch pair), each compiled cold in its own process, at once |
#     bench32: the step eager / graph-captured / compiled, boxes + augmentation + masking, e2e torch
#     (prefetch off and on), MaskCo against MoCo v2 | pretrain: the trainer, preset quality_gpu, graph-captured
#   call 2, DALI (timeout_s=210; 195 s): env | dali: join, check, unpack the carried parts | bench128: the step
#     in the three modes, e2e torch and DALI | dali32: DALI's two views at 0.9 on the hardware decoder, e2e |
#     dali32_hw65: the loader at 0.65 | tests: the CUDA tests (DALI's GPU pipeline, RoI, loss, the captured step)
#
# Device minutes, with a cold start: start 2.5 + call 1 4.5 + call 2 3.5 = 10.5; with a rerun of call 1
# (4.5; on a warm machine `--resume` reruns only the unfinished stages, the compiled code cached): 15.0.
# Issue call 2 at once after call 1: the machine stays warm 30 s, and with it Inductor's cache (a cold
# call 2 compiles the 128 graphs again and may not reach dali32). The compile allowances are the issue's
# 60-100 s per graph set (whole-step compile of ResNet-50 on an H100), not yet measured here: every
# stage's row gives its seconds and every compiled figure its warmup_s, to resize the next plan.
#
# Prepare here (not on the GPU machine): bash scripts/gpu_wheels.sh   (DALI for Python 3.12 and sm_90 in
# .whl/, one part under 60 MiB), then the device calls (gpu_plan.py --list prints them with this commit):
#   run(command="bash scripts/gpu_check.sh --call 1 --commit REV", timeout_s=270)
#   run(command="bash scripts/gpu_check.sh --call 2 --commit REV", carry=[".whl"], timeout_s=210)
# What comes back ($OUT, at most 4 files per call): rows.jsonl (every figure, flushed as measured, with the
# card, driver, torch / DALI versions and commit), log.txt, summary.md (the table for BENCHMARKS.md) and
# inductor_cache.tar.xz when small (copy it to .carry/ and add ".carry" to the next session's carry).
#
#   bash scripts/gpu_check.sh --rehearse [--call 1|2|all]   every stage on this CPU, tiny sizes, < 5 min
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    PY=python3
    [ -x .venv/bin/python ] && PY=.venv/bin/python
fi
args=("$@")
if [[ " $* " == *" --rehearse "* && " $* " != *" --call "* ]]; then
    args+=(--call all)
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" scripts/gpu_plan.py "${args[@]}"
