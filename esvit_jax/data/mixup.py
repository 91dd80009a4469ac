"""Mixup, CutMix and label smoothing of a whole batch on the accelerator, as timm's Mixup(mode='batch').

One draw per batch decides whether the batch is mixed (probability `prob`), whether by CutMix (probability
`switch_prob` when both alphas are positive) or by mixup, and the weight lam ~ Beta(alpha, alpha). Row i
is mixed with row B - 1 - i (the batch reversed, timm's x.flip(0)). CutMix pastes a box of the partner,
centred on a uniform pixel and clipped to the image, and sets lam to the share of the image left
uncovered. Targets are lam times the row's smoothed one-hot label plus 1 - lam times its partner's.

Everything has static shapes and runs inside the jitted step. The batch is the global array: on a mesh the
reversal pairs rows held by different devices, and XLA moves them, so the result does not depend on the
number of devices.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MixParams(NamedTuple):
  """One batch's mixing decision.

  Attributes:
    lam: float32 scalar, the weight of each row's own image and label (1: not mixed; CutMix: the share of
      the image outside the box).
    use_cutmix: bool scalar, paste a box instead of blending.
    box: int32 [4] (top, bottom, left, right): CutMix pastes rows [top, bottom) and columns [left, right).
  """

  lam: jax.Array
  use_cutmix: jax.Array
  box: jax.Array


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """Label-smoothed one-hot targets as timm writes them: off = smoothing / K, on = 1 - smoothing + off.

  Args:
    labels: int [B] class indices.
    num_classes: K.
    smoothing: the probability mass spread over all K classes.

  Returns:
    float32 [B, K] rows summing to 1.
  """
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  hot = labels[:, None] == jnp.arange(num_classes)
  return jnp.where(hot, jnp.float32(on), jnp.float32(off))


def mix_targets(labels: jax.Array, lam: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm's mixup_target: lam * own smoothed one-hot + (1 - lam) * the reversed batch's.

  Args:
    labels: int [B] class indices.
    lam: float scalar, the weight of each row's own label.
    num_classes: K.
    smoothing: label smoothing.

  Returns:
    float32 [B, K] rows summing to 1.
  """
  targets = smoothed_one_hot(labels, num_classes, smoothing)
  lam = jnp.asarray(lam, jnp.float32)
  return targets * lam + jnp.flip(targets, 0) * (1.0 - lam)


def cutmix_box(lam: jax.Array, centre: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """timm's rand_bbox with its lambda correction, for a given centre.

  Along each side the cut is int(side * sqrt(1 - lam)); the box spans [c - cut // 2, c + cut // 2) around
  the centre c (one pixel short of the cut when it is odd, as timm) and is clipped to the image.

  Args:
    lam: float scalar drawn from Beta(alpha, alpha).
    centre: int32 [2] (row, column), each uniform in [0, side).
    height: the image's height.
    width: the image's width.

  Returns:
    The int32 [4] box (top, bottom, left, right) and the corrected lam, 1 - box area / (height * width).
  """
  ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
  sides = jnp.array([height, width], jnp.int32)
  half = jnp.floor(sides * ratio).astype(jnp.int32) // 2
  low = jnp.clip(centre - half, 0, sides)
  high = jnp.clip(centre + half, 0, sides)
  area = (high[0] - low[0]) * (high[1] - low[1])
  box = jnp.stack([low[0], high[0], low[1], high[1]])
  return box, 1.0 - area.astype(jnp.float32) / (height * width)


def sample_mix(
  key: jax.Array,
  mixup_alpha: float,
  cutmix_alpha: float,
  switch_prob: float,
  prob: float,
  height: int,
  width: int,
) -> MixParams:
  """timm's Mixup._params_per_batch and, for CutMix, its box.

  Args:
    key: a PRNG key, one per batch.
    mixup_alpha: Beta's parameter for mixup; mixup is off when 0.
    cutmix_alpha: Beta's parameter for CutMix; CutMix is off when 0.
    switch_prob: the probability of CutMix when both are on.
    prob: the probability that the batch is mixed at all (timm's mix_prob).
    height: the images' height.
    width: the images' width.

  Returns:
    The batch's MixParams; lam = 1 and no CutMix when the batch is not mixed or both alphas are 0.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return MixParams(jnp.float32(1.0), jnp.array(False), jnp.zeros(4, jnp.int32))
  key_mixed, key_switch, key_lam, key_centre = jax.random.split(key, 4)
  mixed = jax.random.uniform(key_mixed) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  lam = jax.random.beta(key_lam, alpha, alpha)
  centre = jax.random.randint(key_centre, (2,), 0, jnp.array([height, width]))
  box, lam_box = cutmix_box(lam, centre, height, width)
  use_cutmix &= mixed
  lam = jnp.where(mixed, jnp.where(use_cutmix, lam_box, lam), 1.0).astype(jnp.float32)
  return MixParams(lam, use_cutmix, jnp.where(use_cutmix, box, 0))


def mix(
  images: jax.Array, labels: jax.Array, params: MixParams, num_classes: int, smoothing: float
) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch with its reversal as `params` says (timm's Mixup._mix_batch and mixup_target).

  Args:
    images: float [B, H, W, C].
    labels: int [B] class indices.
    params: the batch's MixParams.
    num_classes: K.
    smoothing: label smoothing.

  Returns:
    The mixed images (same dtype) and the float32 [B, K] targets.
  """
  partner = jnp.flip(images, 0)
  height, width = images.shape[1:3]
  top, bottom, left, right = params.box
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  pasted = jnp.where(in_box[None, :, :, None], partner, images)
  lam = params.lam.astype(jnp.float32)
  blended = (images.astype(jnp.float32) * lam + partner.astype(jnp.float32) * (1.0 - lam)).astype(
    images.dtype
  )
  mixed = jnp.where(params.use_cutmix, pasted, blended)
  return mixed, mix_targets(labels, params.lam, num_classes, smoothing)


def mix_batch(
  key: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  *,
  num_classes: int,
  mixup_alpha: float,
  cutmix_alpha: float,
  switch_prob: float = 0.5,
  prob: float = 1.0,
  smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """timm's Mixup(mode='batch') called on a batch: sample_mix, then mix.

  Args:
    key: a PRNG key, one per batch.
    images: float [B, H, W, C], normalised.
    labels: int [B] class indices.
    num_classes: K.
    mixup_alpha: Beta's parameter for mixup; 0 turns mixup off.
    cutmix_alpha: Beta's parameter for CutMix; 0 turns CutMix off.
    switch_prob: the probability of CutMix when both are on.
    prob: the probability that the batch is mixed.
    smoothing: label smoothing.

  Returns:
    The images (unchanged when both alphas are 0) and the float32 [B, K] targets.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, smoothed_one_hot(labels, num_classes, smoothing)
  height, width = images.shape[1:3]
  params = sample_mix(key, mixup_alpha, cutmix_alpha, switch_prob, prob, height, width)
  return mix(images, labels, params, num_classes, smoothing)
