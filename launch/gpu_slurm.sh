#!/usr/bin/env bash
# Pretrain on a SLURM GPU cluster: one process per node, each driving all GPUs of its node.
#
#   sbatch --nodes=2 launch/gpu_slurm.sh --config configs/swin_t.py --workdir /shared/esvit/swin_t
#
# Set up once on the shared filesystem (from the repository root):
#   python3.11 -m venv .venv && sed 's/^jax\[cpu\]/jax[cuda12]/' requirements.txt > requirements-gpu.txt \
#     && .venv/bin/pip install -r requirements-gpu.txt
# main.py --distributed calls jax.distributed.initialize(), which reads the coordinator (the first node of
# the allocation), the number of processes and this process's rank from SLURM's environment.
# Resubmitting the same command resumes from the workdir's latest checkpoint.
#SBATCH --job-name=esvit-jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --output=esvit-%j.out
set -euo pipefail
[ "$#" -gt 0 ] || { echo "usage: sbatch $0 --config CONFIG --workdir DIR [more main.py flags]" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
# exec: srun forwards SLURM's TERM (sent 120 s before the time limit) to main.py, which checkpoints.
exec srun --kill-on-bad-exit=1 .venv/bin/python main.py --distributed "$@"
