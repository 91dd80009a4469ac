"""RandAugment on the device against PIL's ops with timm 0.4.12's level arguments (written here from
timm's auto_augment.py), its sampling statistics and its policy strings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest

from esvit_jax import errors
from esvit_jax.data import randaugment
from esvit_jax.data.randaugment import Policy
from tests import test_augment

_H, _W = 32, 40  # Non-square, so that a swapped axis shows.
_FILL = (124, 116, 104)
_MAGNITUDES = (0.0, 5.0, 9.0, 10.0)
_RNG = np.random.default_rng(0)


def _narrow_image():
  """Narrow histograms whose autocontrast PIL computes one level under the exact ratio at some levels
  (channel ranges [0, 25], [60, 110], [60, 125])."""
  image = np.stack(
    [_RNG.integers(lo, hi + 1, (_H, _W)) for lo, hi in ((0, 25), (60, 110), (60, 125))], axis=-1
  ).astype(np.uint8)
  image[0, 0], image[0, 1] = (0, 60, 60), (25, 110, 125)
  return image


_IMAGES = np.concatenate(
  [
    test_augment.natural_images(2, _H, _W, seed=5),
    _RNG.integers(0, 256, (1, _H, _W, 3), dtype=np.uint8),
    np.full((1, _H, _W, 3), 77, np.uint8),
    _narrow_image()[None],
  ]
)


def _spotted_image():
  """One level but for 10 darker pixels: Equalize's step (pixels off the top level // 255) is 0, an
  identity."""
  image = np.full((_H, _W, 3), 200, np.uint8)
  image[_RNG.integers(0, _H, 10), _RNG.integers(0, _W, 10)] = _RNG.integers(0, 200, (10, 3))
  return image


_IMAGES = np.concatenate([_IMAGES, _spotted_image()[None]])
_ENHANCE = {
  "Color": ImageEnhance.Color,
  "Contrast": ImageEnhance.Contrast,
  "Brightness": ImageEnhance.Brightness,
  "Sharpness": ImageEnhance.Sharpness,
}


def _posterize(img, bits):
  # Pillow 13 refuses 0 bits; the Pillow of timm 0.4.12 masks with ~255, giving 0.
  return ImageOps.posterize(img, bits) if bits else Image.new("RGB", img.size, 0)


def _pil(name, image, magnitude, negate):
  """timm 0.4.12's AugmentOp with its level function at a fixed magnitude and sign, on PIL, with MAE's
  hparams (bicubic, the ImageNet mean as fill colour)."""
  img = Image.fromarray(image)
  level = magnitude / 10.0
  sign = -1.0 if negate else 1.0
  affine = dict(resample=Image.BICUBIC, fillcolor=_FILL)
  base = name.removesuffix("Increasing")
  ops = {
    "AutoContrast": lambda: ImageOps.autocontrast(img),
    "Equalize": lambda: ImageOps.equalize(img),
    "Invert": lambda: ImageOps.invert(img),
    "Rotate": lambda: img.rotate(sign * level * 30.0, **affine),
    "Posterize": lambda: _posterize(img, int(level * 4)),
    "PosterizeIncreasing": lambda: _posterize(img, 4 - int(level * 4)),
    "Solarize": lambda: ImageOps.solarize(img, int(level * 256)),
    "SolarizeIncreasing": lambda: ImageOps.solarize(img, 256 - int(level * 256)),
    "SolarizeAdd": lambda: img.point(
      [min(255, i + int(level * 110)) if i < 128 else i for i in range(256)] * 3
    ),
    "ShearX": lambda: img.transform(img.size, Image.AFFINE, (1, sign * level * 0.3, 0, 0, 1, 0), **affine),
    "ShearY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, sign * level * 0.3, 1, 0), **affine),
    "TranslateXRel": lambda: img.transform(
      img.size, Image.AFFINE, (1, 0, sign * level * 0.45 * img.size[0], 0, 1, 0), **affine
    ),
    "TranslateYRel": lambda: img.transform(
      img.size, Image.AFFINE, (1, 0, 0, 0, 1, sign * level * 0.45 * img.size[1]), **affine
    ),
  }
  if base in _ENHANCE:
    factor = 1.0 + sign * level * 0.9 if name.endswith("Increasing") else level * 1.8 + 0.1
    return np.asarray(_ENHANCE[base](img).enhance(factor))
  return np.asarray(ops[name]())


@jax.jit
def _apply_all(images, sampled):
  """apply_ops of every (image, op, magnitude, sign) combination, for both op lists in one program."""
  run = jax.vmap(randaugment.apply_ops, (0, 0, None, None))
  return tuple(run(images, sampled, Policy(increasing=inc), _FILL) for inc in (True, False))


def _combinations(op):
  """Every image x magnitude x sign with the op forced on, as apply_ops's one-layer sampled dicts."""
  grid = [(i, m, s) for i in range(len(_IMAGES)) for m in _MAGNITUDES for s in (False, True)]
  index, magnitude, negate = (np.array(v) for v in zip(*grid, strict=True))
  sampled = {
    "op": np.full((len(grid), 1), op, np.int32),
    "magnitude": magnitude[:, None].astype(np.float32),
    "apply": np.ones((len(grid), 1), bool),
    "negate": negate[:, None],
  }
  return grid, _IMAGES[index], sampled


# Largest difference from PIL measured per op on these images: 0 for every lookup-table and blend op;
# the warps compute in float32 what PIL computes in double, and truncate: a value within float32's error
# of a level can land one level apart (a few pixels in a thousand at most).
_WARPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("op", range(len(randaugment.OPS)), ids=randaugment.OPS)
def test_every_op_equals_pil_at_fixed_magnitudes(op):
  grid, images, sampled = _combinations(op)
  outputs = _apply_all(jnp.asarray(images), jax.tree.map(jnp.asarray, sampled))
  for names, got in zip((randaugment.INCREASING_OPS, randaugment.OPS), outputs, strict=True):
    name = names[op]
    got = np.asarray(got)
    want = np.stack([_pil(name, _IMAGES[i], m, s) for i, m, s in grid])
    diff = np.abs(got.astype(int) - want)
    if name in _WARPS:
      assert diff.max() <= 1, name
      assert np.mean(diff > 0) < 0.002, (name, np.mean(diff > 0))
    else:
      assert diff.max() == 0, (name, np.argwhere(diff)[:5])


def test_the_warp_fill_is_timms_imagenet_mean_in_8_bits():
  assert randaugment.IMAGENET_FILL == _FILL  # min(255, round(255 * mean)) of (0.485, 0.456, 0.406).


def test_the_two_op_lists_are_timms():
  assert randaugment.op_names(Policy(increasing=True)) == (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
  )
  assert randaugment.op_names(Policy()) == tuple(
    n.removesuffix("Increasing") for n in randaugment.op_names(Policy(increasing=True))
  )


def test_sampler_draws_uniform_ops_coins_and_clipped_normal_magnitudes():
  n = 20_000
  policy = randaugment.parse_policy("rand-m9-mstd0.5-inc1")
  keys = jax.random.split(jax.random.key(0), n)
  sampled = jax.tree.map(np.asarray, jax.jit(jax.vmap(lambda k: randaugment.sample_ops(k, policy)))(keys))
  draws = n * policy.num_ops
  assert all(v.shape == (n, policy.num_ops) for v in sampled.values())

  def within(fraction, p):  # Five standard errors of a binomial fraction.
    return abs(fraction - p) < 5 * math.sqrt(p * (1 - p) / draws)

  counts = np.bincount(sampled["op"].ravel(), minlength=15)
  assert len(counts) == 15 and all(within(c / draws, 1 / 15) for c in counts), counts
  assert within(sampled["apply"].mean(), 0.5) and within(sampled["negate"].mean(), 0.5)
  magnitude = sampled["magnitude"].ravel()
  assert magnitude.min() >= 0.0 and magnitude.max() == 10.0
  normal_cdf = lambda t: 0.5 * (1 + math.erf((t - 9.0) / (0.5 * math.sqrt(2))))  # noqa: E731
  assert within(np.mean(magnitude == 10.0), 1 - normal_cdf(10.0))  # About 2.3% clipped.
  for t in (8.0, 8.5, 9.0, 9.5, 9.9):
    assert within(np.mean(magnitude <= t), normal_cdf(t)), t
  # With replacement: an image's two layers run the same op at rate 1 / 15.
  same = np.mean(sampled["op"][:, 0] == sampled["op"][:, 1])
  assert abs(same - 1 / 15) < 5 * math.sqrt(1 / 15 * 14 / 15 / n), same


def test_sampler_without_std_keeps_the_magnitude_clipped_to_ten():
  for text, want in (("rand-m9", 9.0), ("rand-m15-n3", 10.0)):
    sampled = randaugment.sample_ops(jax.random.key(1), randaugment.parse_policy(text))
    np.testing.assert_array_equal(sampled["magnitude"], want)


@pytest.mark.parametrize(
  "text, want",
  [
    ("rand-m9-mstd0.5-inc1", Policy(num_ops=2, magnitude=9.0, magnitude_std=0.5, increasing=True)),
    ("rand-m10-mstd0.5-inc1", Policy(num_ops=2, magnitude=10.0, magnitude_std=0.5, increasing=True)),
    ("rand-n3-m7", Policy(num_ops=3, magnitude=7.0)),
    ("rand", Policy()),
    ("", None),
  ],
)
def test_parse_policy_reads_timms_strings(text, want):
  assert randaugment.parse_policy(text) == want


@pytest.mark.parametrize("text", ["rand-m9-inc0", "randaug-m9", "rand-m9.5", "rand-x3", "rand-w0", "rand-m"])
def test_parse_policy_refuses_other_strings_naming_the_form(text):
  with pytest.raises(errors.UserError, match=r"rand-m<magnitude>\[-n<ops>\]\[-mstd<std>\]\[-inc1\]"):
    randaugment.parse_policy(text)


def test_rand_augment_of_a_batch_is_per_image_seeded_and_keeps_the_dtype():
  policy = Policy(num_ops=2, magnitude=9.0, magnitude_std=0.5, increasing=True)
  images = jnp.asarray(np.repeat(_IMAGES[:1], 6, axis=0))  # One image six times: differences are random.
  run = jax.jit(randaugment.rand_augment, static_argnums=2)
  key = jax.random.key(3)
  out = np.asarray(run(key, images, policy))
  assert out.dtype == np.uint8 and out.shape == images.shape
  np.testing.assert_array_equal(out, run(key, images, policy))
  assert len({o.tobytes() for o in out}) > 3
  as_float = run(key, images.astype(jnp.float32), policy)
  assert as_float.dtype == jnp.float32
  np.testing.assert_array_equal(as_float, out)
  # An image's result depends on its own key alone, not on its place in the batch.
  keys = jax.random.split(key, 6)
  np.testing.assert_array_equal(run(keys, images, policy), out)
  np.testing.assert_array_equal(run(keys[::-1], images[::-1], policy), out[::-1])
