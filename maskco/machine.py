"""``python -m maskco.machine --gpus N [--data PATH] [--config NAME] [--config-given]``: does ``make pretrain
GPUS=N`` fit this machine? One line and exit 2 where it does not, before anything is launched.

The Makefile runs this for several GPUs only (one process needs no check: it runs the CPU demo, or one
GPU if there is one). Refused:

- more GPUs than torch sees (on a CPU machine ``make pretrain GPUS=2`` used to launch the ResNet-50
  ImageNet preset on CPU processes without a word);
- several GPUs with neither ``DATA`` nor an explicit ``CONFIG``: the default preset for several GPUs is
  the 200-epoch ImageNet run, which would otherwise train on the 240 sample images.
"""
from __future__ import annotations

import sys

from maskco import cli


def refusal(gpus: int, visible: int, data: str, config: str, config_given: bool) -> str | None:
    """Why ``make pretrain GPUS=gpus`` must not start here (None: it may)."""
    if gpus > visible:
        where = "no CUDA GPU" if visible == 0 else f"only {visible} CUDA GPU(s)"
        return (f"GPUS={gpus}, but torch sees {where} here; on this machine run `make pretrain` (one process: the "
                "CPU demo, or one GPU), or start CPU processes yourself: "
                f"`.venv/bin/torchrun --nproc_per_node={gpus} -m maskco.train cpu_demo --device=cpu`")
    if not data and not config_given:
        return (f"GPUS={gpus} trains the {config} preset (ResNet-50 on ImageNet) and needs "
                f"DATA=/path/to/imagenet/train; without DATA it would train on the sample images. "
                "Give DATA=..., or CONFIG=cpu_demo (or another preset) to train it on the sample images")
    return None


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m maskco.machine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, required=True, help="processes per node (make's GPUS)")
    parser.add_argument("--data", default="", help="make's DATA (empty: the sample set)")
    parser.add_argument("--config", default="r50_imagenet_200ep", help="the preset make would run")
    parser.add_argument("--config-given", action="store_true", help="CONFIG was set by the user, not defaulted")
    args = parser.parse_args(argv)
    import torch  # here: --help needs no torch

    why = refusal(args.gpus, torch.cuda.device_count(), args.data, args.config, args.config_given)
    if why:
        print(f"make pretrain: {why}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
