#!/usr/bin/env bash
# Pretrain on a SLURM GPU cluster: one process per node, each driving all GPUs of its node.
#
#   sbatch --nodes=2 launch/gpu_slurm.sh --config configs/swin_t.py --workdir /shared/esvit/swin_t
#
# Submit from the repository root on the shared filesystem. The job first installs the pinned stack with
# the CUDA build of jax into VENV (default .venv; JAX_EXTRA default cuda12, or cuda13) with
# launch/install.sh, which brings its own Python 3.11; a second submission finds it installed. main.py
# --distributed calls jax.distributed.initialize(), which reads the coordinator (the first node of the
# allocation), the number of processes and this process's rank from SLURM's environment. Resubmitting the
# same command resumes from the workdir's latest checkpoint.
#SBATCH --job-name=esvit-jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --output=esvit-%j.out
set -euo pipefail
[ "$#" -gt 0 ] || { echo "usage: sbatch $0 --config CONFIG --workdir DIR [more main.py flags]" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
VENV="${VENV:-.venv}"
JAX_EXTRA="${JAX_EXTRA:-cuda12}" bash launch/install.sh "$VENV"  # Once, on the first node, before srun.

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
# JAX gives a SLURM process only the GPU numbered SLURM_LOCALID unless told otherwise: one process per
# node must see all of its node's GPUs.
export JAX_LOCAL_DEVICE_IDS="${JAX_LOCAL_DEVICE_IDS:-$(seq -s, 0 $((${SLURM_GPUS_ON_NODE:-8} - 1)))}"
# exec: srun forwards SLURM's TERM (sent 120 s before the time limit) to main.py, which checkpoints.
exec srun --kill-on-bad-exit=1 "$VENV/bin/python" main.py --distributed "$@"
