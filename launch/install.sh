#!/usr/bin/env bash
# Installs the pinned stack of requirements.txt, with the jax build of the platform, into a virtual
# environment on Python 3.11, and this repository into it (editable, without dependencies).
#
#   JAX_EXTRA=tpu launch/install.sh [VENV]     # from the repository root; VENV defaults to .venv
#
# JAX_EXTRA: tpu, cuda12, cuda13 or cpu (jax's extras). The pins need Python 3.11, which stock images may
# lack (tpu-ubuntu2204-base has 3.10): uv finds one on the machine or downloads a standalone build. uv comes
# from pip into user space when it is not on PATH. uv's own settings pass through: UV_OFFLINE=1 installs
# from uv's cache without network, UV_FIND_LINKS=DIR from a folder of wheels.
set -euo pipefail
: "${JAX_EXTRA:?set JAX_EXTRA to tpu, cuda12, cuda13 or cpu}"
venv="${1:-.venv}"
UV_VERSION=0.13.8  # As in the Makefile.

uv="$(command -v uv || echo "$HOME/.local/bin/uv")"
if [ ! -x "$uv" ]; then
  # pip refuses --user installs into a distribution's Python that is marked externally managed (PEP 668).
  python3 -m pip install -q --user "uv==$UV_VERSION" \
    || python3 -m pip install -q --user --break-system-packages "uv==$UV_VERSION"
fi
[ -x "$venv/bin/python" ] || "$uv" venv -q --python 3.11 "$venv"
sed "s/^jax\[cpu\]/jax[$JAX_EXTRA]/" requirements.txt > "$venv/requirements-$JAX_EXTRA.txt"
"$uv" pip install -q --python "$venv/bin/python" -r "$venv/requirements-$JAX_EXTRA.txt"
"$uv" pip install -q --python "$venv/bin/python" --no-deps -e .
