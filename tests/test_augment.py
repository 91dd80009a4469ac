"""The DINO augmentation ops against their definitions: PIL itself (the official pipeline's library),
numpy references written from the math, and statistics over many random draws."""

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
import pytest
import tensorflow as tf

from esvit_jax.data import augment, constants, demo_data, normalize

_RNG = np.random.default_rng(0)
_IMAGES = _RNG.integers(0, 256, (4, 23, 31, 3), dtype=np.uint8)
_IMAGES[1] = _IMAGES[1] // 4 + 100  # A low-contrast crop.
_FACTORS = np.array([0.6, 0.87, 1.13, 1.4], np.float32)
_HUES = np.array([-0.1, -0.031, 0.047, 0.1], np.float32)


def _in_tf_data(fn, *args):
  """fn(*args) computed inside tf.data.Dataset.map (graph mode, as the pipeline runs it)."""
  ds = tf.data.Dataset.from_tensors(tuple(tf.constant(a) for a in args)).map(fn)
  return next(iter(ds)).numpy()


def _pil(fn, images=_IMAGES, params=_FACTORS):
  pairs = zip(images, params, strict=True)
  return np.stack([np.asarray(fn(Image.fromarray(im), float(p))) for im, p in pairs])


def _pil_hue(image, factor):
  """torchvision F_pil.adjust_hue: shift the 8-bit HSV hue by int(factor * 255), modulo 256."""
  h, s, v = image.convert("HSV").split()
  hue = (np.asarray(h).astype(np.int64) + int(factor * 255)) % 256
  return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")


def _enhance(kind):
  return lambda image, factor: kind(image).enhance(factor)


_COLOR_CASES = {
  "brightness": (augment.adjust_brightness, _enhance(ImageEnhance.Brightness), _FACTORS),
  "contrast": (augment.adjust_contrast, _enhance(ImageEnhance.Contrast), _FACTORS),
  "saturation": (augment.adjust_saturation, _enhance(ImageEnhance.Color), _FACTORS),
  "hue": (augment.adjust_hue, _pil_hue, _HUES),
}


@pytest.mark.parametrize("name", sorted(_COLOR_CASES))
def test_color_ops_equal_pil_eagerly_and_in_tf_data(name):
  op, reference, params = _COLOR_CASES[name]
  expected = _pil(reference, params=params)
  x = _IMAGES.astype(np.float32)
  np.testing.assert_array_equal(op(tf.constant(x), tf.constant(params)).numpy(), expected)
  np.testing.assert_array_equal(_in_tf_data(op, x, params), expected)


def test_grayscale_and_solarize_equal_pil():
  x = tf.constant(_IMAGES, tf.float32)
  gray = augment.grayscale(x).numpy()
  np.testing.assert_array_equal(
    gray[..., 0], np.stack([np.asarray(Image.fromarray(i).convert("L")) for i in _IMAGES])
  )
  solarized = np.stack([np.asarray(ImageOps.solarize(Image.fromarray(i))) for i in _IMAGES])
  np.testing.assert_array_equal(augment.solarize(x).numpy(), solarized)


def test_solarize_inverts_exactly_the_values_at_or_above_128():
  values = np.arange(256, dtype=np.float32)
  expected = np.where(values >= 128, 255 - values, values)
  np.testing.assert_array_equal(_in_tf_data(augment.solarize, values), expected)


def test_normalize_is_imagenet_mean_std():
  out = np.asarray(normalize.normalize_images(_IMAGES))
  expected = (_IMAGES / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("size", [(16, 16), (40, 12)])
def test_bicubic_resize_matches_pil_within_one_level(size):
  smooth = np.asarray(Image.fromarray(_IMAGES[0]).resize((62, 46), Image.BILINEAR))
  ours = augment.resize(tf.constant(smooth, tf.float32), size).numpy()
  expected = np.asarray(Image.fromarray(smooth).resize(size[::-1], Image.BICUBIC)).astype(np.float32)
  assert ours.shape == (*size, 3)
  # TF's float weights against PIL's 22-bit fixed point: measured 1 value of 1,440 off by 1 at (40, 12).
  assert np.abs(ours - expected).max() <= 1 and np.sum(ours != expected) <= 3


def test_crop_boxes_follow_random_resized_crop_statistics():
  height, width, scale = 375, 500, (0.05, 0.4)
  boxes = augment.sample_crop_box(tf.constant([3, 4]), height, width, 4000, scale).numpy()
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area = h * w / (height * width)
  slack = (h + w + 1) / (height * width)  # Rounding h and w moves the area by at most this.
  assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
  ratio = w / h
  assert (ratio >= 3 / 4 * (1 - 2 / h.min())).all() and (ratio <= 4 / 3 * (1 + 2 / h.min())).all()
  # Area fraction uniform on the scale range: its mean and quartiles.
  assert abs(area.mean() - 0.225) < 0.01
  np.testing.assert_allclose(np.quantile(area, [0.25, 0.75]), [0.1375, 0.3125], atol=0.015)
  # Log aspect ratio uniform on (log 3/4, log 4/3): mean 0, symmetric.
  assert abs(np.log(ratio).mean()) < 0.01
  # Positions uniform: the crop centre's mean is the image centre.
  assert abs((top + h / 2).mean() - height / 2) < 5 and abs((left + w / 2).mean() - width / 2) < 5


def test_crop_box_falls_back_to_a_centred_crop_of_clamped_ratio():
  # A 10 x 400 strip: no try can fit an area >= 0.9 with ratio <= 4/3, so torchvision's fallback runs:
  # h = height, w = round(h * 4/3), centred.
  boxes = augment.sample_crop_box(tf.constant([0, 1]), 10, 400, 50, (0.9, 1.0)).numpy()
  np.testing.assert_array_equal(boxes, np.tile([0, (400 - 13) // 2, 10, 13], (50, 1)))
  boxes = augment.sample_crop_box(tf.constant([0, 1]), 400, 10, 5, (0.9, 1.0)).numpy()
  np.testing.assert_array_equal(boxes, np.tile([(400 - 13) // 2, 0, 13, 10], (5, 1)))


@pytest.mark.parametrize("side", [2.5, 3.5, 4.5, 5.5])
def test_crop_sides_round_half_to_even(side):
  # Area fixed at side^2 of a 16 x 16 image and ratio fixed at 1 (both exact in binary): every try has
  # w = h = side, and torchvision's int(round(side)) is Python's half to even (2.5 -> 2, 3.5 -> 4).
  area = side**2 / 256
  boxes = augment.sample_crop_box(tf.constant([1, 2]), 16, 16, 8, (area, area), ratio=(1.0, 1.0)).numpy()
  np.testing.assert_array_equal(boxes[:, 2:], round(side))


def test_jitter_parameters_are_in_range_and_orders_are_permutations():
  params = augment.sample_jitter(tf.constant([5, 6]), 4000)
  factors, order = params["factors"].numpy(), params["order"].numpy()
  for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
    assert factors[:, k].min() >= lo and factors[:, k].max() <= hi
    assert factors[:, k].min() < lo + 0.01 and factors[:, k].max() > hi - 0.01
    assert abs(factors[:, k].mean() - (lo + hi) / 2) < 0.01 * (hi - lo) * 2
  applied = (order != 4).all(axis=1)
  assert ((order == 4).all(axis=1) | applied).all()
  assert abs(applied.mean() - 0.8) < 0.03
  np.testing.assert_array_equal(np.sort(order[applied], axis=1), np.tile(np.arange(4), (applied.sum(), 1)))
  first_op = np.bincount(order[applied, 0], minlength=4) / applied.sum()
  np.testing.assert_allclose(first_op, 0.25, atol=0.03)


def natural_images(num, height, width, seed=0):
  """Photo-like uint8 images [num, height, width, 3]: smooth colour gradients, flat discs with hard
  edges, and sensor-like noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:height, :width] / max(height, width)
  out = []
  for _ in range(num):
    a, b, c = rng.uniform(-150, 150, (3, 3))
    image = 128 + a * xx[..., None] + b * yy[..., None] + c * (xx * yy)[..., None]
    for _ in range(5):
      cy, cx, radius = rng.uniform(0, 1, 3) * [height, width, 0.35 * min(height, width)]
      image[(yy * max(height, width) - cy) ** 2 + (xx * max(height, width) - cx) ** 2 < radius**2] = (
        rng.uniform(0, 255, 3)
      )
    out.append(np.clip(image + rng.normal(0, 6, image.shape), 0, 255).round().astype(np.uint8))
  return np.stack(out)


BLUR_SIGMAS = np.concatenate([[0.1, 0.2, 0.5, 1.0, 2.0], _RNG.uniform(0.1, 2.0, 5)]).astype(np.float32)


def blur_test_images(num):
  """Natural-like images and demo images, 40 x 56, for blur tests."""
  return np.concatenate(
    [natural_images(num - num // 2, 40, 56, seed=1), demo_data.generate(num // 2, (40, 56), seed=2)[0]]
  )


def pil_blur(images, sigmas):
  return np.stack(
    [
      np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(float(s))))
      for i, s in zip(images, sigmas, strict=True)
    ]
  )


def pil_box_radius(sigma):
  """PIL's box radius for GaussianBlur(sigma) with three passes (Gwosdek et al.), float32 as its C code."""
  f32 = np.float32
  sigma2 = f32(f32(f32(sigma) * f32(sigma)) / f32(3))
  whole = f32(np.floor((np.float64(f32(np.sqrt(12.0 * np.float64(sigma2) + 1.0))) - 1.0) / 2.0))
  frac = f32(f32(f32(2) * whole + f32(1)) * f32(whole * f32(whole + f32(1)) - f32(3) * sigma2))
  return f32(whole + f32(frac / f32(f32(6) * f32(sigma2 - f32(f32(whole + f32(1)) * f32(whole + f32(1)))))))


def test_gaussian_blur_equals_pil_on_natural_and_demo_images():
  images = blur_test_images(len(BLUR_SIGMAS))
  expected = pil_blur(images, BLUR_SIGMAS)
  x = tf.constant(images, tf.float32)
  np.testing.assert_array_equal(augment.gaussian_blur(x, tf.constant(BLUR_SIGMAS)).numpy(), expected)
  compiled = tf.function(augment.gaussian_blur, jit_compile=True)  # As inside apply_photometric.
  np.testing.assert_array_equal(compiled(x, tf.constant(BLUR_SIGMAS)).numpy(), expected)
  # PIL's box filter blurs even small sigmas (variance 0.04 at sigma 0.2: 3% of the values change here);
  # a sampled Gaussian's neighbour taps weigh exp(-12.5) = 4e-6 there and change none.
  assert np.mean(expected[1] != images[1]) > 0.01


def test_blur_box_extent_covers_the_largest_sigma():
  # Each box pass reaches int(radius) whole taps and one fractional tap each side.
  assert int(pil_box_radius(constants.BLUR_SIGMA[1])) + 1 == constants.BLUR_BOX_EXTENT
  assert int(pil_box_radius(np.nextafter(np.float32(constants.BLUR_SIGMA[1]), 3))) + 1 <= 2


def _photometric(seed, num, size=20, **probs):
  x = tf.constant(_RNG.integers(0, 256, (num, size, size, 3)).astype(np.float32))
  defaults = dict(blur_prob=[0.5] * num, solarize_prob=[0.0] * num)
  params = augment.sample_photometric(tf.constant(seed), **{**defaults, **probs})
  return x, params, augment.apply_photometric(x, params).numpy()


def test_photometric_chain_equals_the_ops_composed_one_by_one():
  x, params, out = _photometric([1, 2], 6, solarize_prob=[0.5] * 6)
  p = {k: v.numpy() for k, v in params.items()}
  for i in range(6):
    y = x[i : i + 1]
    if p["flip"][i]:
      y = y[:, :, ::-1]
    for op in p["order"][i]:
      if op < 4:
        y = augment._COLOR_OPS[op](y, tf.constant(p["factors"][i : i + 1, op]))  # pylint: disable=protected-access
    if p["gray"][i]:
      y = tf.broadcast_to(augment.grayscale(y), y.shape)
    if p["blur"][i]:
      y = augment.gaussian_blur(y, tf.constant(p["sigma"][i : i + 1]))
    if p["solarize"][i]:
      y = augment.solarize(y)
    np.testing.assert_array_equal(np.asarray(y)[0], out[i])


def test_grayscale_probability_one_gives_equal_channels_and_zero_keeps_colour():
  _, _, gray = _photometric([3, 4], 4, blur_prob=[0.0] * 4, gray_prob=1.0)
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
  _, _, colour = _photometric([3, 4], 4, blur_prob=[0.0] * 4, gray_prob=0.0)
  assert (colour[..., 0] != colour[..., 1]).mean() > 0.5


def test_photometric_probabilities_over_many_crops():
  params = augment.sample_photometric(tf.constant([8, 9]), [1.0, 0.1] * 1000, [0.0, 0.2] * 1000)
  p = {k: v.numpy() for k, v in params.items()}
  assert abs(p["flip"].mean() - 0.5) < 0.04 and abs(p["gray"].mean() - 0.2) < 0.03
  assert p["blur"][::2].all() and abs(p["blur"][1::2].mean() - 0.1) < 0.03
  assert not p["solarize"][::2].any() and abs(p["solarize"][1::2].mean() - 0.2) < 0.03
  assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0 and abs(p["sigma"].mean() - 1.05) < 0.04
  small = augment.sample_photometric(tf.constant([8, 9]), [1.0] * 1000, [0.0] * 1000, sigma=(0.02, 0.3))
  sigma = small["sigma"].numpy()
  assert sigma.min() >= 0.02 and sigma.max() <= 0.3 and abs(sigma.mean() - 0.16) < 0.01


def test_dino_views_are_seeded_and_in_range():
  image = tf.constant(_RNG.integers(0, 256, (50, 70, 3), dtype=np.uint8))

  def views(seed):
    return augment.dino_views(image, tf.constant(seed), 16, (0.4, 1.0), (1.0, 0.1), (0.0, 0.2))

  a, b, c = views([1, 1]), views([1, 1]), views([1, 2])
  assert a.shape == (2, 16, 16, 3) and a.dtype == tf.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  in_graph = _in_tf_data(
    lambda s: augment.dino_views(image, s, 16, (0.4, 1.0), (1.0, 0.1), (0.0, 0.2)), np.array([1, 1], np.int32)
  )
  np.testing.assert_array_equal(in_graph, a)


def test_center_crop_eval_follows_torchvision_resize_then_center_crop():
  image = np.random.default_rng(5).integers(0, 256, (30, 46, 3), dtype=np.uint8)
  out = augment.center_crop_eval(tf.constant(image), 20, 13).numpy().astype(int)
  # Resize(20): shorter side 30 -> 20, longer int(20 * 46 / 30) = int(30.7) = 30; CenterCrop(13) at
  # round(3.5) = 4 and round(8.5) = 8 (Python's round, half to even).
  resized = np.asarray(Image.fromarray(image).resize((30, 20), Image.BICUBIC)).astype(int)
  top, left = round((20 - 13) / 2), round((30 - 13) / 2)
  expected = resized[top : top + 13, left : left + 13]
  assert out.shape == (13, 13, 3) and (top, left) == (4, 8)
  # The resize is PIL's to within 1 level: measured 0 values off here, at most 1 of 507 on 6 noise images.
  assert np.abs(out - expected).max() <= 1 and np.sum(out != expected) <= 3
