#!/usr/bin/env bash
# SLURM example: one `srun` task per node, each running torchrun over that node's GPUs; torchrun's c10d
# rendezvous on the first node joins them. Submit with:  sbatch scripts/slurm_pretrain.sh DATA [CONFIG] [--key=value ...]
#SBATCH --job-name=maskco
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
# --signal=TERM@120: SLURM sends SIGTERM two minutes before the time limit; the trainer writes a
# checkpoint at the next log step and exits, and resubmitting the same job resumes from it.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch scripts/slurm_pretrain.sh DATA [CONFIG] [--key=value ...]" >&2
  exit 2
fi
DATA=$1
CONFIG=${2:-r50_imagenet_200ep}
shift $(( $# >= 2 ? 2 : 1 ))
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 .venv/bin/torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:29500" --rdzv_id="$SLURM_JOB_ID" \
  -m maskco.train "$CONFIG" --data="$DATA" "$@"
