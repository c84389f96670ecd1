#!/usr/bin/env bash
# Run here (not on the GPU machine): fetch DALI's CUDA 13 wheel and what it needs that the GPU machine's
# image (torch, no DALI) lacks, for that machine's Python (3.12, x86_64); pack them into one tar cut into
# 50 MiB parts under .whl/ (git-ignored). Consecutive device calls to a warm machine carry one part each
# (with NAME and SHA256SUMS); scripts/gpu_check.sh joins, checks, unpacks and installs them there.
#   bash scripts/gpu_wheels.sh [DALI_VERSION]     (default 2.4.0; about 250 MB, 5 parts)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-2.4.0}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
work=$(mktemp -d)
rm -rf .whl && mkdir -p .whl "$work/wheels"
# DALI's Requires-Dist minus what the image has (numpy, packaging, six come with torch); nvimgcodec's
# nvjpeg extra is the one JPEG decoding needs
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$work/wheels" "nvidia-dali-cuda130==$VERSION" \
    astunparse gast nvtx makefun 'libcst~=1.8' optree 'nvidia-nvimgcodec-cu13>=0.9,<0.10' \
    'nvidia-libnvcomp-cu13==5.3.0.16' 'nvidia-nvjpeg>=13,<14' 2>&1 | grep -v "^WARNING: Location" || true
ls "$work/wheels"/nvidia_dali_cuda130-*.whl > /dev/null  # the download must have produced DALI itself
tar -C "$work" -cf "$work/wheels.tar" wheels
echo wheels.tar > .whl/NAME
(cd "$work" && sha256sum wheels.tar | sed "s#  #  /tmp/wheels/#") > .whl/SHA256SUMS
split -b 50M -d "$work/wheels.tar" .whl/part-
rm -rf "$work"
ls -l .whl
echo "carry .whl/NAME, .whl/SHA256SUMS and one .whl/part-NN per device call (warm machine), then run scripts/gpu_check.sh"
