"""Real multi-process JAX on loopback: 2 processes x 4 CPU devices compute what 1 process x 8 devices does.

Each process runs main.py with jax.distributed.initialize (coordinator on 127.0.0.1) and reads only its
half of every global batch. Checkpoints move between the two layouts in both directions. The tiny config
runs in device mode (the default): each process ships canvases and the step makes the crops of every
example from its global position, so both layouts see the same crops.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from esvit_jax import export, writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
TIMEOUT_S = 420


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_main(workdir, num_processes: int) -> None:
  """main.py on the tiny config to STEPS steps, as `num_processes` processes sharing 8 CPU devices."""
  port, procs = free_port(), []
  for index in range(num_processes):
    env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      # The session's flags, with the last device count taking precedence.
      "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={8 // num_processes}",
    }
    cmd = [
      sys.executable,
      "main.py",
      "--config",
      "tests/configs/tiny.py",
      f"--workdir={workdir}",
      f"--config.total_steps={STEPS}",
    ]
    if num_processes > 1:
      cmd += [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={index}",
      ]
    log = open(os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.{index}.log"), "a")
    procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  try:
    for proc, log in procs:
      assert proc.wait(timeout=TIMEOUT_S) == 0, open(log.name).read()[-4000:]
  finally:
    for proc, log in procs:
      proc.kill()
      log.close()


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in writers.read_metrics(workdir) if "loss" in r}


def teacher(workdir):
  return export.load_backbone(os.path.join(workdir, "export"))[1]


def assert_close_trees(a, b, atol):
  flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_allclose(flat_a[key], flat_b[key], rtol=1e-4, atol=atol, err_msg=str(key))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One uninterrupted run to STEPS steps with 1 process and one with 2 processes."""
  root = tmp_path_factory.mktemp("multihost")
  dirs = {n: str(root / f"{n}proc") for n in (1, 2)}
  for n, workdir in dirs.items():
    run_main(workdir, n)
  return root, dirs


@pytest.mark.slow
def test_two_processes_equal_one_process(runs):
  _, dirs = runs
  for workdir in dirs.values():
    with open(os.path.join(workdir, "config.json")) as f:
      assert json.load(f)["augment_on"] == "device"
  one, two = losses(dirs[1]), losses(dirs[2])
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  for step in one:
    assert two[step] == pytest.approx(one[step], rel=1e-5), step
  assert_close_trees(teacher(dirs[2]), teacher(dirs[1]), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("written_by,resumed_by", [(2, 1), (1, 2)])
def test_checkpoints_resume_across_process_counts(runs, written_by, resumed_by):
  root, dirs = runs
  workdir = str(root / f"written{written_by}_resumed{resumed_by}")
  shutil.copytree(dirs[written_by], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))  # Resume from step STEPS - 2.
  shutil.rmtree(os.path.join(workdir, "export"))
  run_main(workdir, resumed_by)
  resumed, reference = losses(workdir), losses(dirs[resumed_by])
  for step in (STEPS - 1, STEPS):
    assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step
  assert_close_trees(teacher(workdir), teacher(dirs[resumed_by]), atol=1e-5)
