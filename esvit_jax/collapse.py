"""Collapse detection: the teacher's outputs say early when self-supervised pretraining stopped learning.

DINO-style objectives fail in two ways, both visible in the teacher's view distributions over the K
prototypes: near-uniform outputs (the mean entropy per image near log K: the features collapse to one
point and centring spreads it evenly) or one prototype winning every image (the entropy of the batch's
mean distribution near 0). The entropy per image alone cannot tell the second: a healthy teacher at a
low temperature is confident, near 0 per image, while its batch still spreads over many prototypes. The
standard deviation of the L2-normalised teacher embeddings over the batch goes to 0 in both cases
(about 1/sqrt(D) for spread-out features). `CollapseMonitor` reads the logged metrics and warns once
when either state lasts `patience` consecutive log intervals, naming the config fields to change.
"""

from collections.abc import Mapping
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

UNIFORM_FRACTION = 0.97  # Entropy per image at or above this share of log K: near-uniform (healthy: <= 0.94).
ONE_HOT_FRACTION = 0.05  # Entropy of the batch's mean at or below this share of log K: one prototype.

_ADVICE = {
  "uniform": (
    "near-uniform",
    "the features collapsed to one point and centring spreads it over all prototypes "
    "(typical when the views are too hard to match at this scale or the teacher is too soft)",
    "lower config.teacher_temp and config.warmup_teacher_temp (e.g. 0.04), lower config.momentum_teacher "
    "(e.g. 0.99: the teacher follows faster), milder crops (config.global_crop_scale, fewer "
    "config.num_local_crops), a smaller head (config.model.out_dim) with "
    "config.model.norm_last_layer=True, or a lower config.lr",
  ),
  "one_hot": (
    "on one prototype for every image",
    "one prototype wins for every image (the teacher is sharpened more than centring can balance)",
    "raise config.teacher_temp and config.warmup_teacher_temp, lower config.center_momentum (e.g. 0.9: "
    "the centre follows faster), or lower config.lr",
  ),
}


def embedding_std(embeddings: jax.Array) -> jax.Array:
  """Mean over dimensions of the batch std of the L2-normalised embeddings [..., D]: 0 on collapse.

  Args:
    embeddings: any leading axes (all are treated as the batch), feature axis last.

  Returns:
    A float32 scalar, about 1/sqrt(D) when the embeddings are spread over the sphere.
  """
  x = embeddings.reshape(-1, embeddings.shape[-1]).astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return jnp.mean(jnp.std(x, axis=0))


def teacher_state(entropy: float, batch_entropy: float, num_prototypes: int) -> str | None:
  """'uniform', 'one_hot' or None (healthy) for the teacher's entropies over K prototypes.

  Args:
    entropy: the mean entropy (nats) of the teacher's view distributions, one per image.
    batch_entropy: the entropy (nats) of their mean over the batch.
    num_prototypes: K, the number of prototypes the distributions are over.

  Returns:
    'uniform' when `entropy` is at or above UNIFORM_FRACTION of log K, 'one_hot' when `batch_entropy` is
    at or below ONE_HOT_FRACTION of log K, else None.
  """
  if entropy >= UNIFORM_FRACTION * math.log(num_prototypes):
    return "uniform"
  if batch_entropy <= ONE_HOT_FRACTION * math.log(num_prototypes):
    return "one_hot"
  return None


@dataclasses.dataclass
class CollapseMonitor:
  """Fed each logged metrics dict in order; returns one warning the first time a collapse persists.

  Attributes:
    num_prototypes: K, the view head's output size (config.model.out_dim).
    patience: consecutive log intervals in one collapsed state before warning (config.collapse_patience).
  """

  num_prototypes: int
  patience: int
  _state: str | None = None
  _count: int = 0
  _since: int = 0
  warned: bool = False

  def update(self, step: int, metrics: Mapping[str, Any]) -> str | None:
    """Takes the metrics logged at `step`; returns the warning text once, else None.

    Args:
      step: the train step the metrics were logged at.
      metrics: the logged metrics; teacher_entropy and teacher_batch_entropy are read (and
        teacher_embedding_std, when present).

    Returns:
      The warning, the first time one collapsed state has lasted `patience` log intervals; else None.
    """
    if self.warned or "teacher_entropy" not in metrics:
      return None
    entropy, batch_entropy = float(metrics["teacher_entropy"]), float(metrics["teacher_batch_entropy"])
    state = teacher_state(entropy, batch_entropy, self.num_prototypes)
    if state is None or state != self._state:
      self._state, self._count, self._since = state, 0, step
    if state is None:
      return None
    self._count += 1
    if self._count < self.patience:
      return None
    self.warned = True
    name, cause, fix = _ADVICE[state]
    std = (
      f", teacher embedding std {float(metrics['teacher_embedding_std']):.4f}"
      if "teacher_embedding_std" in metrics
      else ""
    )
    return (
      f"Collapse: the teacher's output has been {name} for {self._count} log intervals since step "
      f"{self._since} (entropy per image {entropy:.3f}, of the batch's mean {batch_entropy:.3f}, of log K = "
      f"{math.log(self.num_prototypes):.3f}{std}). "
      f"Likely cause: {cause}. To change: {fix}. The k-NN monitor (config.eval_every_steps) shows "
      "whether the features still improve."
    )
