# MaskCo trainer. Every target creates and reuses the virtual environment $(VENV) itself.
#   make pretrain                      CPU demo on the built-in sample data (or one GPU if present)
#   make pretrain GPUS=8 DATA=/imagenet/train CONFIG=r50_imagenet_200ep BACKEND=dali
#   make test | make bench | make show [CKPT=...] | make ffcv DATA=/imagenet OUT=/betons | make linear CKPT=...
#   make bench-gpu [ARGS=--resume]      on a GPU node: every GPU figure of BENCHMARKS.md in one run (runs/gpu_check/)
#   make quality [ARGS="--preset gpu --variants maskco,mocov2,maskco_no_mph"]   MaskCo vs MoCo v2 vs random init on Fashion-MNIST
#   make transfer [ARGS="--seeds 0,1,2"]   detection AP after pretraining on single garments and on scenes
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

GPUS ?= 1
NODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
RDZV_ENDPOINT ?=
RESTARTS ?= 0
CONFIG ?= $(if $(filter 0 1,$(GPUS)),cpu_demo,r50_imagenet_200ep)
DATA ?=
BACKEND ?= torch
ARGS ?=
OUT ?=
CKPT ?=
TRAIN ?=
VAL ?=

DATA_ARG := $(if $(DATA),--data=$(DATA),)
# make bench measures every backend unless BACKEND is given on the command line or in the environment
BENCH_BACKEND := $(if $(filter command line environment,$(origin BACKEND)),$(BACKEND),all)
# one process without torchrun; torchrun (c10d rendezvous) for several GPUs or nodes
ifeq ($(RDZV_ENDPOINT),)
RDZV := --nnodes=$(NODES) --node_rank=$(NODE_RANK) --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT)
else
RDZV := --nnodes=$(NODES) --rdzv_backend=c10d --rdzv_endpoint=$(RDZV_ENDPOINT) --rdzv_id=maskco
endif
MULTI := $(filter-out 0 1,$(GPUS))$(filter-out 1,$(NODES))
# several GPUs: refuse (one line, exit 2) where this machine has fewer, or where the ImageNet preset would
# train on the sample images (no DATA, no CONFIG given); see maskco/machine.py
CONFIG_GIVEN := $(if $(filter command line environment,$(origin CONFIG)),--config-given,)
MACHINE_CHECK := $(if $(filter-out 0 1,$(GPUS)),$(PY) -m maskco.machine --gpus=$(GPUS) --data="$(DATA)" --config=$(CONFIG) $(CONFIG_GIVEN),true)
# pip's output (the editable-install banner, root and version notices) goes to a log, shown only on failure
PIP_QUIET = --disable-pip-version-check > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
# RESTARTS: torchrun relaunches every worker after one dies, up to N times; each relaunch resumes from
# the last checkpoint (multi-GPU / multi-node runs only). maskco.launch is torchrun that exits with the
# failed rank's code (2 bad input, 3 diverged, ...) instead of torchrun's 1
LAUNCH := $(if $(MULTI),$(PY) -m maskco.launch --nproc_per_node=$(GPUS) --max-restarts=$(RESTARTS) $(RDZV),$(PY))

.PHONY: help venv pretrain test bench bench-gpu show ffcv linear export sample quality transfer clean-venv
.DEFAULT_GOAL := help

# `make` alone: what there is to run (nothing is installed or built)
help:
	@echo "MaskCo trainer. On a fresh machine:"
	@echo "  make pretrain   sets up .venv, builds the sample data, pretrains the CPU demo (GPU if there is one)"
	@echo "  make test       sets up .venv and runs the tests"
	@echo "Other targets: make pretrain GPUS=8 DATA=... CONFIG=... | make quality [ARGS=...] | make transfer [ARGS=...] |"
	@echo "  make bench | make bench-gpu | make show [CKPT=...] | make ffcv DATA=... OUT=... |"
	@echo "  make linear CKPT=... TRAIN=... VAL=... | make export CKPT=... | make sample |"
	@echo "  make venv EXTRAS=dev,ffcv,dali | make clean-venv"
	@echo "README.md explains each; docs/DESIGN.md is the map of the code."

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (pip log: $(VENV)/pip.log)"
	@$(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	@$(PY) -m pip install -q $(TORCH_PINS) $(PIP_QUIET)
	@$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH_PINS) $(PIP_QUIET)
	touch $@

# `make venv EXTRAS=dev,ffcv,dali,tensorboard` adds optional backends (and TensorBoard) to the environment
venv: $(VENV)/.installed
	@echo "pip install -e .[$(EXTRAS)] into $(VENV) (pip log: $(VENV)/pip.log)"
	@$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH_PINS) $(PIP_QUIET)

pretrain: $(VENV)/.installed
	@$(MACHINE_CHECK)
	$(LAUNCH) -m maskco.train $(CONFIG) --backend=$(BACKEND) $(DATA_ARG) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m maskco.bench --backend=$(BENCH_BACKEND) $(DATA_ARG) $(ARGS)

# the GPU acceptance run: stages, time limits and output in scripts/gpu_check.sh's header; ARGS=--resume
# reruns only the unfinished stages, ARGS=--rehearse runs them all on a CPU with tiny sizes
bench-gpu: $(VENV)/.installed
	PY=$(PY) bash scripts/gpu_check.sh $(ARGS)

# with CKPT the checkpoint's settings are the base (CONFIG would change its model): only DATA, BACKEND, ARGS
show: $(VENV)/.installed
	$(PY) -m maskco.show $(if $(CKPT),--checkpoint=$(CKPT),$(CONFIG)) --backend=$(BACKEND) $(DATA_ARG) $(ARGS)

sample: $(VENV)/.installed
	$(PY) -m pipelines.sample_data data/sample

ffcv: $(VENV)/.installed
	@test -n "$(DATA)" -a -n "$(OUT)" || { echo "usage: make ffcv DATA=imagenet_root OUT=out_dir [ARGS=...]"; exit 2; }
	PATH=$(abspath $(VENV))/bin:$$PATH scripts/convert_imagenet_to_ffcv.sh $(DATA) $(OUT) $(ARGS)

linear: $(VENV)/.installed
	@test -n "$(CKPT)" -a -n "$(TRAIN)" -a -n "$(VAL)" || { echo "usage: make linear CKPT=checkpoint TRAIN=train_dir VAL=val_dir [GPUS=n] [ARGS=...]"; exit 2; }
	$(LAUNCH) -m maskco.evaluate.linear --checkpoint $(CKPT) --train $(TRAIN) --val $(VAL) $(ARGS)

export: $(VENV)/.installed
	@test -n "$(CKPT)" -a -n "$(OUT)" || { echo "usage: make export CKPT=checkpoint OUT=dir"; exit 2; }
	$(PY) -m maskco.export $(CKPT) --out-dir $(OUT)

quality: $(VENV)/.installed
	$(LAUNCH) -m maskco.quality $(ARGS)

# the paper's claim: pretrain on single garments and on scenes, fine-tune a detector, AP by pycocotools
transfer: $(VENV)/.installed
	$(PY) -m maskco.transfer $(ARGS)

clean-venv:
	rm -rf $(VENV)
