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

import esvit_jax
from esvit_jax import checkpointing, loop, sharding, train, train_step
from esvit_jax.configs import knn as knn_config
from esvit_jax.configs import linear_probe as linear_config
from esvit_jax.data import multicrop, sources
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


def numpy_probe_sgd(kernel, bias, batches, peak_lr, epochs, steps_per_epoch):
  """torch.optim.SGD(momentum=0.9, weight_decay=0) on mean softmax cross-entropy, the lr of epoch e
  peak_lr * (1 + cos(pi * e / epochs)) / 2, in float64: the kernel and bias after each step."""
  params, buffers, history = [kernel.astype(np.float64), bias.astype(np.float64)], None, []
  for step, (x, y) in enumerate(batches):
    logits = x @ params[0] + params[1]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dlogits = (probs - np.eye(params[1].size)[y]) / len(y)
    grads = [x.T @ dlogits, dlogits.sum(0)]
    buffers = grads if buffers is None else [0.9 * b + g for b, g in zip(buffers, grads, strict=True)]
    lr = peak_lr * 0.5 * (1 + np.cos(np.pi * (step // steps_per_epoch) / epochs))
    params = [p - lr * b for p, b in zip(params, buffers, strict=True)]
    history.append(params)
  return history


def test_linear_probe_is_sgd_with_momentum_and_the_scaled_per_epoch_cosine():
  """The probe's first 6 steps (2 epochs of 3) from its N(0, 0.01) / zero init, against numpy SGD with the
  lr rule of configs/linear_probe.py (lr * batch / 256, momentum 0.9, no weight decay)."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(5, 16))
  mesh = sharding.make_mesh()
  config = linear_config.get_config()
  config.update(batch_size=64, epochs=2, lr=2.0)  # Peak lr 0.5: every step moves the weights visibly.
  probe = linear.Probe(lambda x: x, 16, 5, linear.make_optimizer(config, steps_per_epoch=3), mesh)
  state = probe.init(jax.random.PRNGKey(0))
  initial = jax.device_get(state.params)
  np.testing.assert_allclose(np.std(initial["kernel"]), 0.01, rtol=0.15)  # 80 draws: N(0, 0.01).
  np.testing.assert_array_equal(initial["bias"], 0.0)
  batches = [separable(rng, 64, centres) for _ in range(6)]
  expected = numpy_probe_sgd(initial["kernel"], initial["bias"], batches, 2.0 * 64 / 256, 2, 3)
  errors = []
  for (features, labels), (kernel, bias) in zip(batches, expected, strict=True):
    state, _ = probe.train(state, sharding.global_batch({"image": features, "label": labels}, mesh))
    params = jax.device_get(state.params)
    errors.append(max(np.abs(params["kernel"] - kernel).max(), np.abs(params["bias"] - bias).max()))
  print("probe vs numpy SGD, largest parameter difference per step:", errors)
  assert max(errors) < 4e-7, errors  # Measured: 1.3e-7 (float32 against float64).
  assert np.abs(kernel - initial["kernel"]).max() > 0.1  # The 6 steps moved the weights far.


def test_per_epoch_cosine_is_constant_within_an_epoch():
  schedule = linear.epoch_cosine(0.4, epochs=4, steps_per_epoch=10)
  values = [float(schedule(s)) for s in (0, 9, 10, 25, 39)]
  np.testing.assert_allclose(
    values, [0.4, 0.4, 0.2 * (1 + np.cos(np.pi / 4)), 0.2, 0.2 * (1 + np.cos(3 * np.pi / 4))], rtol=1e-6
  )


class CoordinateSource(sources.DemoSource):
  """64 copies of a 64 px image whose red channel is 4 x column and green 4 x row: a crop's pixels say
  where it was cut from and whether it was flipped."""

  def num_examples(self, split):
    return 64

  @staticmethod
  def arrays(split):
    del split
    rows, columns = np.mgrid[:64, :64]
    image = np.stack([4 * columns, 4 * rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    return np.repeat(image[None], 64, axis=0), np.zeros(64, np.int32)


def test_probe_trains_on_random_resized_crops_with_horizontal_flips():
  """One epoch of the probe's training views (configs/linear_probe.py's crop_scale): each crop covers a
  random 8% to 100% of the image at an aspect ratio in [3/4, 4/3], and about half are mirrored."""
  config = linear_config.get_config()
  config.update(dataset="demo", batch_size=64)
  ds = multicrop.train_classification_dataset(
    config, "train", batch_size=64, crop_size=32, process_index=0, process_count=1, source=CoordinateSource()
  )
  images = next(ds.as_numpy_iterator())["image"].astype(np.float64)
  # Bilinear sampling of a linear ramp: a crop w px wide spans 4 * w * 31 / 32 levels of red.
  red, green = images[..., 0].mean(axis=1), images[..., 1].mean(axis=2)  # [64, 32] along width, height.
  widths = np.abs(red[:, -1] - red[:, 0]) / 4 * 32 / 31
  heights = np.abs(green[:, -1] - green[:, 0]) / 4 * 32 / 31
  areas, ratios = widths * heights / 64**2, widths / heights
  flipped = red[:, -1] < red[:, 0]
  print(
    f"areas {areas.min():.3f}..{areas.max():.3f}, ratios {ratios.min():.3f}..{ratios.max():.3f}, "
    f"{flipped.sum()} of 64 flipped"
  )
  assert np.all(green[:, -1] > green[:, 0])  # Never flipped vertically.
  assert 0.08 * 0.9 < areas.min() < 0.3 and 0.6 < areas.max() < 1.05
  assert 0.75 * 0.95 < ratios.min() and ratios.max() < 4 / 3 * 1.05
  assert 16 <= flipped.sum() <= 48  # Binomial(64, 0.5): all but 1e-4 of draws.


@pytest.mark.slow
def test_linear_probe_reports_the_best_and_the_last_epoch(tmp_path, monkeypatch):
  """3 epochs whose validations read 40, 55, 50 (%): results.json holds best 55 (epoch 2) and last 50."""
  backbone = train_step.build_model(tiny.get_config()).backbone
  params = backbone.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  monkeypatch.setattr(linear.export, "load_pretrained", lambda *args, **kwargs: (backbone, params))
  readings = iter([40.0, 55.0, 50.0])
  monkeypatch.setattr(linear.Probe, "accuracy", lambda self, params, batches: next(readings))
  config = demo_probe_config()
  config.update(pretrained="unused", batch_size=1000, epochs=3)
  linear.train_and_evaluate(config, str(tmp_path))
  metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
  assert metrics["linear_top1_best"] == 55.0 and metrics["best_epoch"] == 2
  assert metrics["linear_top1_last"] == 50.0 and metrics["epochs"] == 3


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
