"""The device augmentation against PIL itself, numpy references written from PIL's C arithmetic, the host
pipeline given the same crop boxes and parameters, and statistics of its own sampling."""

import itertools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
from PIL import Image, ImageOps
import pytest
import tensorflow as tf

from esvit_jax.data import augment, constants, device_augment
from tests import test_augment, test_multicrop

_RNG = np.random.default_rng(0)
_CANVAS = 96


def _config(**overrides):
  config = ml_collections.ConfigDict(
    dict(
      global_crop_size=32,
      local_crop_size=16,
      num_local_crops=4,
      global_crop_scale=(0.4, 1.0),
      local_crop_scale=(0.05, 0.4),
      color_jitter=tuple(constants.JITTER_STRENGTH.values()),
      blur_sigma=constants.BLUR_SIGMA,
      seed=0,
    )
  )
  config.update(overrides)
  return config


def _in_canvas(image, size=_CANVAS):
  canvas = np.zeros((size, size, 3), np.uint8)
  canvas[: image.shape[0], : image.shape[1]] = image
  return canvas


_IMAGE = test_augment.natural_images(1, 70, 90, seed=3)[0]
_CROPS = test_augment.natural_images(6, 24, 20, seed=4)  # Stand-ins for resized crops.


def _boxes(num, scale, seed=0):
  """Host-sampled crop boxes (augment.sample_crop_box) of _IMAGE."""
  return augment.sample_crop_box(tf.constant([seed, 7]), *_IMAGE.shape[:2], num, scale).numpy()


# ----------------------------------------------------------------------------------------------------
# Resized crop.


def _pil_coefficients(length, out_size):
  """PIL's bicubic resampling coefficients [out_size, length] in its fixed point (from Resample.c's
  arithmetic: support 2 * max(scale, 1), window rounded and clipped to the input, normalised)."""
  scale = length / out_size
  filter_scale = max(scale, 1.0)
  support = 2.0 * filter_scale
  out = np.zeros((out_size, length))
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), length)
    x = np.abs((np.arange(lo, hi) - center + 0.5) / filter_scale)
    k = np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, -0.5 * (((x - 5) * x + 8) * x - 4), 0.0))
    out[i, lo:hi] = k / k.sum()
  return np.sign(out) * np.floor(np.abs(out) * 2**22 + 0.5)


def _pil_resized_crop(image, box, size):
  """PIL's crop + resize(BICUBIC) in integer arithmetic: width pass, then height pass, each rounded."""
  top, left, h, w = box
  x = image[top : top + h, left : left + w].astype(np.int64)
  cols, rows = _pil_coefficients(w, size).astype(np.int64), _pil_coefficients(h, size).astype(np.int64)
  x = np.clip((np.einsum("iw,hwc->hic", cols, x) + 2**21) >> 22, 0, 255)
  return np.clip((np.einsum("jh,hic->jic", rows, x) + 2**21) >> 22, 0, 255)


def _pillow_goes_width_first(box, size):
  """Pillow 13 resamples the height first when it shrinks much more than the width (measured rule)."""
  h, w = box[2], box[3]
  return not (h > size and h - size > 2 * (w - size))


def test_resize_weights_are_pils_fixed_point_coefficients():
  weights_fn = jax.jit(device_augment.resize_weights, static_argnums=(2, 3))
  for length, out_size, start in [(34, 32, 5), (70, 32, 0), (90, 16, 3), (20, 32, 40), (32, 32, 7)]:
    weights = np.asarray(weights_fn(start, length, out_size, _CANVAS))
    expected = np.zeros((out_size, _CANVAS))
    expected[:, start : start + length] = _pil_coefficients(length, out_size) / 2**22
    # float32 against PIL's double: at most one unit of the 22-bit fixed point.
    np.testing.assert_allclose(weights, expected, rtol=0, atol=1.01 / 2**22)


@pytest.mark.parametrize("size,scale", [(32, (0.2, 1.0)), (16, (0.02, 0.4))])
def test_resized_crops_equal_pil(size, scale):
  boxes = _boxes(24, scale)
  ours = np.asarray(jax.jit(device_augment.resized_crops, static_argnums=2)(_in_canvas(_IMAGE), boxes, size))
  reference = np.stack([_pil_resized_crop(_IMAGE, b, size) for b in boxes])
  # float32 matmuls against PIL's integer sums: a value can only move where a sum sits within ~1e-4 of
  # a rounding boundary (measured: 1 level at 8.1e-5 of the values at 32 px, none at 16 px).
  assert np.abs(ours - reference).max() <= 1 and np.mean(ours != reference) < 2.5e-4
  pil = np.stack(
    [
      np.asarray(
        Image.fromarray(_IMAGE)
        .crop((b[1], b[0], b[1] + b[3], b[0] + b[2]))
        .resize((size, size), Image.BICUBIC)
      )
      for b in boxes
    ]
  )
  width_first = np.array([_pillow_goes_width_first(b, size) for b in boxes])
  np.testing.assert_array_equal(pil[width_first], reference[width_first])
  # Where Pillow 13 goes height first, the rounding between the passes moves values by a level or so.
  assert np.abs(pil[~width_first] - reference[~width_first]).mean() < 0.2


def test_resized_crops_match_the_host_resize():
  boxes = _boxes(16, (0.05, 1.0))
  ours = np.asarray(jax.jit(device_augment.resized_crops, static_argnums=2)(_in_canvas(_IMAGE), boxes, 32))
  host = np.stack(
    [augment.resized_crop(tf.constant(_IMAGE, tf.float32), tf.constant(b), 32).numpy() for b in boxes]
  )
  # TF's antialiased bicubic keeps float weights; PIL's (ours) are 22-bit fixed point (measured: 1 level
  # at 6.1e-5 of the values).
  assert np.abs(ours - host).max() <= 1 and np.mean(ours != host) < 2e-4


# ----------------------------------------------------------------------------------------------------
# Colour, grayscale, flip, solarize.


_DEVICE_COLOR_OPS = {
  "brightness": device_augment.adjust_brightness,
  "contrast": device_augment.adjust_contrast,
  "saturation": device_augment.adjust_saturation,
  "hue": device_augment.adjust_hue,
}


@pytest.mark.parametrize("name", sorted(_DEVICE_COLOR_OPS))
def test_color_ops_equal_pil(name):
  _, reference, params = test_augment._COLOR_CASES[name]  # pylint: disable=protected-access
  params = np.concatenate([params, params[:2]])
  expected = np.stack(
    [np.asarray(reference(Image.fromarray(im), float(p))) for im, p in zip(_CROPS, params, strict=True)]
  )
  ours = jax.jit(jax.vmap(_DEVICE_COLOR_OPS[name]))(_CROPS.astype(np.float32), params)
  np.testing.assert_array_equal(np.asarray(ours), expected)


def _all_colours():
  v = np.arange(1 << 24, dtype=np.uint32)
  return np.stack([v >> 16, (v >> 8) & 255, v & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)


def test_hsv_conversions_equal_pil_for_every_8_bit_colour():
  colours = _all_colours()
  hsv = np.stack(jax.jit(device_augment._rgb_to_hsv)(colours.astype(np.float32)), -1)  # pylint: disable=protected-access
  np.testing.assert_array_equal(hsv, np.asarray(Image.fromarray(colours).convert("HSV")))
  to_rgb = jax.jit(lambda c: device_augment._hsv_to_rgb(c[..., 0], c[..., 1], c[..., 2]))  # pylint: disable=protected-access
  np.testing.assert_array_equal(
    to_rgb(colours.astype(np.int32)), np.asarray(Image.fromarray(colours, "HSV").convert("RGB"))
  )


def test_blend_rounds_the_product_then_the_sum_as_pil():
  x, degenerate = np.meshgrid(np.arange(256, dtype=np.float32), np.arange(256, dtype=np.float32))
  factors = _RNG.uniform(0.6, 1.4, (20, 1, 1)).astype(np.float32)
  expected = np.floor(np.clip(degenerate + (factors * (x - degenerate)).astype(np.float32), 0, 255))
  ours = jax.jit(device_augment.blend)(degenerate, x, factors)
  np.testing.assert_array_equal(ours, expected)


def test_grayscale_flip_and_solarize_equal_pil():
  x = _CROPS.astype(np.float32)
  gray = np.asarray(jax.jit(device_augment.grayscale)(x))[..., 0]
  np.testing.assert_array_equal(gray, np.stack([np.asarray(Image.fromarray(c).convert("L")) for c in _CROPS]))
  np.testing.assert_array_equal(
    jax.jit(device_augment.solarize)(x),
    np.stack([np.asarray(ImageOps.solarize(Image.fromarray(c))) for c in _CROPS]),
  )
  off = np.zeros(6, bool)
  params = {
    "flip": np.array([True, False] * 3),
    "order": np.full((6, 4), 4),
    "factors": np.ones((6, 4)),
    "gray": off,
    "blur": off,
    "sigma": np.ones(6),
    "solarize": off,
  }
  flipped = np.asarray(jax.jit(device_augment.apply_photometric)(x, params))
  np.testing.assert_array_equal(
    flipped[::2], np.stack([np.asarray(ImageOps.mirror(Image.fromarray(c))) for c in _CROPS[::2]])
  )
  np.testing.assert_array_equal(flipped[1::2], x[1::2])


# ----------------------------------------------------------------------------------------------------
# Blur.


def test_gaussian_blur_equals_pil_on_natural_and_demo_images():
  images = test_augment.blur_test_images(len(test_augment.BLUR_SIGMAS))
  ours = jax.jit(jax.vmap(device_augment.gaussian_blur))(images.astype(np.float32), test_augment.BLUR_SIGMAS)
  np.testing.assert_array_equal(np.asarray(ours), test_augment.pil_blur(images, test_augment.BLUR_SIGMAS))


def test_box_blur_weights_equal_pils_for_many_sigmas():
  sigma = np.concatenate([np.linspace(0.01, 2.0, 50_000), _RNG.uniform(0.01, 2.0, 50_000)]).astype(np.float32)
  radius = test_augment.pil_box_radius(sigma)
  whole = radius.astype(np.int64)
  ww = (np.float32(2**24) / (radius * np.float32(2) + np.float32(1))).astype(np.int64)
  fw = (2**24 - (2 * whole + 1) * ww) // 2
  ours = jax.jit(jax.vmap(device_augment.box_blur_weights))(sigma)
  for got, expected in zip(ours, (whole, ww, fw), strict=True):
    np.testing.assert_array_equal(np.asarray(got).astype(np.int64), expected)


# ----------------------------------------------------------------------------------------------------
# Whole chain, with the host's sampled parameters injected into both pipelines.


def _host_params(seed, num, blur_prob, solarize_prob):
  params = augment.sample_photometric(tf.constant(seed), blur_prob, solarize_prob)
  return {k: v.numpy() for k, v in params.items()}


def test_whole_chain_equals_the_host_given_the_same_boxes_and_parameters():
  num, size = 12, 24
  boxes = _boxes(num, (0.1, 1.0), seed=5)
  params = _host_params([5, 6], num, [0.5] * num, [0.3] * num)

  @jax.jit
  def chain(canvas, boxes, params):
    return device_augment.apply_photometric(device_augment.resized_crops(canvas, boxes, size), params)

  ours = chain(_in_canvas(_IMAGE), boxes, params)
  image = tf.constant(_IMAGE, tf.float32)
  crops = tf.stack([augment.resized_crop(image, tf.constant(b), size) for b in boxes])
  host = augment.apply_photometric(crops, {k: tf.constant(v) for k, v in params.items()}).numpy()
  diff = np.abs(np.asarray(ours) - host)
  # Measured here: mean 1.4e-4, 9.6e-5 of the values differ, by at most 2 (6 at full size: a level of the
  # resize that jitter and blur amplify).
  assert diff.mean() < 5e-4 and np.mean(diff != 0) < 3e-4 and diff.max() <= 6
  # The differences all come from the resize: the photometric chain alone, on the same crops, is exact.
  ours = jax.jit(device_augment.apply_photometric)(crops.numpy(), params)
  np.testing.assert_array_equal(np.asarray(ours), host)


# ----------------------------------------------------------------------------------------------------
# Sampling.


_sample_boxes = jax.jit(device_augment.sample_crop_boxes, static_argnums=(3, 4))


def test_crop_boxes_follow_random_resized_crop_statistics():
  height, width, scale = 375, 500, (0.05, 0.4)
  boxes = np.asarray(_sample_boxes(jax.random.key(3), height, width, 4000, scale))
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
  area = h * w / (height * width)
  slack = (h + w + 1) / (height * width)  # Rounding h and w moves the area by at most this.
  assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
  ratio = w / h
  assert (ratio >= 3 / 4 * (1 - 2 / h.min())).all() and (ratio <= 4 / 3 * (1 + 2 / h.min())).all()
  assert abs(area.mean() - 0.225) < 0.01
  np.testing.assert_allclose(np.quantile(area, [0.25, 0.75]), [0.1375, 0.3125], atol=0.015)
  assert abs(np.log(ratio).mean()) < 0.01
  assert abs((top + h / 2).mean() - height / 2) < 5 and abs((left + w / 2).mean() - width / 2) < 5
  # The same box distribution as the host's: a two-sample comparison of the area quantiles.
  host = augment.sample_crop_box(tf.constant([3, 4]), height, width, 4000, scale).numpy()
  host_area = host[:, 2] * host[:, 3] / (height * width)
  np.testing.assert_allclose(
    np.quantile(area, [0.1, 0.5, 0.9]), np.quantile(host_area, [0.1, 0.5, 0.9]), atol=0.015
  )


@pytest.mark.parametrize("side", [2.5, 3.5, 4.5, 5.5])
def test_crop_sides_round_half_to_even(side):
  # As test_augment's: every try has w = h = side exactly; torchvision's round is half to even.
  area = side**2 / 256
  boxes = np.asarray(device_augment.sample_crop_boxes(jax.random.key(1), 16, 16, 8, (area, area), (1.0, 1.0)))
  np.testing.assert_array_equal(boxes[:, 2:], round(side))


def test_crop_box_falls_back_to_a_centred_crop_of_clamped_ratio():
  boxes = _sample_boxes(jax.random.key(0), 10, 400, 50, (0.9, 1.0))
  np.testing.assert_array_equal(boxes, np.tile([0, (400 - 13) // 2, 10, 13], (50, 1)))
  boxes = _sample_boxes(jax.random.key(0), 400, 10, 50, (0.9, 1.0))
  np.testing.assert_array_equal(boxes, np.tile([(400 - 13) // 2, 0, 13, 10], (50, 1)))


def _choices_as_pixels(x, params):
  """Stands in for apply_photometric: each crop's sampled choices as its first row of pixels, scaled so
  that normalisation keeps them exact: flip, gray, blur, solarize, jitter applied, sigma, 4 factors, and
  the jitter order."""
  del x
  chosen = [params[k] for k in ("flip", "gray", "blur", "solarize")] + [params["order"][:, 0] != 4]
  values = jnp.concatenate(
    [jnp.stack(chosen, 1), params["sigma"][:, None], params["factors"] + 1, params["order"]], axis=1
  )
  return jnp.broadcast_to(values.astype(jnp.float32)[:, None, :, None] * 64, (*values.shape[:1], 1, 14, 3))


def test_multicrop_samples_dinos_probabilities_ranges_and_orders(monkeypatch):
  # multicrop's own sampling (per-position keys, the crop probabilities it passes, config.color_jitter and
  # config.blur_sigma): only the application of the choices is replaced by a probe that returns them.
  monkeypatch.setattr(device_augment, "apply_photometric", _choices_as_pixels)
  config = _config(global_crop_size=4, local_crop_size=4, num_local_crops=6)
  canvas = np.broadcast_to(test_augment.natural_images(1, 8, 8)[0], (1000, 8, 8, 3))
  sizes = np.full((1000, 2), 8, np.int32)
  out = jax.jit(lambda c, s, p: device_augment.multicrop(c, s, p, config, jnp.float32))(
    canvas, sizes, np.arange(1000, dtype=np.int32)
  )
  probe = {k: np.round(_unnormalize(v)[..., 0, :, 0] / 64, 4) for k, v in out.items()}
  views = [probe["globals"][:, 0], probe["globals"][:, 1], probe["locals"].reshape(-1, 14)]
  for crop, chosen in enumerate(views):
    names = ("flip", "gray", "blur", "solarize", "jitter")
    test_multicrop.assert_rates_are_official({n: chosen[:, k] == 1 for k, n in enumerate(names)}, crop)
  p = np.concatenate(views)
  sigma, factors, order = p[:, 5], p[:, 6:10] - 1, p[:, 10:].astype(int)
  assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.02
  # ColorJitter(0.4, 0.4, 0.2, 0.1): factors uniform in these ranges.
  for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
    assert factors[:, k].min() >= lo - 1e-4 and factors[:, k].max() <= hi + 1e-4
    assert factors[:, k].min() < lo + 0.01 and factors[:, k].max() > hi - 0.01
    assert abs(factors[:, k].mean() - (lo + hi) / 2) < 0.02 * (hi - lo)
  applied = (order != 4).all(axis=1)
  assert ((order == 4).all(axis=1) | applied).all()
  # Each of the 24 orders about equally often (expected 267 each; 4 standard deviations).
  counts = [np.sum((order[applied] == perm).all(axis=1)) for perm in itertools.permutations(range(4))]
  assert sum(counts) == applied.sum()
  assert max(abs(c - applied.sum() / 24) for c in counts) < 4 * math.sqrt(267)


# ----------------------------------------------------------------------------------------------------
# multicrop: the recipe, its randomness, sharding.


def _batch():
  """8 canvases of 64 px: natural images of 50 x 60, one of 64 x 40 (taller than wide)."""
  images = test_augment.natural_images(8, 50, 60, seed=9)
  canvas = np.stack([_in_canvas(i, 64) for i in images])
  canvas[1, :64, :40] = test_augment.natural_images(1, 64, 40, seed=10)[0]
  sizes = np.tile(np.array([50, 60], np.int32), (8, 1))
  sizes[1] = [64, 40]
  return canvas, sizes


_TRACES = []


def _unnormalize(x):
  return np.asarray(x, np.float32) * constants.IMAGENET_STD * 255 + constants.IMAGENET_MEAN * 255


@jax.jit
def _multicrop(canvas, sizes, positions):
  _TRACES.append(1)
  return device_augment.multicrop(canvas, sizes, positions, _config(), jnp.float32)


def test_multicrop_shapes_dtype_and_pixels():
  canvas, sizes = _batch()
  positions = np.arange(8, dtype=np.int32)
  shapes = jax.eval_shape(
    lambda c, s, p: device_augment.multicrop(c, s, p, _config(), jnp.bfloat16), canvas, sizes, positions
  )
  assert shapes["globals"].shape == (8, 2, 32, 32, 3) and shapes["locals"].shape == (8, 4, 16, 16, 3)
  assert shapes["globals"].dtype == jnp.bfloat16 and shapes["locals"].dtype == jnp.bfloat16
  no_locals = jax.eval_shape(
    lambda c, s, p: device_augment.multicrop(c, s, p, _config(num_local_crops=0), jnp.float32),
    canvas,
    sizes,
    positions,
  )
  assert set(no_locals) == {"globals"}
  out = _multicrop(canvas, sizes, positions)
  pixels = _unnormalize(out["globals"])
  np.testing.assert_allclose(pixels, np.round(pixels), atol=2e-3)  # Whole numbers before normalisation.
  assert pixels.min() > -0.01 and pixels.max() < 255.01
  # Each image's crops come from its own (h, w) area alone: the same images in larger canvases padded
  # with noise instead of zeros give the same crops.
  noisy = _RNG.integers(0, 256, (8, 80, 80, 3), dtype=np.uint8)
  for i, (h, w) in enumerate(sizes):
    noisy[i, :h, :w] = canvas[i, :h, :w]
  padded = _multicrop(noisy, sizes, positions)
  for k in out:
    np.testing.assert_array_equal(np.asarray(padded[k]), np.asarray(out[k]))


def test_multicrop_depends_on_the_position_only():
  canvas, sizes = _batch()
  positions = np.arange(100, 108, dtype=np.int32)
  out = _multicrop(canvas, sizes, positions)
  # The same examples in another batch order, next to other examples: the same crops.
  perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
  shuffled = _multicrop(canvas[perm], sizes[perm], positions[perm])
  for k in out:
    np.testing.assert_array_equal(np.asarray(shuffled[k]), np.asarray(out[k])[perm])
  # Another position of the same image: other crops.
  moved = _multicrop(canvas, sizes, positions + 8)
  assert all(not np.array_equal(moved["globals"][i], out["globals"][i]) for i in range(8))


def test_multicrop_sharded_over_8_devices_equals_one_device_without_retracing():
  canvas, sizes = _batch()
  positions = np.arange(8, dtype=np.int32)
  single = _multicrop(canvas, sizes, positions)
  shard = NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)), PartitionSpec("data"))
  placed = [jax.device_put(a, shard) for a in (canvas, sizes, positions)]
  sharded = _multicrop(*placed)
  for k in single:
    np.testing.assert_array_equal(np.asarray(sharded[k]), np.asarray(single[k]))
  traces = len(_TRACES)
  _multicrop(placed[0], placed[1], jax.device_put(positions + 8, shard))
  assert len(_TRACES) == traces  # New positions reuse the program.


def test_augmentation_flops_per_image_are_under_3_percent_of_a_swin_t_step():
  config = _config(global_crop_size=224, local_crop_size=96, num_local_crops=8)
  args = (
    jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.uint8),
    jax.ShapeDtypeStruct((1, 2), jnp.int32),
    jax.ShapeDtypeStruct((1,), jnp.int32),
  )
  lowered = jax.jit(lambda c, s, p: device_augment.multicrop(c, s, p, config, jnp.bfloat16)).lower(*args)
  flops = lowered.cost_analysis()["flops"]
  # The resize matmuls: per crop 2 S^2 G 3 (width pass) + 2 G S G 3 (height pass).
  matmuls = sum(n * 6 * (512 * 512 * g + g * 512 * g) for n, g in [(2, 224), (8, 96)])
  assert matmuls <= flops < 1.2 * matmuls
  assert flops < 0.03 * 158.7e9
