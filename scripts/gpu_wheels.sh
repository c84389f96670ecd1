#!/usr/bin/env bash
# Run here (not on the GPU machine): DALI for the lent GPU machine (Python 3.12, x86_64, an H100 / H200:
# sm_90), cut to what its GPU decode needs and packed under .whl/ (git-ignored) in the fewest parts a device
# call can carry (scripts/gpu_wheels.py says what is cut and why). Call 2 of scripts/gpu_check.sh carries
# .whl and unpacks it there; `bash scripts/gpu_check.sh --rehearse` checks the parts here (sizes, count,
# reassembly, an install into a fresh venv).
#   bash scripts/gpu_wheels.sh [DALI_VERSION] [ARCH]     (default 2.4.0 and 90; about 9 min on 2 cores)
# Measured for 2.4.0 (BENCHMARKS.md): the 262 MB wheel set (5 parts of 50 MiB before) becomes one part.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-2.4.0}
ARCH=${2:-90}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# DALI's Requires-Dist minus what the image has (numpy, packaging, six come with torch) and what its decode
# never loads (nvCOMP; libcst and nvtx serve its experimental dynamic mode); nvImageCodec's nvjpeg extra
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$work" "nvidia-dali-cuda130==$VERSION" \
    astunparse gast makefun optree 'nvidia-nvimgcodec-cu13>=0.9,<0.10' 'nvidia-nvjpeg>=13,<14' \
    2>&1 | grep -v "^WARNING: Location" || true
ls "$work"/nvidia_dali_cuda130-*.whl > /dev/null  # the download must have produced DALI itself
du -cb "$work"/*.whl | tail -n 1 | awk '{printf "wheel set: %.0f MB\n", $1 / 1e6}'
python3 scripts/gpu_wheels.py pack "$work" --out .whl --python 3.12 --arch "$ARCH"
ls -l .whl
python3 scripts/gpu_wheels.py check .whl
