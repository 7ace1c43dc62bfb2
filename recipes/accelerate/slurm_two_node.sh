#!/usr/bin/env bash
# Two nodes × 8 GPUs under Slurm: one task per node, each starts accelerate's launcher for its 8 GPUs.
#   sbatch recipes/accelerate/slurm_two_node.sh recipes/qwen3/opd_1p7b_from_8b_full.yaml [KEY=VALUE overrides]
#SBATCH --job-name=opd
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
set -euo pipefail
RECIPE=${1:?usage: sbatch slurm_two_node.sh RECIPE [overrides]}
shift
CONFIG=${CONFIG:-recipes/accelerate/two_node_fsdp2.yaml}
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PORT=${MAIN_PORT:-29500}
# Secrets (served-teacher API keys, HF tokens) come from the environment of the job, never from the recipe.
srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file $CONFIG \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * 8)) \
    --machine_rank \$SLURM_PROCID --main_process_ip $MAIN_NODE --main_process_port $MAIN_PORT \
    -m opd_plugins train $RECIPE $*"
