"""MaskCo trainer: contrastive mask prediction pretraining with DALI / FFCV / torch data backends.

torch and torchvision are pinned by the install step (Makefile: torch==2.14.1 torchvision==0.29.1);
here they are only lower bounds so that an existing CUDA build of PyTorch is kept.
"""
from setuptools import find_packages, setup

setup(
    name="maskco",
    version="0.1.0",
    description="Fast, faithful MaskCo (contrastive mask prediction, ICCV 2021) pretraining",
    python_requires=">=3.10",
    packages=find_packages(include=["maskco", "maskco.*", "pipelines", "pipelines.*"]),
    package_data={"maskco": ["configs/*.yaml", "configs/detectron2/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "pyyaml",
        "pillow",
        "tqdm",
        "scikit-image",  # its bundled photographs make the sample data set
        "matplotlib",  # the bench's bar chart
        "pycocotools>=2.0.7",  # COCO's box AP for the detection transfer (maskco.evaluate.detect)
    ],
    extras_require={
        "dev": ["pytest", "hypothesis", "ruff"],  # ruff: `ruff check .` (ruff.toml), run by .ci/run
        # FFCV builds against Debian's pkg-config libopencv-dev libturbojpeg0-dev (see README)
        "ffcv": ["ffcv==1.0.2"],
        # the bare name nvidia-dali is a placeholder wheel; this is the CUDA 13 build (torch 2.14 is cu130)
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        "tensorboard": ["tensorboard"],
    },
)
