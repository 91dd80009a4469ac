"""Schedules against hand-computed values and against the official numpy arrays (utils.cosine_scheduler)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from esvit_jax import schedules
from esvit_jax.configs import common

STEPS_PER_EPOCH = 10


def small_config():
  """5 epochs of 10 steps: 20 warm-up steps, 30 cosine steps; teacher temperature warm-up over 3 epochs."""
  config = common.pretrain_config("swin_tiny", drop_path_rate=0.1)
  config.epochs, config.warmup_epochs, config.warmup_teacher_temp_epochs = 5, 2, 3
  return config  # batch 512, lr 5e-4: peak 1e-3.


def values(schedule, steps):
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps)))


def official_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0):
  """utils.cosine_scheduler, transcribed."""
  warmup_iters = warmup_epochs * niter
  warmup = np.linspace(0, base, warmup_iters) if warmup_epochs > 0 else np.array([])
  iters = np.arange(epochs * niter - warmup_iters)
  cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warmup, cosine))


def test_learning_rate_hand_values():
  schedule = schedules.from_config(small_config(), STEPS_PER_EPOCH)
  steps = [0, 10, 19, 20, 35, 49]
  expected = [
    0.0,
    1e-3 * 10 / 19,  # linspace(0, peak, 20)[10]
    1e-3,  # end of warm-up: the last linspace point is the peak
    1e-3,  # first cosine step, cos(0)
    1e-6 + 0.5 * (1e-3 - 1e-6),  # i = 15 of n = 30: cos(pi / 2) = 0
    1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 29 / 30)),
  ]  # last step
  np.testing.assert_allclose(values(schedule.learning_rate, steps), expected, rtol=1e-6, atol=1e-12)


def test_weight_decay_and_momentum_hand_values():
  schedule = schedules.from_config(small_config(), STEPS_PER_EPOCH)
  steps = [0, 25, 49]
  cosine = [2.0, 1.0, 1 + math.cos(math.pi * 49 / 50)]  # 1 + cos(pi * i / 50)
  np.testing.assert_allclose(
    values(schedule.weight_decay, steps), [0.4 + 0.5 * (0.04 - 0.4) * c for c in cosine], rtol=1e-6
  )
  np.testing.assert_allclose(values(schedule.teacher_ema_rate, steps), [0.002 * c for c in cosine], rtol=1e-6)


def test_teacher_temperature_per_epoch():
  schedule = schedules.from_config(small_config(), STEPS_PER_EPOCH)
  steps = [0, 9, 10, 19, 20, 29, 30, 49]
  expected = [0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07, 0.07]  # linspace(0.04, 0.07, 3) per epoch
  np.testing.assert_allclose(values(schedule.teacher_temp, steps), expected, rtol=1e-6)


def test_schedules_equal_official_arrays():
  config = small_config()
  schedule = schedules.from_config(config, STEPS_PER_EPOCH)
  steps = np.arange(config.epochs * STEPS_PER_EPOCH)
  for ours, official in [
    (schedule.learning_rate, official_cosine_scheduler(1e-3, 1e-6, 5, STEPS_PER_EPOCH, warmup_epochs=2)),
    (schedule.weight_decay, official_cosine_scheduler(0.04, 0.4, 5, STEPS_PER_EPOCH)),
    (schedule.teacher_ema_rate, 1 - official_cosine_scheduler(0.996, 1.0, 5, STEPS_PER_EPOCH)),
  ]:
    np.testing.assert_allclose(values(ours, steps), official, rtol=1e-6, atol=1e-12)


def test_published_run_length_in_float32():
  """300 epochs of 2502 steps (750,600 steps): the traced float32 values still match float64."""
  config = common.pretrain_config("swin_tiny", drop_path_rate=0.1)
  schedule = schedules.from_config(config, 2502)
  steps = np.array([0, 25_019, 25_020, 400_000, 750_599])
  official = official_cosine_scheduler(1e-3, 1e-6, 300, 2502, warmup_epochs=10)[steps]
  np.testing.assert_allclose(values(schedule.learning_rate, steps), official, rtol=1e-6)
  official = official_cosine_scheduler(0.996, 1.0, 300, 2502)[steps]
  # atol: at the last step 1 - m is 1.75e-14, below float64's resolution of m itself.
  np.testing.assert_allclose(values(schedule.teacher_ema_rate, steps), 1 - official, rtol=1e-5, atol=1e-15)


def test_total_steps_override():
  config = small_config()
  config.total_steps = 30
  assert schedules.total_steps(config, STEPS_PER_EPOCH) == 30
  schedule = schedules.from_config(config, STEPS_PER_EPOCH)
  # Warm-up is still 20 steps; the cosine now spans the 10 remaining ones.
  np.testing.assert_allclose(
    values(schedule.learning_rate, [29]),
    [1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 9 / 10))],
    rtol=1e-6,
  )
