"""Collapse detection: the monitor on synthetic metric streams, the step's embedding std, real tiny runs."""

import math

from absl import logging
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import collapse, train, writers
from tests.configs import tiny

K = 1024
LOG_K = math.log(K)


def warnings_of(entropies, batch_entropies=None, patience=3, num_prototypes=K):
  """The monitor's warnings on a stream of per-image entropies (batch entropies: log K unless given)."""
  monitor = collapse.CollapseMonitor(num_prototypes, patience=patience)
  batch_entropies = [LOG_K] * len(entropies) if batch_entropies is None else batch_entropies
  metrics = (
    {"teacher_entropy": e, "teacher_batch_entropy": b, "teacher_embedding_std": 0.001}
    for e, b in zip(entropies, batch_entropies, strict=True)
  )
  return [(step, w) for step, m in enumerate(metrics) if (w := monitor.update(step, m))]


def test_uniform_teacher_warns_once_after_patience_intervals_naming_the_fields():
  stream = [3.0, 4.0] + [0.99 * LOG_K] * 10
  (warned,) = warnings_of(stream)
  step, text = warned
  assert step == 4  # Third consecutive near-uniform interval (steps 2, 3, 4).
  assert "near-uniform" in text and "since step 2" in text
  for field in (
    "config.teacher_temp",
    "config.momentum_teacher",
    "config.global_crop_scale",
    "config.model.out_dim",
  ):
    assert field in text
  assert "embedding std 0.0010" in text


def test_one_prototype_for_every_image_warns_once_with_its_own_advice():
  (warned,) = warnings_of([3.0] + [0.01] * 6, [5.0] + [0.01] * 6)
  assert warned[0] == 3
  assert "one prototype for every image" in warned[1] and "config.center_momentum" in warned[1]


def test_a_confident_teacher_whose_batch_spreads_over_prototypes_does_not_warn():
  # A healthy run at teacher temperature 0.04 measured 0.1 to 0.3 nats per image, far from log K per batch.
  assert not warnings_of([0.1] * 20, [0.8 * LOG_K] * 20)


def test_healthy_or_interrupted_streams_do_not_warn():
  healthy = [3.4, 4.5, 5.5, 6.0, 6.2, 6.5, 6.1, 6.2] * 3  # Below 0.97 log K (6.72).
  assert not warnings_of(healthy)
  # Collapsed for patience - 1 intervals at a time, with healthy or opposite states in between.
  broken = [6.9, 6.9, 5.0, 6.9, 6.9, 0.0, 0.0, 6.9, 6.9, 3.0] * 3
  assert not warnings_of(broken, broken)
  assert len(warnings_of(broken, broken, patience=2)) == 1


def test_thresholds_are_fractions_of_log_k():
  log_k = math.log(64)
  assert collapse.teacher_state(0.97 * log_k, log_k, 64) == "uniform"
  assert collapse.teacher_state(0.96 * log_k, log_k, 64) is None
  assert collapse.teacher_state(0.0, 0.05 * log_k, 64) == "one_hot"
  assert collapse.teacher_state(0.0, 0.06 * log_k, 64) is None


def test_embedding_std_matches_numpy_and_is_zero_on_collapse():
  x = np.random.default_rng(0).normal(size=(4, 2, 32)).astype(np.float32)
  flat = x.reshape(-1, 32)
  unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
  np.testing.assert_allclose(
    float(collapse.embedding_std(jnp.asarray(x))), unit.std(axis=0).mean(), rtol=1e-5
  )
  collapsed = np.tile(flat[:1] * 3.0, (8, 1)) * np.arange(1, 9, dtype=np.float32)[:, None]
  assert float(collapse.embedding_std(jnp.asarray(collapsed))) < 1e-6


def run_tiny(tmp_path, monkeypatch, **overrides):
  """A 6-step tiny run; returns its collapse warnings and metrics."""
  config = tiny.get_config()
  config.update(collapse_patience=3, **overrides)
  warned = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warned.append(msg % args if args else msg))
  train.train_and_evaluate(config, str(tmp_path))
  return [w for w in warned if w.startswith("Collapse")], writers.read_metrics(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("healthy", [True, False], ids=["healthy", "teacher_temp_1"])
def test_tiny_run_warns_once_when_made_to_collapse_and_not_when_healthy(tmp_path, monkeypatch, healthy):
  # A teacher temperature of 1 on the normalised prototypes' cosine logits makes its output near-uniform.
  overrides = {} if healthy else {"teacher_temp": 1.0, "warmup_teacher_temp": 1.0}
  warned, records = run_tiny(tmp_path, monkeypatch, **overrides)
  entropies = [r["teacher_entropy"] for r in records if "teacher_entropy" in r]
  assert len(entropies) == 6 and all(r["teacher_embedding_std"] > 0 for r in records if "loss" in r)
  if healthy:
    assert not warned
    assert max(entropies) < collapse.UNIFORM_FRACTION * math.log(64)
  else:
    assert len(warned) == 1 and "near-uniform" in warned[0] and "since step 1" in warned[0]
