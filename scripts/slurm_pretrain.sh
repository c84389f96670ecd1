#!/usr/bin/env bash
# MaskCo pretraining under SLURM: one `srun` task per node, each running torchrun over that node's GPUs;
# torchrun's c10d rendezvous on the first node joins them.
#
#   sbatch scripts/slurm_pretrain.sh DATA [CONFIG] [--key=value ...]
#   sbatch --nodes=4 scripts/slurm_pretrain.sh /datasets/imagenet/train r50_imagenet_200ep --epochs=100
#
# CONFIG is a preset name or .yaml path (default r50_imagenet_200ep); an argument starting with "--" is
# an override, never the CONFIG. Paths may be relative to the directory you ran sbatch in.
#
# Preemption and time limits: SLURM signals this script (USR1 two minutes before the time limit, see
# --signal below; TERM on preemption). The script forwards SIGTERM to the trainer, which writes a
# checkpoint at the next step and exits; then the job is requeued (`scontrol requeue`) and resumes from
# that checkpoint when it runs again. Inside the job, torchrun restarts the workers after a crash up to
# MASKCO_RESTARTS times (default 3), resuming from the last checkpoint.
#
# Exit codes: 0 finished; 75 stopped at a checkpoint and requeued (preempted or out of time, not an
# error); anything else is the trainer's failure, as one process exits (2: bad input, 3: training
# diverged, 1: a crash, 128 + N: a rank killed by signal N; see maskco/launch.py).
# Logs: one file per node, logs/<job name>-<job id>-node<N>.out beside the repository's runs/.
#SBATCH --job-name=maskco
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

usage() { echo "usage: sbatch scripts/slurm_pretrain.sh DATA [CONFIG] [--key=value ...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; --*) echo "slurm_pretrain.sh: the first argument is DATA, got '$1'" >&2; usage ;; esac

# The repository: beside this script, or (sbatch runs a copy of it from a spool folder) the folder
# sbatch was called from, or $MASKCO_REPO.
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
SCRIPT_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=${MASKCO_REPO:-}
for candidate in "$SCRIPT_REPO" "$SUBMIT_DIR"; do
  if [ -z "$REPO" ] && [ -d "$candidate/maskco" ]; then REPO=$candidate; fi
done
if [ -z "$REPO" ] || [ ! -x "$REPO/.venv/bin/python" ]; then
  echo "slurm_pretrain.sh: no MaskCo checkout with a .venv found (tried ${MASKCO_REPO:-} $SCRIPT_REPO $SUBMIT_DIR);" \
       "run sbatch from the repository after 'make venv', or set MASKCO_REPO" >&2
  exit 2
fi

absolute() { case "$1" in /*|sample) echo "$1" ;; *) echo "$SUBMIT_DIR/$1" ;; esac; }
DATA=$(absolute "$1"); shift
CONFIG=r50_imagenet_200ep
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then
  CONFIG=$1; shift
  [[ "$CONFIG" == *.yaml ]] && CONFIG=$(absolute "$CONFIG")
fi

JOB_ID=${SLURM_JOB_ID:?slurm_pretrain.sh runs inside a SLURM job: submit it with sbatch}
NODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
# awk reads every line: `head -n 1` would leave scontrol to die of SIGPIPE, which pipefail makes fatal
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | awk "NR == 1")
PORT=$(( 20000 + JOB_ID % 20000 ))  # per job: two jobs sharing a head node do not collide
mkdir -p "$REPO/logs"
cd "$REPO"

requeue() {
  echo "slurm_pretrain.sh: $1: asking the trainer to checkpoint and stop, then requeueing job $JOB_ID" >&2
  kill -TERM "$SRUN_PID" 2>/dev/null || true
  wait "$SRUN_PID" || true
  scontrol requeue "$JOB_ID" || echo "slurm_pretrain.sh: scontrol requeue failed; resubmit the same command to resume" >&2
  exit 75
}
trap 'requeue "time limit near (SIGUSR1)"' USR1
trap 'requeue "preempted (SIGTERM)"' TERM

# srun runs in the background so that this shell can take SLURM's signal (bash runs a trap only
# between commands; `wait` returns at once when a trapped signal arrives).
# maskco.launch is torchrun (same options) that exits with the failed rank's code, not always 1
srun --kill-on-bad-exit=1 --output="$REPO/logs/%x-%j-node%n.out" \
  "$REPO/.venv/bin/python" -m maskco.launch \
  --nnodes="$NODES" --nproc_per_node="$GPUS_PER_NODE" --max-restarts="${MASKCO_RESTARTS:-3}" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$PORT" --rdzv_id="$JOB_ID" \
  -m maskco.train "$CONFIG" --data="$DATA" "$@" &
SRUN_PID=$!
status=0
wait "$SRUN_PID" || status=$?
exit "$status"
