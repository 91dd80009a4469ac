#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM slice: create it (or reuse it), copy this repository to every worker,
# install the pinned stack with the TPU build of jax, and run main.py on all workers at once.
#
#   TPU_NAME=esvit ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh --config configs/swin_t.py --workdir gs://BUCKET/esvit/swin_t
#
# Optional: TPU_VERSION (default tpu-ubuntu2204-base), SPOT=1 for a preemptible (spot) slice.
# Every worker runs the same command; main.py --distributed joins JAX's multi-controller runtime, which
# finds the other workers from the TPU metadata. Re-running the script resumes from the workdir.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR, e.g. v4-32}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
[ "$#" -gt 0 ] || { echo "usage: $0 --config CONFIG --workdir gs://... [more main.py flags]" >&2; exit 2; }
cd "$(dirname "$0")/.."

tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }

if ! tpu describe "$TPU_NAME" >/dev/null 2>&1; then
  tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$TPU_VERSION" ${SPOT:+--spot}
fi

archive="$(mktemp -d)/esvit-jax.tar.gz"
git archive --format=tar.gz -o "$archive" HEAD
tpu scp "$archive" "$TPU_NAME":esvit-jax.tar.gz --worker=all
tpu ssh "$TPU_NAME" --worker=all --command "set -e
  mkdir -p esvit-jax && tar -xzf esvit-jax.tar.gz -C esvit-jax && cd esvit-jax
  sed 's/^jax\[cpu\]/jax[tpu]/' requirements.txt > requirements-tpu.txt
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -r requirements-tpu.txt"

printf -v args '%q ' "$@"
tpu ssh "$TPU_NAME" --worker=all --command "cd esvit-jax && .venv/bin/python main.py --distributed $args"
