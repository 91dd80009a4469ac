"""Evaluation and export: linear probe, k-NN task, results.json, export and load_pretrained."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import knn as knn_config
from configs import linear_probe as linear_config
import esvit_jax
from esvit_jax import checkpointing, loop, sharding, train, train_step
from esvit_jax.evaluate import knn, linear
from tests.configs import tiny
from tests.test_train import ROOT


def separable(rng, num, centres):
  labels = rng.integers(0, len(centres), num)
  return (centres[labels] + 0.3 * rng.normal(size=(num, centres.shape[1]))).astype(np.float32), labels.astype(
    np.int32
  )


def test_linear_probe_learns_linearly_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(5, 16))
  mesh = sharding.make_mesh()
  config = linear_config.get_config()
  config.update(batch_size=64, epochs=3, lr=0.4)
  probe = linear.Probe(lambda x: x, 16, 5, linear.make_optimizer(config, steps_per_epoch=20), mesh)
  state = probe.init(jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.std(state.params["kernel"]), 0.01, rtol=0.3)  # N(0, 0.01) init.
  for _ in range(60):
    features, labels = separable(rng, 64, centres)
    state, _ = probe.train(state, sharding.global_batch({"image": features, "label": labels}, mesh))
  features, labels = separable(rng, 512, centres)
  batches = [
    {"image": features[i : i + 64], "label": labels[i : i + 64], "mask": np.ones(64, bool)}
    for i in range(0, 512, 64)
  ]
  assert probe.accuracy(state.params, iter(batches)) > 97.0


def test_per_epoch_cosine_is_constant_within_an_epoch():
  schedule = linear.epoch_cosine(0.4, epochs=4, steps_per_epoch=10)
  values = [float(schedule(s)) for s in (0, 9, 10, 25, 39)]
  np.testing.assert_allclose(
    values, [0.4, 0.4, 0.2 * (1 + np.cos(np.pi / 4)), 0.2, 0.2 * (1 + np.cos(3 * np.pi / 4))], rtol=1e-6
  )


def test_probe_feature_dimension_of_swin_tiny_is_2304():
  model = esvit_jax.models.build_backbone("swin_tiny")
  shape = jax.eval_shape(
    lambda x: model.apply(model.init(jax.random.key(0), x), x, 4, method="last_blocks"),
    jnp.zeros((1, 224, 224, 3)),
  )
  assert shape.shape == (1, 2304)


def demo_probe_config():
  """A 2-epoch linear probe on the demo data at 32 px (10 steps an epoch)."""
  config = linear_config.get_config()
  config.update(
    dataset="demo",
    eval_split="test",
    crop_size=32,
    eval_resize=36,
    eval_crop_size=32,
    batch_size=400,
    eval_batch_size=200,
    epochs=2,
    log_every_steps=5,
  )
  return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A tiny pretraining run with its k-NN monitor at steps 0 and 6, which records its matmul precision."""
  workdir = tmp_path_factory.mktemp("pretrained")
  config = tiny.get_config()
  config.eval_every_steps = config.total_steps
  monitor_precisions = []

  def recording(*args, **kwargs):
    monitor_precisions.append(jax.config.jax_default_matmul_precision)
    return evaluate_split_pair(*args, **kwargs)

  evaluate_split_pair = knn.evaluate_split_pair
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(knn, "evaluate_split_pair", recording)
    state = train.train_and_evaluate(config, str(workdir))
  return workdir, jax.device_get(state), monitor_precisions


@pytest.mark.slow
def test_pretraining_knn_monitor_runs_at_the_evaluation_matmul_precision(pretrained):
  assert pretrained[2] == [tiny.get_config().knn_matmul_precision] * 2 == ["highest"] * 2


@pytest.mark.slow
def test_export_and_load_pretrained_give_bit_identical_teacher_outputs(pretrained, tmp_path):
  workdir, state, _ = pretrained
  config = tiny.get_config()
  images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-2, maxval=2)
  teacher = train_step.build_model(config).backbone
  expected = teacher.apply({"params": state.teacher_params["backbone"]}, images)
  reexported = tmp_path / "reexported"
  relative = [os.path.relpath(p, ROOT) for p in (workdir, reexported)]  # Orbax itself wants absolute paths.
  done = subprocess.run(
    [sys.executable, "-m", "esvit_jax.export", *relative],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  for path in (workdir / "export", workdir, reexported):  # Written at the end, the workdir itself, the CLI.
    model, params = esvit_jax.load_pretrained(path)
    for got, want in zip(model.apply({"params": params}, images), expected, strict=False):
      np.testing.assert_array_equal(got, want)
  with pytest.raises(FileNotFoundError, match="neither an exported backbone"):
    esvit_jax.load_pretrained(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["knn", "linear"])
def test_evaluation_on_8_devices_equals_1_device_and_writes_results(pretrained, tmp_path, monkeypatch, task):
  workdir, _, _ = pretrained
  if task == "knn":
    config = knn_config.get_config()
    config.update(
      dataset="demo",
      eval_split="test",
      eval_resize=36,
      eval_crop_size=32,
      eval_batch_size=40,
      max_train_examples=400,
      max_eval_examples=120,
      ks=(10, 20),
    )
    run = knn.run
  else:
    config = demo_probe_config()
    run = linear.train_and_evaluate
  config.pretrained = str(workdir / "export")
  results = {}
  for devices in (8, 1):
    monkeypatch.setattr(
      sharding,
      "make_mesh",
      lambda d=jax.devices()[:devices]: sharding.Mesh(
        np.asarray(d), ("data",), axis_types=(sharding.AxisType.Auto,)
      ),
    )
    out = tmp_path / f"{devices}dev"
    results[devices] = run(config, str(out))
    recorded = json.loads((out / "results.json").read_text())
    assert recorded["pretrained"] == config.pretrained and recorded["metrics"] == results[devices]
  for name, value in results[8].items():
    assert value == pytest.approx(results[1][name], abs=1e-6 if task == "knn" else 0.6), name
  if task == "linear":
    assert results[8]["feature_dim"] == 16 + 16 + 32 + 32 and results[8]["epochs"] == 2


@pytest.mark.slow
def test_linear_probe_stops_on_sigterm_with_a_checkpoint_that_resumes_to_the_same_result(
  pretrained, tmp_path, monkeypatch
):
  config = demo_probe_config()
  config.pretrained = str(pretrained[0] / "export")
  expected = linear.train_and_evaluate(config, str(tmp_path / "uninterrupted"))

  real_run = loop.Loop.run

  def preempted_at_13(self, state, step_fn, batches, first_step):
    def step(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == 13:  # In the second epoch (10 steps each).
        os.kill(os.getpid(), signal.SIGTERM)
      return state, metrics

    return real_run(self, state, step, batches, first_step)

  monkeypatch.setattr(loop.Loop, "run", preempted_at_13)
  workdir = tmp_path / "preempted"
  assert linear.train_and_evaluate(config, str(workdir)) == {"preempted_at_step": 13}
  assert checkpointing.Checkpointer(workdir).all_steps() == [10, 13]
  assert not (workdir / "results.json").exists()
  monkeypatch.undo()
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  resumed = linear.train_and_evaluate(config, str(workdir))
  assert resumed == pytest.approx(expected, abs=1e-6)
