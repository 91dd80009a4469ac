"""Mixup, CutMix and label smoothing against numpy references written from timm's Mixup(mode='batch'), the
statistics of the sampler, and the same result on one device and on eight."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import sharding
from esvit_jax.data import mixup

_RNG = np.random.default_rng(0)
_H, _W, _C = 8, 10, 3
_K = 5


def _batch(batch=8):
  images = _RNG.normal(size=(batch, _H, _W, _C)).astype(np.float32)
  labels = _RNG.integers(0, _K, batch).astype(np.int32)
  return images, labels


def _one_hot_reference(labels, num_classes, smoothing):
  off = smoothing / num_classes
  targets = np.full((len(labels), num_classes), off)
  targets[np.arange(len(labels)), labels] = 1 - smoothing + off
  return targets


def _targets_reference(labels, lam, smoothing):
  y = _one_hot_reference(labels, _K, smoothing)
  return y * lam + y[::-1] * (1 - lam)


def _rand_bbox_reference(lam, cy, cx, height, width):
  """timm's rand_bbox for a given centre, with the lambda correction: ((yl, yh, xl, xh), lam)."""
  ratio = np.sqrt(1 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  yl, yh = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
  xl, xh = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
  return (yl, yh, xl, xh), 1 - (yh - yl) * (xh - xl) / (height * width)


def test_smoothed_one_hot_is_timms():
  targets = np.asarray(mixup.smoothed_one_hot(jnp.array([3, 0]), 10, 0.1))
  np.testing.assert_allclose(targets[0], [0.01] * 3 + [0.91] + [0.01] * 6, rtol=1e-6)
  np.testing.assert_allclose(targets[1], [0.91] + [0.01] * 9, rtol=1e-6)
  np.testing.assert_array_equal(mixup.smoothed_one_hot(jnp.array([2]), 4, 0.0), [[0, 0, 1, 0]])


def test_mixup_blends_each_row_with_the_reversed_batch():
  images, labels = _batch()
  lam = np.float32(0.3)
  params = mixup.MixParams(jnp.float32(lam), jnp.array(False), jnp.array([0, _H, 0, _W]))
  mixed, targets = jax.jit(mixup.mix, static_argnums=(3, 4))(images, labels, params, _K, 0.1)
  np.testing.assert_allclose(mixed, images * lam + images[::-1] * (1 - lam), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(targets, _targets_reference(labels, lam, 0.1), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.sum(targets, axis=1), 1, rtol=1e-6)


# (lam, centre row, centre column): an odd cut inside the image (one pixel short), boxes clipped at the top
# left and the bottom right, and a cut of one pixel, which leaves an empty box and lam 1.
_CUTMIX_CASES = [(0.5, 4, 5), (0.2, 0, 0), (0.05, 7, 9), (0.5, 1, 8), (0.9, 3, 2), (0.97, 4, 4)]


def test_cutmix_box_lambda_and_paste_are_timms():
  lam = np.array([case[0] for case in _CUTMIX_CASES], np.float32)
  centres = np.array([case[1:] for case in _CUTMIX_CASES], np.int32)
  boxes, lams = jax.jit(jax.vmap(lambda lam, c: mixup.cutmix_box(lam, c, _H, _W)))(lam, centres)
  mix = jax.jit(mixup.mix, static_argnums=(3, 4))
  images, labels = _batch()
  for i, (_, cy, cx) in enumerate(_CUTMIX_CASES):
    (yl, yh, xl, xh), expected_lam = _rand_bbox_reference(float(lam[i]), cy, cx, _H, _W)
    np.testing.assert_array_equal(boxes[i], [yl, yh, xl, xh], err_msg=str(_CUTMIX_CASES[i]))
    np.testing.assert_allclose(lams[i], expected_lam, rtol=1e-6)
    params = mixup.MixParams(lams[i], jnp.array(True), boxes[i])
    mixed, targets = mix(images, labels, params, _K, 0.0)
    expected = images.copy()
    expected[:, yl:yh, xl:xh] = images[::-1, yl:yh, xl:xh]
    np.testing.assert_array_equal(mixed, expected)
    np.testing.assert_allclose(targets, _targets_reference(labels, expected_lam, 0.0), rtol=1e-6, atol=1e-7)
  boxes = np.asarray(boxes)
  assert boxes[0, 1] - boxes[0, 0] == 4  # A cut of 5 rows spans 4.
  assert (boxes[1, [0, 2]] == 0).all() and (boxes[2, [1, 3]] == (_H, _W)).all()  # Clipped.
  assert lams[-1] == 1


def _sample_many(n, mixup_alpha, cutmix_alpha, switch_prob, prob, side):
  keys = jax.random.split(jax.random.key(0), n)
  sample = jax.vmap(lambda k: mixup.sample_mix(k, mixup_alpha, cutmix_alpha, switch_prob, prob, side, side))
  return jax.device_get(jax.jit(sample)(keys))


def _timm_cutmix(n, alpha, side, rng):
  """timm's CutMix for n batches, simulated with numpy: the corrected lam, the box's top and left."""
  lam = rng.beta(alpha, alpha, n)
  cut = (side * np.sqrt(1 - lam)).astype(int)
  centre = rng.integers(0, side, (2, n))
  low = np.clip(centre - cut // 2, 0, side)
  sides = np.clip(centre + cut // 2, 0, side) - low
  return 1 - sides[0] * sides[1] / side**2, low[0], low[1]


def _assert_same_mean(sample, reference):
  """Means within 4 standard errors of the sample."""
  assert abs(sample.mean() - reference.mean()) < 4 * reference.std() / math.sqrt(len(sample))


def test_sampler_follows_switch_prob_prob_and_beta():
  n, side, alpha_mixup, alpha_cutmix, switch, prob = 4000, 32, 0.3, 2.0, 0.4, 0.7
  params = _sample_many(n, alpha_mixup, alpha_cutmix, switch, prob, side)
  mixed = params.use_cutmix | (params.lam != 1)
  # Binomial rates within 4 standard errors.
  assert abs(mixed.mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / n)
  cutmix_share = params.use_cutmix[mixed].mean()
  assert abs(cutmix_share - switch) < 4 * math.sqrt(switch * (1 - switch) / mixed.sum())
  assert (params.box[~params.use_cutmix] == 0).all() and (params.lam[~mixed] == 1).all()
  # Mixup's lam ~ Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
  lam = params.lam[mixed & ~params.use_cutmix]
  var = 1 / (4 * (2 * alpha_mixup + 1))
  assert abs(lam.mean() - 0.5) < 4 * math.sqrt(var / len(lam))
  # The sample variance of a Beta(0.3, 0.3) (kurtosis 1.33) has a relative standard error of
  # sqrt((1.33 - 1) / n), 1.4% for the ~1700 mixup rows here; 8% is more than four of them.
  assert abs(lam.var() / var - 1) < 0.08, lam.var()
  # CutMix's corrected lam and box position against timm's procedure simulated with numpy.
  lam, box = params.lam[params.use_cutmix], params.box[params.use_cutmix]
  reference = _timm_cutmix(200_000, alpha_cutmix, side, np.random.default_rng(1))
  for sample, expected in zip((lam, box[:, 0], box[:, 2]), reference, strict=True):
    _assert_same_mean(sample, expected)
  np.testing.assert_array_equal(lam, 1 - _box_area(box) / side**2)


def _box_area(box):
  return ((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])).astype(np.float32)


@pytest.mark.parametrize(
  "mixup_alpha, cutmix_alpha, prob, cutmix_share",
  [(0.8, 0.0, 1.0, 0.0), (0.0, 1.0, 1.0, 1.0), (0.8, 1.0, 0.0, 0.0)],
)
def test_sampler_with_one_method_or_prob_zero(mixup_alpha, cutmix_alpha, prob, cutmix_share):
  params = _sample_many(256, mixup_alpha, cutmix_alpha, 0.5, prob, 16)
  assert params.use_cutmix.mean() == cutmix_share
  assert (params.lam == 1).all() == (prob == 0)


def test_both_alphas_zero_leave_images_and_smooth_labels():
  images, labels = _batch()
  out, targets = mixup.mix_batch(
    jax.random.key(0), images, labels, num_classes=_K, mixup_alpha=0.0, cutmix_alpha=0.0, smoothing=0.1
  )
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets, _one_hot_reference(labels, _K, 0.1), rtol=1e-6)


def _mix_on(devices):
  mesh = sharding.make_mesh(devices)
  batch = sharding.batch_sharding(mesh)
  return jax.jit(
    lambda key, images, labels: mixup.mix_batch(
      key, images, labels, num_classes=_K, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1
    ),
    in_shardings=(sharding.replicated(mesh), batch, batch),
    out_shardings=batch,
  )


def test_sharded_mix_equals_single_device():
  images, labels = _batch(16)
  one, eight = _mix_on(jax.devices()[:1]), _mix_on(jax.devices())
  used_cutmix = []
  for key in jax.random.split(jax.random.key(3), 4):
    single, sharded = jax.device_get(one(key, images, labels)), jax.device_get(eight(key, images, labels))
    assert not np.array_equal(single[0], images)
    np.testing.assert_array_equal(sharded[0], single[0])
    np.testing.assert_array_equal(sharded[1], single[1])
    used_cutmix.append(bool(np.any(single[0] == images)))  # Mixup changes every pixel.
  assert any(used_cutmix) and not all(used_cutmix), used_cutmix  # Both methods were compared.
