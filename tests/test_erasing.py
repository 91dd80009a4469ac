"""Random erasing against a numpy reference written from timm's RandomErasing(mode='pixel') for given
attempts, the statistics of its sampling, and the same result on one device and on eight."""

import math

import jax
import numpy as np

from esvit_jax import sharding
from esvit_jax.data import erasing

_H, _W, _C = 8, 10, 3


def _erase_reference(image, target_area, aspect, position, noise):
  """timm's RandomErasing._erase after its coin, with given attempts: the erased image and the box."""
  height, width = image.shape[:2]
  for area, ratio in zip(target_area, aspect, strict=True):
    h = int(round(math.sqrt(area * ratio)))
    w = int(round(math.sqrt(area / ratio)))
    if w < width and h < height:
      # random.randint(0, n) is uniform over 0..n, both ends included.
      top = int(position[0] * (height - h + 1))
      left = int(position[1] * (width - w + 1))
      out = image.copy()
      out[top : top + h, left : left + w] = noise[top : top + h, left : left + w]
      return out, (top, left, h, w)
  return image, (0, 0, 0, 0)


# (target areas, aspects, position) with 3 attempts: the first fits; the first two are too tall / too wide
# by exactly one side (h = H, w = W); a side that rounds half to even (sqrt(6.25) = 2.5 -> 2); no attempt
# fits; boxes at the far corner (position near 1).
_CASES = [
  ([20.0, 30.0, 5.0], [1.0, 1.0, 1.0], [0.5, 0.5]),
  ([64.0, 40.0, 12.0], [1.0, 0.4, 0.75], [0.2, 0.7]),
  ([6.25, 30.0, 5.0], [1.0, 1.0, 1.0], [0.3, 0.3]),
  ([80.0, 70.0, 200.0], [1.0, 1.0, 1.0], [0.5, 0.5]),
  ([20.0, 30.0, 5.0], [0.3, 1.0, 1.0], [0.9999, 0.9999]),
  ([20.0, 30.0, 5.0], [2.5, 1.0, 1.0], [0.0, 0.9999]),
]


def test_erasing_with_given_attempts_is_timms():
  rng = np.random.default_rng(0)
  areas = np.array([case[0] for case in _CASES], np.float32)
  aspects = np.array([case[1] for case in _CASES], np.float32)
  positions = np.array([case[2] for case in _CASES], np.float32)
  images = rng.normal(size=(len(_CASES), _H, _W, _C)).astype(np.float32)
  noise = rng.normal(size=images.shape).astype(np.float32)

  def one(area, aspect, position, image, noise):
    box = erasing.erase_box(area, aspect, position, _H, _W)
    return box, erasing.erase(image, box, noise)

  boxes, erased = jax.device_get(jax.jit(jax.vmap(one))(areas, aspects, positions, images, noise))
  for i, case in enumerate(_CASES):
    expected, box = _erase_reference(images[i], areas[i], aspects[i], positions[i], noise[i])
    np.testing.assert_array_equal(boxes[i], box, err_msg=str(case))
    np.testing.assert_array_equal(erased[i], expected, err_msg=str(case))
  # The cases reach what they are for.
  assert boxes[1][2] == 3 and boxes[2][2:].tolist() == [2, 2] and (erased[3] == images[3]).all()
  assert boxes[4][0] + boxes[4][2] == _H and boxes[4][1] + boxes[4][3] == _W and boxes[5][0] == 0


def _timm_erased_sides(n, side, rng):
  """The sides (h, w) of n erasures of a side x side image, simulated with numpy from timm's loop."""
  area = rng.uniform(0.02, 1 / 3, (n, 10)) * side * side
  aspect = np.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3), (n, 10)))
  h = np.round(np.sqrt(area * aspect))
  w = np.round(np.sqrt(area / aspect))
  fits = (h < side) & (w < side)
  first = np.argmax(fits, axis=1)
  rows = np.arange(n)
  return h[rows, first][fits.any(axis=1)], w[rows, first][fits.any(axis=1)]


def _within_four_standard_errors(sample, reference):
  """Mean and standard deviation of `sample` against those of a much larger `reference`."""
  mean, std = reference.mean(), reference.std()
  kurtosis = np.mean((reference - mean) ** 4) / std**4
  n = len(sample)
  assert abs(sample.mean() - mean) < 4 * std / math.sqrt(n), (sample.mean(), mean)
  assert abs(sample.std() - std) < 4 * std * math.sqrt((kurtosis - 1) / (4 * n)), (sample.std(), std)


def test_erasing_rate_box_and_noise_statistics():
  n, side, prob, value = 2000, 32, 0.4, 5.0
  images = np.full((n, side, side, _C), value, np.float32)
  out = jax.device_get(jax.jit(erasing.random_erasing, static_argnums=2)(jax.random.key(0), images, prob))
  changed = out != value
  erased = changed.any(axis=(1, 2, 3))
  assert abs(erased.mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / n)
  # Each erasure is one box through every channel; outside it the image is untouched.
  pixels = changed[erased].all(axis=3)
  np.testing.assert_array_equal(pixels, changed[erased].any(axis=3))
  rows, cols = pixels.any(axis=2), pixels.any(axis=1)
  np.testing.assert_array_equal(pixels, rows[:, :, None] & cols[:, None, :])
  h, w = rows.sum(axis=1), cols.sum(axis=1)
  top, left = rows.argmax(axis=1), cols.argmax(axis=1)
  # Positions reach both ends: random.randint(0, side - h) includes side - h.
  assert (top == 0).any() and (top + h == side).any() and (left == 0).any() and (left + w == side).any()
  # The erased share and the log aspect ratio against timm's sampling.
  reference_h, reference_w = _timm_erased_sides(100_000, side, np.random.default_rng(1))
  _within_four_standard_errors(h * w / side**2, reference_h * reference_w / side**2)
  _within_four_standard_errors(np.log(h / w), np.log(reference_h / reference_w))
  # N(0, 1) noise inside the box, independent per pixel and channel.
  noise = out[erased][pixels]
  assert abs(noise.mean()) < 4 / math.sqrt(noise.size), noise.mean()
  assert abs(noise.std() - 1) < 4 / math.sqrt(2 * noise.size), noise.std()
  assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 4 / math.sqrt(len(noise))


def _erase_on(devices):
  mesh = sharding.make_mesh(devices)
  return jax.jit(
    lambda key, images: erasing.random_erasing(key, images, 0.5),
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
    out_shardings=sharding.batch_sharding(mesh),
  )


def test_sharded_erasing_equals_single_device():
  images = np.random.default_rng(0).normal(size=(16, _H, _W, _C)).astype(np.float32)
  key = jax.random.key(5)
  single = jax.device_get(_erase_on(jax.devices()[:1])(key, images))
  sharded = jax.device_get(_erase_on(jax.devices())(key, images))
  assert 0 < np.mean((single != images).any(axis=(1, 2, 3))) < 1
  np.testing.assert_array_equal(sharded, single)
