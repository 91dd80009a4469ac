"""The pretraining loop end to end: main.py, metrics, checkpoints, exact resume, preemption, failures."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import checkpointing, export, loop, train, train_step, writers
from tests.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Crash(Exception):
  """Stands for a process killed in the middle of a step."""


def wrap_step(monkeypatch, on_call):
  """Makes train_and_evaluate's step call on_call(call_number, state, metrics) after every step."""
  real = train_step.Pretraining.train_step

  def make(self):
    step_fn, calls = real(self), [0]

    def wrapped(state, batch):
      calls[0] += 1
      state, metrics = step_fn(state, batch)
      return state, on_call(calls[0], state, metrics) or metrics

    return wrapped

  monkeypatch.setattr(train_step.Pretraining, "train_step", make)


def losses(workdir):
  return {r["step"]: r["loss"] for r in writers.read_metrics(workdir) if "loss" in r}


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def tiny_config(augment_on="device"):
  """The tiny config, device mode (its default, from the demo config) or host mode."""
  config = tiny.get_config()
  config.augment_on = augment_on
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  assert tiny.get_config().augment_on == "device"  # The tests below run the default mode.
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, jax.device_get(train.train_and_evaluate(tiny.get_config(), str(workdir)))


@pytest.fixture(scope="module")
def uninterrupted_host_mode(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted_host")
  return workdir, jax.device_get(train.train_and_evaluate(tiny_config("host"), str(workdir)))


@pytest.mark.slow
def test_main_runs_end_to_end_and_writes_metrics_checkpoint_and_export(tmp_path):
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "main.py",
    "--config",
    "tests/configs/tiny.py",
    "--config.total_steps=6",
    "--config.eval_every_steps=3",
    "--config.keep_ckpts=1",
    "--config.keep_every_steps=4",
    "--config.profile_steps=1",
    f"--workdir={workdir}",
  ]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  records = writers.read_metrics(workdir)
  assert set(range(1, 7)) <= set(losses(workdir))
  for name in (
    "view_loss",
    "region_loss",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "teacher_entropy",
    "teacher_batch_entropy",
    "grad_norm",
    "images_per_sec",
    "input_wait",
  ):
    assert any(name in r for r in records), name
  assert any("knn_top1_k20" in r for r in records)
  assert all(0 <= r["input_wait"] < 1 for r in records if "input_wait" in r)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert list(workdir.glob("plugins/profile/*/*.xplane.pb")), "--config.profile_steps wrote no trace"
  # Saved at 2, 4, 6: kept the last keep_ckpts (6) and every keep_every_steps-th (4).
  assert checkpointing.Checkpointer(workdir).all_steps() == [4, 6]
  model, params = export.load_pretrained(workdir / "export")
  pooled, regions = model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))
  assert pooled.shape == (1, 32) and regions.shape == (1, 16, 32)


@pytest.mark.slow
@pytest.mark.parametrize("augment_on", ["device", "host"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(augment_on, request, tmp_path, monkeypatch):
  reference_dir, reference = request.getfixturevalue(
    "uninterrupted" if augment_on == "device" else "uninterrupted_host_mode"
  )
  workdir = str(tmp_path)

  def crash_at_5(call, state, metrics):
    if call == 5:
      raise Crash()

  wrap_step(monkeypatch, crash_at_5)
  with pytest.raises(Crash):
    train.train_and_evaluate(tiny_config(augment_on), workdir)
  assert checkpointing.Checkpointer(workdir).all_steps() == [2, 4]
  monkeypatch.undo()
  resumed = jax.device_get(train.train_and_evaluate(tiny_config(augment_on), workdir))  # From step 4.
  expected = losses(reference_dir)
  got = losses(workdir)  # Steps 1-4 of the first attempt, 5-6 of the resumed one.
  assert sorted(got) == sorted(expected) == list(range(1, 7))
  for step in range(1, 7):
    assert got[step] == pytest.approx(expected[step], rel=1e-6), step
  assert_trees_equal(resumed.teacher_params, reference.teacher_params)
  assert_trees_equal(resumed.opt_state, reference.opt_state)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_that_resumes(uninterrupted, tmp_path, monkeypatch):
  reference_dir, reference = uninterrupted
  workdir = str(tmp_path)

  def preempt_at_3(call, state, metrics):
    if call == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  wrap_step(monkeypatch, preempt_at_3)
  state = train.train_and_evaluate(tiny.get_config(), workdir)
  assert int(state.step) == 3  # Stopped right after the notice ...
  assert checkpointing.Checkpointer(workdir).all_steps() == [2, 3]  # ... with a checkpoint of that step.
  monkeypatch.undo()
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  resumed = jax.device_get(train.train_and_evaluate(tiny.get_config(), workdir))
  assert_trees_equal(resumed.params, reference.params)


@pytest.mark.slow
def test_non_finite_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)

  def nan_from_3(call, state, metrics):
    if call >= 3:
      return {**metrics, "loss": jnp.float32(jnp.nan)}

  wrap_step(monkeypatch, nan_from_3)
  with pytest.raises(loop.NonFiniteLossError, match="at step 3.*last good checkpoint \\(step 2\\) is kept"):
    train.train_and_evaluate(tiny.get_config(), workdir)
  checkpointer = checkpointing.Checkpointer(workdir)
  assert checkpointer.all_steps() == [2]
  state, meta = checkpointer.restore(
    2, train_step.abstract_train_state(tiny.get_config(), train.sharding.make_mesh(), steps_per_epoch=250)
  )
  assert meta["input_position"] == 2 and int(state.step) == 2


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"batch_size": 12}, "divisible by the 8 devices"),
    ({"global_crop_size": 30}, "multiple of the patch size 4"),
    ({"local_crop_size": 2}, "multiple of the patch size 4"),
    ({"model.backbone": "swin_huge"}, "swin_tiny"),
    ({"dataset": "no_such_dataset_xyz"}, "no_such_dataset_xyz"),
    ({"dataset": "folder:/no/such/dir"}, "/no/such/dir"),
    ({"train_split": "unlabelled"}, "Split 'unlabelled' does not exist"),
    ({"sharding": "tensor"}, "'data', 'fsdp'"),
    ({"blur_sigma": (0.5, 3.0)}, r"blur_sigma=\(0.5, 3.0\) must satisfy"),
    ({"augment_on": "gpu"}, "augment_on='gpu'; use 'device'"),
    ({"canvas_size": 24}, "canvas_size=24 is smaller than the 32 px crops"),
  ],
)
def test_invalid_configs_fail_at_start_with_what_to_change(overrides, message, tmp_path):
  config = tiny.get_config()
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow
def test_device_mode_trains_on_a_folder_with_corrupt_files_and_counts_them(tmp_path):
  """21 images of several sizes (one larger than the canvas) and 3 bad files: one epoch of 3 steps."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from esvit_jax.data import demo_data  # pylint: disable=g-import-not-at-top

  folder = tmp_path / "images" / "train"
  for i in range(21):
    size = (40, 56) if i % 3 else (90, 70)
    image = demo_data.generate(1, size, seed=i)[0][0]
    os.makedirs(folder / f"c{i % 2}", exist_ok=True)
    Image.fromarray(image).save(folder / f"c{i % 2}" / f"{i}.jpg", quality=90)
  for name, data in [
    ("c0/cut.jpg", (folder / "c0/2.jpg").read_bytes()[:40]),
    ("c1/empty.jpg", b""),
    ("c1/words.png", b"hello"),
  ]:
    (folder / name).write_bytes(data)
  config = tiny.get_config()
  config.update(dataset=f"folder:{tmp_path / 'images'}", batch_size=8, total_steps=3, ckpt_every_steps=3)
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  records = writers.read_metrics(tmp_path / "run")
  assert int(state.step) == 3 and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert [r["skipped_files"] for r in records if "skipped_files" in r][-1] == 3


def test_config_file_arguments_and_overrides_reach_the_run():
  from esvit_jax.configs import swin_b  # pylint: disable=g-import-not-at-top

  config = swin_b.get_config("window=14")
  assert config.model.window_size == 14 and config.batch_size == 512 and config.epochs == 300
  assert config.model.drop_path_rate == 0.2 and config.dataset == "imagenet2012"
  with pytest.raises(ValueError, match="Unknown config argument"):
    swin_b.get_config("windw=14")
  assert json.loads(config.to_json_best_effort())["lr"] == 5e-4
