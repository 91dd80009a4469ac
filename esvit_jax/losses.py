"""The objectives: EsViT's view and region losses, MAE's reconstruction and attention-distillation losses.

EsViT (docs/fidelity.md, Objective): view-level DINO loss plus region-matching loss.

Teacher views t are the 2 global crops; student views v are all crops, globals first. Over the pairs
v != t (18 for 2 + 8 crops), with P = softmax((teacher - c) / tau_t) and log Q = log_softmax(student / tau_s):
  view(t, v)   = H(P_t, Q_v), averaged over the batch;
  region(t, v) = mean over student tokens j of H(P_t[j*], Q_v[j]), j* = argmax_i cos(z_v[j], z_t[i]),
                 where z are backbone tokens and P, Q come from the region head; averaged over the batch;
  loss = (1 - w) * mean_pairs(view) + w * mean_pairs(region), w = region_loss_weight (0.5; 0 = DINO).

Every cross-entropy is one contraction over the K prototypes between all teacher and all student rows,
so no gathered [B, T, K] target is ever built, and each student log_softmax is computed once for both
teacher views. Softmaxes, losses and contractions run in float32 at full matmul precision. Everything on
the teacher side, and the argmax matching, carries no gradient.

MAE (docs/fidelity.md, MAE): the mean squared error of the predicted pixels on the masked patches only,
against each patch normalised by its own mean and unbiased variance; D-MAE adds the mean squared error
between the student's last-block attention logits, mixed over heads, and the frozen teacher's.
"""

from collections.abc import Mapping, Sequence

import einops
import jax
import jax.numpy as jnp

_EINSUM = dict(precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def teacher_log_probs(logits: jax.Array, center: jax.Array, temp: jax.Array) -> jax.Array:
  """Centred and sharpened teacher targets, log softmax((logits - center) / temp), no gradient.

  Args:
    logits: teacher head outputs [..., K], any dtype.
    center: [1, K] running centre.
    temp: scalar teacher temperature.

  Returns:
    float32 log-probabilities, the shape of logits.
  """
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32) - center)
  return jax.nn.log_softmax(logits / temp, axis=-1)


def student_log_probs(logits: jax.Array, temp: float) -> jax.Array:
  """Student log-probabilities, log softmax(logits / temp) in float32.

  Args:
    logits: student head outputs [..., K], any dtype.
    temp: student temperature.

  Returns:
    float32 log-probabilities, the shape of logits.
  """
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temp, axis=-1)


def l2_normalize(x: jax.Array) -> jax.Array:
  """F.normalize(x, dim=-1): x / max(||x||, 1e-12).

  Args:
    x: [..., D], any float dtype.

  Returns:
    float32, the shape of x, unit norm on the last axis.
  """
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def view_cross_entropy(teacher_probs: jax.Array, student_logp: jax.Array) -> jax.Array:
  """H(P_t, Q_v) for every teacher view t and student view v: [B, T, K], [B, V, K] -> [B, T, V].

  Args:
    teacher_probs: [B, T, K] teacher targets.
    student_logp: [B, V, K] student log-probabilities.

  Returns:
    [B, T, V] float32 cross-entropies.
  """
  return -jnp.einsum("btk,bvk->btv", teacher_probs, student_logp, **_EINSUM)


def region_cross_entropy(
  teacher_probs: jax.Array, teacher_features: jax.Array, student_logp: jax.Array, student_features: jax.Array
) -> jax.Array:
  """Region-matching CE for every (t, v), averaged over the student tokens.

  Args:
    teacher_probs: [B, T, I, K] region-head targets of the teacher views.
    teacher_features: [B, T, I, C] backbone tokens of the teacher views.
    student_logp: [B, V, J, K] region-head log-probabilities of the student views.
    student_features: [B, V, J, C] backbone tokens of the student views.
  Returns:
    [B, T, V] cross-entropies.
  """
  similarity = jnp.einsum(
    "bvjc,btic->btvji", l2_normalize(student_features), l2_normalize(teacher_features), **_EINSUM
  )
  # One-hot of an argmax: the matching passes no gradient to the student features.
  match = jax.nn.one_hot(jnp.argmax(similarity, axis=-1), similarity.shape[-1])  # [B, T, V, J, I]
  ce_all = -jnp.einsum("btik,bvjk->btvji", teacher_probs, student_logp, **_EINSUM)
  return jnp.sum(match * ce_all, axis=-1).mean(axis=-1)


def _pair_mean(ce_per_group: Sequence[jax.Array]) -> jax.Array:
  """Mean over the batch and the (t, v != t) pairs; the first group holds the teacher's views."""
  ce = jnp.concatenate(ce_per_group, axis=-1).mean(axis=0)  # [T, V_total]
  num_teacher, num_student = ce.shape
  pairs = ~jnp.eye(num_teacher, num_student, dtype=bool)
  return jnp.sum(jnp.where(pairs, ce, 0.0)) / (num_teacher * num_student - num_teacher)


def entropy(log_probs: jax.Array) -> jax.Array:
  """Mean entropy of the distributions on the last axis.

  Args:
    log_probs: [..., K] log-probabilities.

  Returns:
    The scalar mean entropy in nats.
  """
  return -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))


def batch_entropy(probs: jax.Array) -> jax.Array:
  """Entropy of the mean of all distributions on the last axis: near 0 only when one outcome wins for all.

  A confident teacher has a low entropy per image; only when the whole batch is on one prototype does the
  entropy of its mean distribution fall too.

  Args:
    probs: [..., K] probabilities.

  Returns:
    The scalar entropy in nats of the [K] mean distribution.
  """
  mean = jnp.mean(probs.reshape(-1, probs.shape[-1]).astype(jnp.float32), axis=0)
  return jnp.sum(jax.scipy.special.entr(mean))


def esvit_loss(
  student_outputs: Sequence[Mapping[str, jax.Array]],
  teacher_output: Mapping[str, jax.Array],
  center: jax.Array,
  region_center: jax.Array,
  *,
  teacher_temp: jax.Array,
  student_temp: float,
  region_loss_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The EsViT (or, with region_loss_weight 0, DINO) loss of one batch.

  Args:
    student_outputs: one dict per crop group (globals first), as returned by the model: 'view_logits'
      [B, n, K] and, with the region loss, 'region_logits' [B, n, N, K] and 'region_features' [B, n, N, C].
    teacher_output: the same dict for the teacher's single group of 2 global crops.
    center: [1, K] view centre.
    region_center: [1, K] region centre (unused when the weight is 0).
    teacher_temp: scalar teacher temperature of the current epoch.
    student_temp: student temperature (0.1).
    region_loss_weight: w in (1 - w) * view + w * region.
  Returns:
    The scalar loss and {'view_loss', 'region_loss' (only when w > 0), 'teacher_entropy',
    'teacher_batch_entropy'}.
  """
  teacher_logp = teacher_log_probs(teacher_output["view_logits"], center, teacher_temp)
  teacher_probs = jnp.exp(teacher_logp)
  view = _pair_mean(
    [
      view_cross_entropy(teacher_probs, student_log_probs(out["view_logits"], student_temp))
      for out in student_outputs
    ]
  )
  aux = {
    "view_loss": view,
    "teacher_entropy": entropy(teacher_logp),
    "teacher_batch_entropy": batch_entropy(teacher_probs),
  }
  if not region_loss_weight:
    return view, aux
  teacher_region_probs = jnp.exp(
    teacher_log_probs(teacher_output["region_logits"], region_center, teacher_temp)
  )
  teacher_features = jax.lax.stop_gradient(teacher_output["region_features"])
  region = _pair_mean(
    [
      region_cross_entropy(
        teacher_region_probs,
        teacher_features,
        student_log_probs(out["region_logits"], student_temp),
        out["region_features"],
      )
      for out in student_outputs
    ]
  )
  aux["region_loss"] = region
  return (1 - region_loss_weight) * view + region_loss_weight * region, aux


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float) -> jax.Array:
  """EMA of the global-batch mean of the teacher logits over all rows (batch, views and tokens).

  Inside jit the mean over a batch-sharded array is already the all-reduced global mean.

  Args:
    center: [1, K] current centre.
    teacher_logits: [..., K] teacher head outputs of the batch.
    momentum: the EMA's weight of the old centre.

  Returns:
    The new [1, K] float32 centre.
  """
  logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  batch_center = jnp.mean(logits.reshape(-1, logits.shape[-1]), axis=0, keepdims=True)
  return center * momentum + batch_center * (1 - momentum)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, p * p * C]: row-major patches, each flattened in (row, column, channel) order.

  Args:
    images: NHWC images, sides multiples of patch_size.
    patch_size: p.

  Returns:
    The patches, as MAE's prediction targets.
  """
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


def normalized_pixels(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Each patch normalised by its mean and unbiased (N - 1) variance: (x - mean) / sqrt(var + eps).

  Args:
    patches: [..., P] pixel values.
    eps: added to the variance.

  Returns:
    float32 [..., P].
  """
  patches = patches.astype(jnp.float32)
  mean = patches.mean(axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def reconstruction_loss(
  pred: jax.Array, images: jax.Array, mask: jax.Array, patch_size: int, norm_pix: bool = True
) -> jax.Array:
  """MAE's loss: per-patch mean squared error, averaged over the masked patches of the batch.

  Args:
    pred: [B, N, p * p * C] predicted pixels.
    images: [B, H, W, C] the (normalised) model input.
    mask: [B, N], 1 where the patch was masked.
    patch_size: p.
    norm_pix: targets normalised per patch (normalized_pixels), as MAE and MAE-Lite train.

  Returns:
    The float32 scalar loss.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    target = normalized_pixels(target)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def attention_distillation_loss(
  student_logits: jax.Array, teacher_logits: jax.Array, head_mix: jax.Array
) -> jax.Array:
  """D-MAE's attention loss: MSE between head-mixed student logits and the teacher's (no gradient to it).

  Args:
    student_logits: [B, H_s, T, T] pre-softmax attention logits of a student block.
    teacher_logits: [B, H_t, T, T] those of the matching teacher block.
    head_mix: [H_s, H_t], the learned 1 x 1 mix of student heads onto teacher heads.

  Returns:
    The float32 scalar mean over every element.
  """
  mixed = jnp.einsum("bsqk,st->btqk", student_logits.astype(jnp.float32), head_mix, **_EINSUM)
  return jnp.mean(jnp.square(mixed - jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))))
