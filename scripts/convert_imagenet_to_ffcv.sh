#!/usr/bin/env bash
# Convert ImageNet (IMAGENET_DIR/train and IMAGENET_DIR/val, each an ImageFolder of class folders)
# to OUT_DIR/train.beton and OUT_DIR/val.beton for the ffcv backend (python -m pipelines.ffcv_writer).
#
# Images are shrunk to at most 512 px on the longer side unless you pass --max-resolution: the FFCV
# loader keeps a decode buffer of the largest image for every sample in flight, and ImageNet has
# images of several thousand pixels. Other options go to the writer unchanged, e.g.
#   scripts/convert_imagenet_to_ffcv.sh /data/imagenet /data/betons --write-mode proportion \
#       --compress-probability 0.5 --jpeg-quality 90 --workers 32
# Each conversion ends with a summary; skipped files are listed in OUT_DIR/<split>.beton.skipped.txt.
set -euo pipefail

usage="usage: $0 [--python PYTHON] IMAGENET_DIR OUT_DIR [--write-mode jpg|raw|proportion] [--max-resolution PX]
       [--jpeg-quality Q] [--compress-probability P] [--workers N] [--strict] [--quiet]
  --python PYTHON  the interpreter that has this repository's packages and ffcv
                   (default: the repository's .venv/bin/python when it exists, else python3)"

# The repository root on the module path, so that this works without `pip install -e .`.
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x $repo_root/.venv/bin/python ]]; then
    python=$repo_root/.venv/bin/python  # what `make venv EXTRAS=dev,ffcv` made
else
    python=python3
fi
if [[ $# -ge 2 && $1 == --python ]]; then
    python=$2
    shift 2
fi
if [[ $# -lt 2 || $1 == -h || $1 == --help || $1 == -* || $2 == -* ]]; then
    echo "$usage" >&2
    exit 2
fi
imagenet_dir=$1
out_dir=$2
shift 2

for split in train val; do
    if [[ ! -d $imagenet_dir/$split ]]; then
        echo "error: $imagenet_dir/$split is not a folder (expected ImageNet's train and val class folders)" >&2
        exit 2
    fi
done

max_resolution=(--max-resolution 512)
for option in "$@"; do
    if [[ $option == --max-resolution || $option == --max-resolution=* ]]; then
        max_resolution=()
    fi
done

if ! command -v "$python" > /dev/null; then
    echo "error: interpreter $python not found; pass --python PYTHON, or run \`make venv EXTRAS=dev,ffcv\` first" >&2
    exit 2
fi
echo "using $python ($(command -v "$python"))"
# a missing package is one line saying how to install it, not a ModuleNotFoundError traceback
PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" "$python" - <<'CHECK' || exit 2
import importlib, sys
for name in ("torch", "numpy", "PIL", "ffcv"):
    try:
        importlib.import_module(name)
    except ImportError as error:
        print(f"error: {sys.executable} cannot import {name} ({error}); install the ffcv extra into it: "
              "`make venv EXTRAS=dev,ffcv` (after `apt-get install -y pkg-config libopencv-dev libturbojpeg0-dev`), "
              "or pass --python PYTHON", file=sys.stderr)
        sys.exit(2)
CHECK
mkdir -p "$out_dir"
for split in train val; do
    echo "== $split: $imagenet_dir/$split -> $out_dir/$split.beton"
    PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pipelines.ffcv_writer \
        "$imagenet_dir/$split" "$out_dir/$split.beton" "${max_resolution[@]}" "$@"
done
