# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use, install the exact pins of requirements.txt into it, and then this
# repository itself, editable and without dependencies, so that `import esvit_jax` works from any directory
# (the benchmarks and tools rely on it). pyproject.toml holds the compatible ranges for `pip install .`.
# The packages are installed with their bytecode: uv skips it by default, and where PYTHONDONTWRITEBYTECODE
# is set every process would compile TensorFlow's sources again on import (about 25 s of CPU each).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8
TORCH_VERSION := 2.13.0

.PHONY: install install-torch test test-fast lint demo mutants clean

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version}"'
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -r requirements.txt
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	@touch $@

install: $(VENV)/.installed

# torch is only needed to read or write official PyTorch checkpoints (esvit_jax.convert) and by its tests.
$(VENV)/.installed-torch: $(VENV)/.installed
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	@touch $@

install-torch: $(VENV)/.installed-torch

# pytest exits 5 when it collects no test: that is not a failure of the code, so it is reported and passed.
pytest = rc=0; $(PY) -m pytest $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test: $(VENV)/.installed-torch
	@$(call pytest,)

# Everything but the tests marked slow (those that start main.py, install packages or run other processes).
test-fast: $(VENV)/.installed-torch
	@$(call pytest,-m "not slow")

# The code style of pyproject.toml's [tool.ruff]; `ruff format .` and `ruff check --fix .` apply it.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every mutant of docs/fidelity.md against the tests that guard its behaviour (tests/mutants.py).
mutants: $(VENV)/.installed-torch
	$(PY) tests/mutants.py

demo: $(VENV)/.installed
	$(PY) -m esvit_jax.demo --workdir demo_workdir

clean:
	rm -rf $(VENV) demo_workdir build dist esvit_jax.egg-info
