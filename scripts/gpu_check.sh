#!/usr/bin/env bash
# The GPU acceptance run (`make bench-gpu`): every GPU figure of BENCHMARKS.md measured on this machine's
# first GPU in one run of a few minutes, each figure kept as it is measured (scripts/gpu_plan.py runs the
# stages; `python3 scripts/gpu_plan.py --list` prints them with their time limits).
#
#   env: card, driver, versions | data: 4,096 JPEGs | compile: the six graph sets of the bench at 32 and 128
#   images per GPU (compiled, graph-captured, the prefetch pair), each compiled cold in its own process, at
#   once | bench32: the R50 MaskCo step eager / graph-captured / compiled, boxes + augmentation + masking as
#   a share of the step, e2e torch (prefetch off and on), MaskCo against MoCo v2 | bench128: the step in the
#   three modes, e2e torch and DALI | pretrain: the trainer, preset quality_gpu, graph-captured | dali32:
#   DALI's two views with 90 % of JPEGs on the hardware decoder, then e2e | dali32_hw65: the same at 0.65 |
#   tests: the CUDA tests (DALI's GPU pipeline, RoI pool, loss, the captured step)
#
# Each stage runs under `timeout -k` with its own time limit, so a hang costs one stage, not the run (the
# limits are in scripts/gpu_plan.py: at most 19 min together, 4 min of it the cold compile of the six sets).
# The DALI figures need DALI: `make venv EXTRAS=dev,dali` (nvidia-dali-cuda130); without it they are
# skipped, with the reason. What it writes, in runs/gpu_check/ (or --out DIR):
#   rows.jsonl   every figure, flushed as measured, with the card, driver, torch / DALI versions and commit
#   log.txt      everything the stages printed
#   summary.md   the table for BENCHMARKS.md and the targets (also printed at the end)
#   stages.json  the finished stages: `--resume` reruns only the others
#
#   bash scripts/gpu_check.sh [--out DIR] [--resume]
#   bash scripts/gpu_check.sh --rehearse     every stage on this CPU, tiny sizes, a few minutes (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    PY=python3
    [ -x .venv/bin/python ] && PY=.venv/bin/python
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" scripts/gpu_plan.py "$@"
