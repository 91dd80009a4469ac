"""The package as a user installs it: pyproject.toml's ranges admit the lock, and a wheel built from the
sources installs into a fresh virtual environment outside the repository, where the library, the tools and
the benchmarks work from any directory, and the recipes (esvit_jax.configs) come with it.

The fresh environment (no --system-site-packages, no PYTHONPATH) gets the built wheel and its declared
dependencies with `uv pip install --offline -c requirements.txt`: uv resolves pyproject.toml's ranges itself,
offline, from the cache that `make install` filled, constrained to the lock's versions, and hard-links the
wheels, so an install of the whole stack takes seconds and needs no network.
"""

import os
import shutil
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

from esvit_jax import export
from esvit_jax.models import build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Installed by the lock's packages themselves, or tools of the test extra; not imported by esvit_jax.
NOT_DIRECT = {"jaxlib", "importlib-resources"}


def lock_pins() -> dict[str, Requirement]:
  """requirements.txt, and torch, which the Makefile pins apart (it is an optional extra)."""
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    lines = [line.split("#")[0].strip() for line in f]
  with open(os.path.join(ROOT, "Makefile")) as f:
    (torch,) = [line.split(":=")[1].strip() for line in f if line.startswith("TORCH_VERSION")]
  pins = {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}
  return {**pins, "torch": Requirement(f"torch=={torch}")}


def project() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def test_every_pin_of_the_lock_lies_in_the_declared_ranges():
  pins = lock_pins()
  metadata = project()
  declared = [Requirement(r) for r in metadata["dependencies"]]
  declared += [Requirement(r) for extra in metadata["optional-dependencies"].values() for r in extra]
  applicable = [r for r in declared if r.marker is None or r.marker.evaluate()]
  names = set()
  for requirement in applicable:
    name = canonicalize_name(requirement.name)
    names.add(name)
    if name == "esvit-jax":
      continue
    assert name in pins, f"{requirement} is declared but requirements.txt does not pin it"
    (version,) = [spec.version for spec in pins[name].specifier]
    assert requirement.specifier.contains(version), f"the lock's {name}=={version} is outside {requirement}"
  undeclared = set(pins) - names - NOT_DIRECT
  # scikit-learn is pinned for tools outside the package; every other pin must be a declared dependency.
  assert undeclared <= {"scikit-learn"}, f"pinned but neither declared nor known transitive: {undeclared}"


def uv() -> str:
  """The uv that `make install` puts next to the venv's python."""
  path = os.path.join(os.path.dirname(sys.executable), "uv")
  return path if os.path.exists(path) else shutil.which("uv")


def shell(cmd, cwd, timeout=300) -> subprocess.CompletedProcess:
  """Runs cmd as a user's shell does: without this checkout on the import path."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run(cmd, cwd, timeout=300) -> subprocess.CompletedProcess:
  """shell(cmd), which must succeed."""
  done = shell(cmd, cwd, timeout)
  assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
  return done


def copy_sources(destination) -> str:
  """What a source distribution holds, copied so the build leaves nothing in the shared checkout."""
  source = destination / "esvit-jax"
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), source / name)
  shutil.copytree(
    os.path.join(ROOT, "esvit_jax"), source / "esvit_jax", ignore=shutil.ignore_patterns("__pycache__")
  )
  return str(source)


def fresh_venv(path) -> str:
  run([uv(), "venv", "-q", "--python", sys.executable, str(path)], cwd=path.parent)
  return str(path / "bin" / "python")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A fresh venv with the wheel built from the sources and its dependencies; returns its python."""
  work = tmp_path_factory.mktemp("packaging")
  source = copy_sources(work)
  run([uv(), "build", "--offline", "--wheel", "--out-dir", str(work / "dist"), source], cwd=work)
  (wheel,) = (work / "dist").glob("esvit_jax-*.whl")
  python = fresh_venv(work / "venv")
  run(
    [
      uv(),
      "pip",
      "install",
      "-q",
      "--offline",
      "--python",
      python,
      "-c",
      os.path.join(ROOT, "requirements.txt"),
      str(wheel),
    ],
    cwd=work,
  )
  return python, work


@pytest.mark.slow
def test_wheel_holds_the_package_alone_and_loads_an_export_from_another_directory(installed, tmp_path):
  python, work = installed
  model = build_backbone(
    "swin_tiny", embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, image_size=32
  )
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  export.save_backbone(tmp_path / "export", model, params)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  expected, _ = model.apply({"params": params}, images)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  script = (
    "import sys, numpy as np, esvit_jax\n"
    "assert esvit_jax.__file__.startswith(sys.prefix), esvit_jax.__file__\n"
    "assert not any(m.split('.')[0] in ('configs', 'tests', 'benchmarks') for m in sys.modules)\n"
    f"model, params = esvit_jax.load_pretrained({str(tmp_path / 'export')!r})\n"
    f"pooled, _ = model.apply({{'params': params}}, np.load({str(tmp_path / 'images.npy')!r}))\n"
    f"np.save({str(tmp_path / 'pooled.npy')!r}, np.asarray(pooled))\n"
  )
  run([python, "-c", script], cwd=elsewhere)
  np.testing.assert_allclose(np.load(tmp_path / "pooled.npy"), expected, rtol=1e-5, atol=1e-6)
  site_packages = run(
    [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=elsewhere
  ).stdout.strip()
  assert not {"configs", "tests", "benchmarks"} & set(os.listdir(site_packages))


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["convert", "visualize"])
def test_tools_run_as_modules_from_another_directory_without_torch(installed, tmp_path, tool):
  python, _ = installed
  done = run([python, "-m", f"esvit_jax.{tool}", "--help"], cwd=tmp_path)
  assert f"usage: python -m esvit_jax.{tool}" in done.stdout
  assert (
    run(
      [python, "-c", "import importlib.util as u; print(u.find_spec('torch'))"], cwd=tmp_path
    ).stdout.strip()
    == "None"
  )  # The converter's --help needs no torch: it is the `torch` extra.


@pytest.mark.slow
def test_demo_reads_its_packaged_config_from_another_directory(installed, tmp_path):
  python, _ = installed
  done = shell([python, "-m", "esvit_jax.demo", "--help"], tmp_path)
  assert "Traceback" not in done.stderr and "--workdir" in done.stdout, done.stderr[-4000:]
  script = (
    "import sys\n"
    "from ml_collections.config_flags import config_flags\n"
    "from esvit_jax import demo\n"
    "assert str(demo.DEFAULT_CONFIG).startswith(sys.prefix), demo.DEFAULT_CONFIG\n"
    "parse = config_flags.ConfigFileFlagParser('config').parse\n"
    "tasks = ('pretrain', 'knn', 'linear_probe', 'finetune')\n"
    "print([parse(f'{demo.DEFAULT_CONFIG}:task={t}').task for t in tasks])\n"
  )
  done = run([python, "-c", script], tmp_path)
  assert done.stdout.strip() == "['pretrain', 'knn', 'linear_probe', 'finetune']"


@pytest.mark.slow
def test_a_user_config_anywhere_starts_from_the_installed_recipes(installed, tmp_path):
  """A config file outside any checkout imports esvit_jax.configs and main.py runs it: its own value (an
  unknown backbone, stopped at start) reaches the run, so the file was loaded with the recipe under it."""
  python, _ = installed
  shutil.copy(os.path.join(ROOT, "main.py"), tmp_path / "main.py")  # Away from the checkout's esvit_jax/.
  (tmp_path / "mine.py").write_text(
    "import sys\n\n"
    "import esvit_jax\n"
    "from esvit_jax.configs import swin_t\n\n"
    "assert esvit_jax.__file__.startswith(sys.prefix), esvit_jax.__file__\n\n\n"
    "def get_config(arg=None):\n"
    "  config = swin_t.get_config(arg)\n"
    "  config.model.backbone = 'my_backbone'\n"
    "  return config\n"
  )
  done = shell(
    [python, "main.py", "--config", "mine.py:window=14", f"--workdir={tmp_path / 'run'}"], tmp_path
  )
  assert done.returncode == 2, done.stderr[-4000:]
  assert "config.model.backbone='my_backbone' is unknown" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
  "script,flag",
  [("train_step.py", "--per_device_batch"), ("input_pipeline.py", "--num_images"), ("faults.py", "--kills")],
)
def test_benchmarks_run_as_scripts_from_another_directory(installed, tmp_path, script, flag):
  python, _ = installed
  done = shell([python, os.path.join(ROOT, "benchmarks", script), "--help"], tmp_path)
  assert "Traceback" not in done.stderr, done.stderr[-4000:]
  assert flag in done.stdout + done.stderr  # absl's --help exits with 1 after printing the flags.


@pytest.mark.slow
def test_editable_install_imports_the_sources_from_another_directory(tmp_path):
  source = copy_sources(tmp_path)
  python = fresh_venv(tmp_path / "venv")
  run(
    [
      uv(),
      "pip",
      "install",
      "-q",
      "--offline",
      "--python",
      python,
      "-c",
      os.path.join(ROOT, "requirements.txt"),
      "-e",
      source,
    ],
    cwd=tmp_path,
  )
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  done = run([python, "-c", "import esvit_jax; print(esvit_jax.__file__)"], cwd=elsewhere)
  assert done.stdout.strip() == os.path.join(source, "esvit_jax", "__init__.py")
