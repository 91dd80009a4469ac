"""The EsViT schedules as traced functions of the global step (docs/fidelity.md, Schedules and optimizer).

Each function gives, element by element, the array that the official code precomputes on the host
(`utils.cosine_scheduler`, `DDINOLoss.teacher_temp_schedule`), but from a traced step count: the jitted
train step needs no 750k-entry host table and never recompiles as the values move.
"""

from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]


def cosine_schedule(
  base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> Schedule:
  """`utils.cosine_scheduler`: linspace(warmup_start, base, warmup) then cosine base -> final.

  The cosine part is final + (base - final) / 2 * (1 + cos(pi * i / n)) for i in 0..n-1 with
  n = total - warmup, so its last value stops short of `final_value`, exactly as in the official array.
  Steps past the end keep the last value.

  Args:
    base_value: the value at the end of the warmup (the cosine's start).
    final_value: the value the cosine heads to.
    total_steps: length of the whole schedule.
    warmup_steps: length of the linear warmup.
    warmup_start: the value at step 0 of the warmup.

  Returns:
    The schedule: step (traced or not) -> float32 value.
  """
  warmup_span = max(warmup_steps - 1, 1)  # np.linspace(a, b, w) steps by (b - a) / (w - 1).
  cosine_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.clip(jnp.asarray(step, jnp.float32), 0, total_steps - 1)
    warm = warmup_start + (base_value - warmup_start) * step / warmup_span
    # 0.5 * (1 + cos(pi * i / n)) = sin^2(pi / 2 * (n - i) / n): same values, but float32 stays
    # accurate to the last step, where 1 + cos(.) would cancel.
    remaining = (total_steps - step) / cosine_steps
    cosine = final_value + (base_value - final_value) * jnp.square(jnp.sin(0.5 * jnp.pi * remaining))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def warmup_cosine_schedule(
  base_value: float, final_value: float, total_steps: int, warmup_steps: int
) -> Schedule:
  """MAE-Lite's per-step schedule: base * step / warmup during the warm-up (0 at step 0, base at the end),
  then final + (base - final) / 2 * (1 + cos(pi * (step - warmup) / (total - warmup))).

  Args:
    base_value: the peak.
    final_value: the value the cosine heads to.
    total_steps: length of the whole schedule.
    warmup_steps: length of the linear warm-up from 0.

  Returns:
    The schedule: step (traced or not) -> float32 value.
  """
  cosine_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.clip(jnp.asarray(step, jnp.float32), 0, total_steps - 1)
    warm = base_value * step / max(warmup_steps, 1)
    remaining = (total_steps - step) / cosine_steps  # sin^2 form, as cosine_schedule.
    cosine = final_value + (base_value - final_value) * jnp.square(jnp.sin(0.5 * jnp.pi * remaining))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def epoch_warmup_schedule(
  start_value: float, final_value: float, warmup_epochs: int, steps_per_epoch: int
) -> Schedule:
  """Teacher temperature: linspace(start, final, warmup_epochs) indexed by epoch, then constant.

  Args:
    start_value: the value of epoch 0.
    final_value: the value from epoch warmup_epochs - 1 on.
    warmup_epochs: length of the warmup in epochs.
    steps_per_epoch: optimizer steps in one epoch.

  Returns:
    The schedule: step (traced or not) -> float32 value.
  """
  warmup_span = max(warmup_epochs - 1, 1)

  def schedule(step):
    epoch = (jnp.asarray(step, jnp.int32) // steps_per_epoch).astype(jnp.float32)
    warm = start_value + (final_value - start_value) * epoch / warmup_span
    return jnp.where(epoch < warmup_epochs, warm, final_value)

  return schedule


@dataclasses.dataclass(frozen=True)
class Schedules:
  """The four schedules of one run, each a function of the global step.

  The teacher momentum m is held as its distance to 1, `teacher_ema_rate` = 1 - m, the step size of the
  EMA: m goes to 1, where float32 keeps too few digits of 1 - m.
  """

  learning_rate: Schedule
  weight_decay: Schedule
  teacher_ema_rate: Schedule | None = None  # EsViT only.
  teacher_temp: Schedule | None = None  # EsViT only.


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """config.total_steps when set, else epochs * steps_per_epoch (the official len(schedule)).

  Args:
    config: the run's config (total_steps, epochs).
    steps_per_epoch: optimizer steps in one epoch.

  Returns:
    The number of optimizer steps of the run.
  """
  return config.total_steps or config.epochs * steps_per_epoch


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """The linear scaling rule: config.lr is the rate for a global batch of 256.

  Args:
    config: the run's config (lr, batch_size: the global batch).

  Returns:
    The peak learning rate.
  """
  return config.lr * config.batch_size / 256


def from_config(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedules:
  """The schedules of `config`: lr and weight decay, and for EsViT teacher momentum and temperature.

  MAE (config.method 'mae') keeps its weight decay constant and warms its lr up as warmup_cosine_schedule.

  Args:
    config: the pretraining config.
    steps_per_epoch: optimizer steps in one epoch.

  Returns:
    The schedules.
  """
  steps = total_steps(config, steps_per_epoch)
  if config.get("method") == "mae":
    warmup = config.warmup_epochs * steps_per_epoch
    return Schedules(
      learning_rate=warmup_cosine_schedule(peak_learning_rate(config), config.min_lr, steps, warmup),
      weight_decay=lambda step: jnp.full((), config.weight_decay, jnp.float32),
    )
  return Schedules(
    learning_rate=cosine_schedule(
      peak_learning_rate(config), config.min_lr, steps, warmup_steps=config.warmup_epochs * steps_per_epoch
    ),
    weight_decay=cosine_schedule(config.weight_decay, config.weight_decay_end, steps),
    teacher_ema_rate=cosine_schedule(1.0 - config.momentum_teacher, 0.0, steps),
    teacher_temp=epoch_warmup_schedule(
      config.warmup_teacher_temp, config.teacher_temp, config.warmup_teacher_temp_epochs, steps_per_epoch
    ),
  )
