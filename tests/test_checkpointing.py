"""Checkpoint damage is detected and skipped; a workdir cannot be used by two runs at once."""

import glob
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = {"w": jnp.arange(1000.0), "nested": {"b": jnp.ones((40, 40))}}


def target():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), STATE)


@pytest.fixture(name="workdir")
def _workdir(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path, keep=5)
  for step in (2, 4):
    checkpointer.save(
      step, jax.tree.map(lambda x, s=step: x * s, STATE), {"input_position": step}, force=True
    )
  checkpointer.wait()
  checkpointer.close()
  return tmp_path


def truncate_files(step_dir):
  for f in glob.glob(f"{step_dir}/state/d/*"):
    with open(f, "r+b") as handle:
      handle.truncate(10)


def delete_files(step_dir):
  for f in glob.glob(f"{step_dir}/state/d/*"):
    os.remove(f)


def flip_a_byte(step_dir):
  for f in glob.glob(f"{step_dir}/state/d/*"):
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(f, "wb").write(bytes(data))


def delete_meta(step_dir):
  shutil.rmtree(f"{step_dir}/meta")


@pytest.mark.parametrize("damage", [truncate_files, delete_files, flip_a_byte, delete_meta])
def test_damaged_latest_checkpoint_falls_back_to_previous_with_warning(workdir, damage, caplog):
  damage(workdir / "checkpoints" / "4")
  state, meta = checkpointing.Checkpointer(workdir).restore_latest(target())
  assert meta["step"] == 2 and meta["input_position"] == 2
  np.testing.assert_array_equal(state["w"], np.arange(1000.0) * 2)
  assert "checkpoints/4 is damaged" in caplog.text and "Resuming from step 2" in caplog.text


def test_undamaged_latest_checkpoint_is_restored(workdir):
  state, meta = checkpointing.Checkpointer(workdir).restore_latest(target())
  assert meta["step"] == 4
  np.testing.assert_array_equal(state["nested"]["b"], np.full((40, 40), 4.0))


def test_all_checkpoints_damaged_refuses_to_start_from_scratch(workdir):
  for step in (2, 4):
    truncate_files(workdir / "checkpoints" / str(step))
  with pytest.raises(
    checkpointing.CheckpointError, match="none could be restored. Refusing to start from scratch"
  ):
    checkpointing.Checkpointer(workdir).restore_latest(target())


def test_empty_workdir_starts_from_scratch(tmp_path):
  assert checkpointing.Checkpointer(tmp_path).restore_latest(target()) is None


@pytest.mark.slow
def test_a_workdir_in_use_is_refused_in_process_and_across_processes(tmp_path):
  with checkpointing.workdir_lock(tmp_path):
    with pytest.raises(RuntimeError, match="Another run is using workdir"):
      with checkpointing.workdir_lock(tmp_path):
        pass
    cmd = [sys.executable, "main.py", "--config", "tests/configs/tiny.py", f"--workdir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Another run is using workdir" in done.stderr
  with checkpointing.workdir_lock(tmp_path):  # Released when the first run ends (or dies: the OS drops it).
    pass


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Orbax refuses relative paths; `--workdir runs/x` must still work.
  checkpointer = checkpointing.Checkpointer("runs/x")
  checkpointer.save(3, STATE, {"input_position": 3}, force=True)
  checkpointer.wait()
  checkpointer.close()
  state, meta = checkpointing.Checkpointer("runs/x").restore_latest(target())
  assert meta["step"] == 3 and (tmp_path / "runs/x/checkpoints/3").is_dir()
  np.testing.assert_array_equal(state["w"], STATE["w"])
