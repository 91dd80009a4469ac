"""The EsViT loss against a numpy transcription of its definition (loops over pairs, tokens)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import losses

B, K, C = 3, 11, 6
TEACHER_TOKENS = 9
# Crop groups (crops, tokens): 2 globals, then locals of two sizes.
GROUPS = ((2, TEACHER_TOKENS), (3, 4), (2, 1))
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.05


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def reference_loss(student, teacher, center, region_center, weight):
  """Official DDINOLoss.forward written per crop: lists of [B, K], [B, T, K], [B, T, C] arrays."""
  s_view, s_region, s_feat = student
  t_view, t_region, t_feat = teacher
  total, num_pairs, view_sum, region_sum = 0.0, 0, 0.0, 0.0
  for t in range(2):
    q = np.exp(np_log_softmax((t_view[t] - center) / TEACHER_TEMP))
    for v in range(len(s_view)):
      if v == t:
        continue
      view = np.sum(-q * np_log_softmax(s_view[v] / STUDENT_TEMP), axis=-1)  # [B]
      region = np.zeros(B)
      if weight:
        q_region = np.exp(np_log_softmax((t_region[t] - region_center) / TEACHER_TEMP))  # [B, N, K]
        log_p = np_log_softmax(s_region[v] / STUDENT_TEMP)  # [B, T, K]
        for b in range(B):
          for j in range(s_feat[v].shape[1]):
            sims = [
              np_normalize(s_feat[v][b, j]) @ np_normalize(t_feat[t][b, i]) for i in range(TEACHER_TOKENS)
            ]
            target = q_region[b, int(np.argmax(sims))]
            region[b] += -np.sum(target * log_p[b, j]) / s_feat[v].shape[1]
      total += ((1 - weight) * view + weight * region).mean()
      view_sum += view.mean()
      region_sum += region.mean()
      num_pairs += 1
  return total / num_pairs, view_sum / num_pairs, region_sum / num_pairs


def random_outputs(seed, with_region=True):
  """Student groups and teacher group as the model returns them, plus per-crop lists for the reference."""
  rng = np.random.default_rng(seed)
  student = []
  for crops, tokens in GROUPS:
    out = {
      "view_logits": rng.normal(size=(B, crops, K)),
      "region_features": rng.normal(size=(B, crops, tokens, C)),
    }
    if with_region:
      out["region_logits"] = rng.normal(size=(B, crops, tokens, K))
    student.append(out)
  teacher = {
    "view_logits": rng.normal(size=(B, 2, K)),
    "region_features": rng.normal(size=(B, 2, TEACHER_TOKENS, C)),
  }
  if with_region:
    teacher["region_logits"] = rng.normal(size=(B, 2, TEACHER_TOKENS, K))
  centers = rng.normal(size=(1, K)) * 0.3, rng.normal(size=(1, K)) * 0.3
  return student, teacher, centers


def per_crop(outputs, key):
  return [out[key][:, i] for out in outputs for i in range(out[key].shape[1])] if key in outputs[0] else None


def to_jax(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


@functools.partial(jax.jit, static_argnums=3)
def run_loss(student, teacher, centers, weight):
  return losses.esvit_loss(
    to_jax(student),
    to_jax(teacher),
    *to_jax(centers),
    teacher_temp=TEACHER_TEMP,
    student_temp=STUDENT_TEMP,
    region_loss_weight=weight,
  )


@pytest.mark.parametrize("weight", [0.5, 0.3])
def test_esvit_loss_matches_numpy(weight):
  student, teacher, centers = random_outputs(0)
  keys = ("view_logits", "region_logits", "region_features")
  expected = reference_loss(
    [per_crop(student, k) for k in keys], [per_crop([teacher], k) for k in keys], *centers, weight
  )
  loss, aux = run_loss(student, teacher, centers, weight)
  np.testing.assert_allclose(loss, expected[0], rtol=1e-5)
  np.testing.assert_allclose(aux["view_loss"], expected[1], rtol=1e-5)
  np.testing.assert_allclose(aux["region_loss"], expected[2], rtol=1e-5)


def test_view_only_is_dino():
  student, teacher, centers = random_outputs(1, with_region=False)
  expected, _, _ = reference_loss(
    [per_crop(student, "view_logits"), None, None],
    [per_crop([teacher], "view_logits"), None, None],
    *centers,
    weight=0.0,
  )
  loss, aux = run_loss(student, teacher, centers, 0.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert "region_loss" not in aux


def test_teacher_entropy():
  student, teacher, centers = random_outputs(2)
  probs = np.exp(np_log_softmax((teacher["view_logits"] - centers[0]) / TEACHER_TEMP))
  expected = np.mean(-np.sum(probs * np.log(probs), axis=-1))
  _, aux = run_loss(student, teacher, centers, 0.5)
  np.testing.assert_allclose(aux["teacher_entropy"], expected, rtol=1e-4)
  mean = probs.reshape(-1, probs.shape[-1]).mean(axis=0)
  np.testing.assert_allclose(aux["teacher_batch_entropy"], -np.sum(mean * np.log(mean)), rtol=1e-4)


def test_batch_entropy_is_zero_when_every_distribution_is_on_one_outcome():
  one_hot = np.zeros((4, 2, 8), np.float32)
  one_hot[..., 3] = 1.0
  assert float(losses.batch_entropy(jnp.asarray(one_hot))) == 0.0
  spread = np.eye(8, dtype=np.float32).reshape(4, 2, 8)  # Each image confident, the batch uniform.
  np.testing.assert_allclose(float(losses.batch_entropy(jnp.asarray(spread))), np.log(8), rtol=1e-6)


def test_gradient_only_through_student_logits():
  student, teacher, centers = random_outputs(3)
  grads = jax.grad(lambda *args: run_loss(*args, 0.5)[0], argnums=(0, 1, 2))(student, teacher, centers)
  g_student, g_teacher, g_centers = grads
  for leaf in jax.tree.leaves((g_teacher, g_centers)) + [g["region_features"] for g in g_student]:
    np.testing.assert_array_equal(leaf, 0.0)
  for g in g_student:
    assert np.abs(g["view_logits"]).max() > 0 and np.abs(g["region_logits"]).max() > 0


def test_student_gradient_matches_finite_differences():
  student, teacher, centers = random_outputs(4)
  keys = ("view_logits", "region_logits", "region_features")
  grads = jax.grad(lambda s: run_loss(s, teacher, centers, 0.5)[0])(student)
  rng = np.random.default_rng(0)
  eps = 1e-5
  for group, key in [(0, "view_logits"), (1, "view_logits"), (1, "region_logits"), (2, "region_logits")]:
    index = tuple(rng.integers(0, n) for n in student[group][key].shape)
    values = []
    for sign in (1, -1):
      shifted = jax.tree.map(np.copy, student)
      shifted[group][key][index] += sign * eps
      values.append(
        reference_loss(
          [per_crop(shifted, k) for k in keys], [per_crop([teacher], k) for k in keys], *centers, 0.5
        )[0]
      )
    np.testing.assert_allclose(
      grads[group][key][index], (values[0] - values[1]) / (2 * eps), rtol=2e-3, atol=1e-6
    )


def test_update_center_is_ema_of_global_mean():
  rng = np.random.default_rng(5)
  center = rng.normal(size=(1, K))
  logits = rng.normal(size=(B, 2, TEACHER_TOKENS, K))
  expected = 0.9 * center + 0.1 * logits.reshape(-1, K).mean(0, keepdims=True)
  np.testing.assert_allclose(
    losses.update_center(*to_jax((center, logits)), 0.9), expected, rtol=1e-5, atol=1e-7
  )
