#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM slice: create it (or reuse it), copy this repository to every worker,
# install the pinned stack with the TPU build of jax, and run main.py on all workers at once.
#
#   TPU_NAME=esvit ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh --config configs/swin_t.py --workdir gs://BUCKET/esvit/swin_t
#
# Optional: TPU_VERSION (default tpu-ubuntu2204-base), SPOT=1 for a preemptible (spot) slice, JAX_EXTRA
# (default tpu). The workers install with launch/install.sh, which brings its own Python 3.11 (the image's
# python3 is 3.10, too old for the pins). Every worker runs the same command; main.py --distributed joins
# JAX's multi-controller runtime, which finds the other workers from the TPU metadata. Re-running the
# script resumes from the workdir.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR, e.g. v4-32}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
JAX_EXTRA="${JAX_EXTRA:-tpu}"
[ "$#" -gt 0 ] || { echo "usage: $0 --config CONFIG --workdir gs://... [more main.py flags]" >&2; exit 2; }
cd "$(dirname "$0")/.."

tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }

if ! tpu describe "$TPU_NAME" >/dev/null 2>&1; then
  tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$TPU_VERSION" ${SPOT:+--spot}
fi

# The checkout as it is: tracked files and new ones that git does not ignore (not .venv or workdirs).
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -czf "$scratch/esvit-jax.tar.gz" -T -
tpu scp "$scratch/esvit-jax.tar.gz" "$TPU_NAME":esvit-jax.tar.gz --worker=all
tpu ssh "$TPU_NAME" --worker=all --command "set -e
  mkdir -p esvit-jax && tar -xzf esvit-jax.tar.gz -C esvit-jax && cd esvit-jax
  JAX_EXTRA=$JAX_EXTRA bash launch/install.sh .venv"

printf -v args '%q ' "$@"
tpu ssh "$TPU_NAME" --worker=all --command "cd esvit-jax && .venv/bin/python main.py --distributed $args"
