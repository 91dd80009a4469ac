"""DINO's multi-crop and MAE's single crop on the accelerator, inside the jitted train step.

The host only decodes: each example arrives as a uint8 canvas [S, S, 3] holding the image in its top-left
[:h, :w] corner. Here, per example, come the crop boxes (torchvision RandomResizedCrop), the resized crops
(PIL's antialiased bicubic or bilinear as two matmuls per crop), flip, colour jitter in random order,
grayscale, PIL's Gaussian blur, solarization and the ImageNet normalisation. The ops reproduce what PIL
does to an 8-bit image, as the host ops of data/augment.py do (the reference they are tested against):
pixels travel as float32 holding whole numbers in [0, 255] and each op rounds as PIL's C code does.

Randomness comes from a key of (config.seed, the example's position in the global input stream), and
everything is vmapped over the batch: an example's crops do not depend on the batch it is in, on the
number of devices or hosts, or on a resume.

dm-pix provides the flip. Its other colour ops follow tf.image (additive brightness, per-channel contrast
mean, float HSV, Rec.601 float grayscale, sampled Gaussian blur, solarize on [0, 1]), not PIL's 8-bit
arithmetic, so those are written here.
"""

from collections.abc import Mapping, Sequence
import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esvit_jax import errors
from esvit_jax.data import constants
from esvit_jax.data.normalize import normalize_images

DEFAULT_RATIO = (3 / 4, 4 / 3)
_IDENTITY = 4  # Index of "no colour op" in the jitter's per-slot choice (as augment.py).
_WEIGHT_BITS = 22  # PIL stores 8-bit resampling weights in fixed point with 22 fractional bits.
_HIGHEST = jax.lax.Precision.HIGHEST  # Whole-number pixels need float32 matmuls (no bf16 / TF32 passes).


def _round8(x: jax.Array) -> jax.Array:
  """To the nearest 8-bit level, clipped, as PIL stores a resampling result."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0) + 0.5)


def divide(x: jax.Array, y: float) -> jax.Array:
  """x / y as one IEEE division: XLA would multiply by the reciprocal of a scalar, which rounds
  differently; an array divisor (y + 0 x) keeps the division.

  Args:
    x: the dividend.
    y: the divisor.

  Returns:
    x / y, correctly rounded as PIL's C code divides.
  """
  return x / (y + 0.0 * x)


# ----------------------------------------------------------------------------------------------------
# Sampling.


def sample_crop_boxes(
  key: jax.Array,
  height: jax.Array,
  width: jax.Array,
  num: int,
  scale: Sequence[float],
  ratio: Sequence[float] = DEFAULT_RATIO,
  tries: int = 10,
) -> jax.Array:
  """torchvision RandomResizedCrop.get_params for num crops: int32 [num, 4] rows (top, left, h, w).

  Each try draws an area fraction uniform in scale and a log-uniform aspect ratio; the first try whose
  box fits is kept, at a uniform position. If none fits, the whole image is cropped to the nearest allowed
  ratio, centred. Rounding is half to even (Python's round), as in torchvision.

  Args:
    key: a PRNG key.
    height: int32 scalar, the image's height.
    width: int32 scalar, the image's width.
    num: how many boxes.
    scale: the range of the area fraction.
    ratio: the range of the aspect ratio w / h.
    tries: torchvision's 10 attempts before the fallback.

  Returns:
    int32 [num, 4] boxes (top, left, h, w) inside the image.
  """
  # One draw for every decision: each random-bits call is a threefry program that XLA compiles slowly.
  u = jax.random.uniform(key, (num, 2 * tries + 2))
  height = jnp.asarray(height, jnp.float32)
  width = jnp.asarray(width, jnp.float32)
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :tries])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[:, tries : 2 * tries])
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits, axis=1)
  w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
  h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]
  pos = u[:, 2 * tries :]
  top = jnp.minimum(jnp.floor(pos[:, 0] * (height - h + 1)), height - h)
  left = jnp.minimum(jnp.floor(pos[:, 1] * (width - w + 1)), width - w)

  in_ratio = width / height
  fb_w = jnp.where(in_ratio > ratio[1], jnp.round(height * ratio[1]), width)
  fb_h = jnp.where(in_ratio < ratio[0], jnp.round(width / ratio[0]), height)
  found = fits.any(axis=1)
  box = jnp.stack(
    [
      jnp.where(found, top, jnp.floor((height - fb_h) / 2)),
      jnp.where(found, left, jnp.floor((width - fb_w) / 2)),
      jnp.where(found, h, fb_h),
      jnp.where(found, w, fb_w),
    ],
    axis=1,
  )
  return box.astype(jnp.int32)


def _bernoulli(u: jax.Array, prob: Sequence[float] | float) -> jax.Array:
  """One coin per crop from its uniform u [n]; torchvision applies an op when random() < p."""
  return u < jnp.asarray(prob, jnp.float32)


def _jitter(
  u: jax.Array, prob: float, brightness: float, contrast: float, saturation: float, hue: float
) -> dict[str, jax.Array]:
  """sample_jitter from uniforms u [n, 9]."""
  lo = jnp.array([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
  hi = jnp.array([1 + brightness, 1 + contrast, 1 + saturation, hue])
  order = jnp.argsort(u[:, 5:9], axis=1)
  order = jnp.where(_bernoulli(u[:, 0], prob)[:, None], order, _IDENTITY).astype(jnp.int32)
  return {"factors": lo + (hi - lo) * u[:, 1:5], "order": order}


def sample_jitter(
  key: jax.Array,
  num: int,
  prob: float = constants.JITTER_PROB,
  brightness: float = 0.4,
  contrast: float = 0.4,
  saturation: float = 0.2,
  hue: float = 0.1,
) -> dict[str, jax.Array]:
  """torchvision RandomApply(ColorJitter) parameters for num crops (as augment.sample_jitter).

  Args:
    key: a PRNG key.
    num: how many crops.
    prob: probability of applying the jitter to a crop.
    brightness: strength s of the brightness factor.
    contrast: strength s of the contrast factor.
    saturation: strength s of the saturation factor.
    hue: strength h of the hue shift.

  Returns:
    'factors' float32 [num, 4] (brightness, contrast, saturation in [max(0, 1 - s), 1 + s], hue in
    [-h, h]) and 'order' int32 [num, 4]: the op run in each slot, a uniform random permutation, or all
    _IDENTITY where the jitter is not applied (probability 1 - prob).
  """
  return _jitter(jax.random.uniform(key, (num, 9)), prob, brightness, contrast, saturation, hue)


def sample_photometric(
  key: jax.Array,
  blur_prob: Sequence[float],
  solarize_prob: Sequence[float],
  flip_prob: float = constants.FLIP_PROB,
  jitter_prob: float = constants.JITTER_PROB,
  gray_prob: float = constants.GRAY_PROB,
  sigma: Sequence[float] = constants.BLUR_SIGMA,
  jitter: Mapping[str, float] = constants.JITTER_STRENGTH,
) -> dict[str, jax.Array]:
  """Every random choice of flip -> jitter -> grayscale -> blur -> solarize for len(blur_prob) crops.

  Args:
    key: a PRNG key.
    blur_prob: per-crop blur probability; its length is the number of crops n.
    solarize_prob: per-crop solarization probability [n].
    flip_prob: horizontal flip probability.
    jitter_prob: colour jitter probability.
    gray_prob: grayscale probability.
    sigma: (min, max) of the blur's sigma.
    jitter: sample_jitter's strengths (brightness, contrast, saturation, hue).

  Returns:
    bool 'flip', 'gray', 'blur', 'solarize' [n], float32 'sigma' [n] and sample_jitter's 'factors' and
    'order': the fields of augment.sample_photometric, with the same meaning.
  """
  u = jax.random.uniform(key, (len(blur_prob), 14))
  return {
    "flip": _bernoulli(u[:, 0], flip_prob),
    **_jitter(u[:, 1:10], jitter_prob, **jitter),
    "gray": _bernoulli(u[:, 10], gray_prob),
    "blur": _bernoulli(u[:, 11], blur_prob),
    "sigma": sigma[0] + (sigma[1] - sigma[0]) * u[:, 12],
    "solarize": _bernoulli(u[:, 13], solarize_prob),
  }


# ----------------------------------------------------------------------------------------------------
# Resized crop: PIL's antialiased bicubic or bilinear as two matmuls.


def _bicubic(x: jax.Array) -> jax.Array:
  """PIL's bicubic kernel: Keys' cubic with a = -0.5, support 2."""
  a = -0.5
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _bicubic_weights(start: jax.Array, length: jax.Array, out_size: int, in_size: int) -> jax.Array:
  """resize_weights for BICUBIC, in float32: a weight can be a unit of the fixed point off PIL's where
  PIL's double lands within float32's error of a rounding boundary (rare for this kernel)."""
  length = jnp.asarray(length, jnp.float32)
  scale = length / out_size
  filter_scale = jnp.maximum(scale, 1.0)
  center = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pos = jnp.arange(in_size, dtype=jnp.float32) - jnp.asarray(start, jnp.float32)
  w = _bicubic((pos[None, :] + 0.5 - center[:, None]) / filter_scale)
  w = jnp.where((pos >= 0) & (pos < length), w, 0.0)
  w = w / jnp.sum(w, axis=1, keepdims=True)
  one = 2.0**_WEIGHT_BITS
  return jnp.sign(w) * jnp.floor(jnp.abs(w) * one + 0.5) / one


def _bilinear_weights(start: jax.Array, length: jax.Array, out_size: int, in_size: int) -> jax.Array:
  """resize_weights for BILINEAR, exact: its weights often sit a hair from a rounding boundary, where
  float32 would miss PIL's rounding, so they are computed in integers.

  PIL's triangle 1 - |x| at x = ((2j + 1) out - (2i + 1) length) / (2F), F = max(length, out), makes
  tap j of output i weigh N = max(2F - |(2j + 1) out - (2i + 1) length|, 0) over the row's sum D of N:
  2^22 N / D rounded half up (PIL's double gets this exactly: D is far below 2^23), here by binary long
  division in int32.
  """
  j = jnp.arange(in_size) - start
  i = jnp.arange(out_size)
  reach = 2 * jnp.maximum(length, out_size)
  num = jnp.maximum(reach - jnp.abs((2 * j[None, :] + 1) * out_size - (2 * i[:, None] + 1) * length), 0)
  num = jnp.where((j >= 0) & (j < length), num, 0)
  den = jnp.sum(num, axis=1, keepdims=True)

  def next_bit(_, qr):
    q, r = qr
    r = 2 * r
    bit = r >= den
    return 2 * q + bit, r - jnp.where(bit, den, 0)

  q, r = jax.lax.fori_loop(0, _WEIGHT_BITS, next_bit, (jnp.zeros_like(num), num))
  return (q + (2 * r >= den)).astype(jnp.float32) / 2.0**_WEIGHT_BITS


def resize_weights(
  start: jax.Array, length: jax.Array, out_size: int, in_size: int, bilinear: jax.Array | bool = False
) -> jax.Array:
  """PIL's resampling weights of one axis of a resized crop, float32 [out_size, in_size].

  Row i holds output pixel i's weights over the canvas: the bicubic (or bilinear) kernel centred at
  start + (i + 0.5) * length / out_size, widened by the scale when shrinking, cut at the crop's border
  [start, start + length) (PIL crops first, then resizes), normalised to sum 1 and rounded to PIL's
  22-bit fixed point.

  Args:
    start: int32 scalar, the crop's first pixel along this axis.
    length: int32 scalar, the crop's extent along this axis.
    out_size: the output length.
    in_size: the canvas length along this axis.
    bilinear: bool scalar, PIL's BILINEAR kernel instead of BICUBIC; an array is traced, so one program
      serves both.

  Returns:
    float32 [out_size, in_size], zero outside the crop.
  """
  bicubic = _bicubic_weights(start, length, out_size, in_size)
  if isinstance(bilinear, bool) and not bilinear:
    return bicubic  # DINO's crops: no bilinear weights in the program.
  return jnp.where(bilinear, _bilinear_weights(start, length, out_size, in_size), bicubic)


def _fixed_point_pass(subscripts: str, weights: jax.Array, x: jax.Array) -> jax.Array:
  """One resampling pass in PIL's integer arithmetic, exactly: sum(pixel * c) + 2^21 >> 22, clipped.

  Each 22-bit weight c splits into parts exact in bf16, c = 2^14 hi + 2^7 mid + lo (hi within +-256, mid
  and lo in [0, 128)); a bf16 matmul of each part with the 8-bit pixels, summed in float32, is exact (every
  product and partial sum is an integer below 2^24 while a window has fewer than 518 taps), and the three
  sums combine in int32. Three single passes: cheaper on TPUs than one float32 matmul at HIGHEST.
  """
  c = jnp.round(weights * 2.0**_WEIGHT_BITS).astype(jnp.int32)
  pixels = x.astype(jnp.bfloat16)
  hi, mid, lo = (
    jnp.einsum(subscripts, part.astype(jnp.bfloat16), pixels, preferred_element_type=jnp.float32).astype(
      jnp.int32
    )
    for part in (c >> 14, (c >> 7) & 127, c & 127)
  )
  total = (hi << 14) + (mid << 7) + lo
  return jnp.clip((total + (1 << (_WEIGHT_BITS - 1))) >> _WEIGHT_BITS, 0, 255).astype(jnp.float32)


def resized_crops(
  canvas: jax.Array, boxes: jax.Array, size: int, bilinear: jax.Array | bool = False
) -> jax.Array:
  """torchvision F.resized_crop (PIL, bicubic or bilinear) of each box of one canvas.

  Args:
    canvas: [S, S, 3] pixels (uint8 or whole-number floats).
    boxes: int32 [n, 4] rows (top, left, h, w).
    size: the output side.
    bilinear: PIL's BILINEAR instead of BICUBIC, per box (bool [n] or a scalar). The Python False (DINO's
      crops) keeps the bicubic program of float32 matmuls; any other value chooses the kernel per crop in
      one program whose passes are exact integer sums (_fixed_point_pass), as bilinear needs: its sums sit
      exactly on or a few fixed-point units from a rounding boundary often enough (a few values in a
      thousand) for float32 to round them the other way.

  Returns:
    Pixel floats [n, size, size, 3]: the width pass then the height pass, each rounded to 8 bits, as PIL
    up to 12.x (the official runs' PIL) and augment.resize. Pillow 13 runs the height pass first when the
    crop shrinks much more in height than in width, which moves values by about a level in those crops.
  """
  x = canvas.astype(jnp.float32)
  static = isinstance(bilinear, bool) and not bilinear
  weights = jax.vmap(resize_weights, (0, 0, None, None, None if static else 0))
  bilinear = bilinear if static else jnp.broadcast_to(bilinear, boxes.shape[:1])
  w_rows = weights(boxes[:, 0], boxes[:, 2], size, x.shape[0], bilinear)  # [n, size, S]
  w_cols = weights(boxes[:, 1], boxes[:, 3], size, x.shape[1], bilinear)
  if not static:
    tmp = _fixed_point_pass("nix,yxc->nyic", w_cols, x)
    return _fixed_point_pass("njy,nyic->njic", w_rows, tmp)
  tmp = _round8(jnp.einsum("nix,yxc->nyic", w_cols, x, precision=_HIGHEST))
  return _round8(jnp.einsum("njy,nyic->njic", w_rows, tmp, precision=_HIGHEST))


# ----------------------------------------------------------------------------------------------------
# Colour: torchvision ColorJitter and RandomGrayscale on PIL images, one crop [h, w, 3] at a time.


def grayscale(x: jax.Array) -> jax.Array:
  """PIL convert('L'): (19595 R + 38470 G + 7471 B + 2^15) >> 16; exact in float32 (sums < 2^24).
  Returns [..., 1].

  Args:
    x: pixel floats [..., 3].

  Returns:
    Pixel floats [..., 1].
  """
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  return jnp.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)[..., None]


def blend(degenerate: jax.Array, x: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL Image.blend(degenerate, x, factor): float blend, clipped, truncated to 8 bits.

  PIL rounds the product and then the sum; the select keeps XLA from fusing them into one multiply-add,
  whose single rounding truncates a few values in a million to the level below.

  Args:
    degenerate: pixel floats, the image at factor 0.
    x: pixel floats of the same shape, the image at factor 1.
    factor: the blend factor (any real; outside [0, 1] it extrapolates).

  Returns:
    Whole-number pixel floats in [0, 255].
  """
  diff = x - degenerate
  product = jnp.where(diff == 0.0, 0.0, factor * diff)
  return jnp.floor(jnp.clip(degenerate + product, 0.0, 255.0))


def gray_mean(x: jax.Array) -> jax.Array:
  """ImageEnhance.Contrast's degenerate level: the L image's mean, rounded half up (exact integers).

  Args:
    x: pixel floats [h, w, 3].

  Returns:
    The level, a float32 scalar.
  """
  total = jnp.sum(grayscale(x).astype(jnp.int32))
  count = x.shape[0] * x.shape[1]
  return ((2 * total + count) // (2 * count)).astype(jnp.float32)


def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Brightness: blend with black.

  Args:
    x: pixel floats [h, w, 3], one crop.
    factor: float32 scalar.

  Returns:
    Pixel floats [h, w, 3].
  """
  return blend(jnp.zeros_like(x), x, factor)


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Contrast: blend with the rounded mean of the grayscale crop.

  Args:
    x: pixel floats [h, w, 3], one crop.
    factor: float32 scalar.

  Returns:
    Pixel floats [h, w, 3].
  """
  return blend(gray_mean(x), x, factor)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance.Color: blend with the grayscale crop.

  Args:
    x: pixel floats [h, w, 3], one crop.
    factor: float32 scalar.

  Returns:
    Pixel floats [h, w, 3].
  """
  return blend(grayscale(x), x, factor)


def _hue_thresholds() -> np.ndarray:
  """float32 [256]: entry k is the least float32 h with 255 h >= k (exact in float64)."""
  k = np.arange(256, dtype=np.float64)
  h = (k / 255).astype(np.float32)
  return np.where(h.astype(np.float64) * 255 < k, np.nextafter(h, np.float32(2)), h)


_HUE_THRESHOLDS = _hue_thresholds()


def _rgb_to_hsv(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PIL convert('HSV') of whole-number pixels, equal to PIL's for every 8-bit colour.

  PIL computes hue = floor(255 frac(H / 6)) and saturation = floor(255 chroma / max) in float; both are
  rationals of small integers, so integer division gives them exactly, except where 255 frac(H / 6) is a
  whole number k: there PIL's float hue can fall just below k (0.3% of all colours, all with H >= 0).
  At those colours the hue is PIL's own float chain, each step rounded to float32 as its C code stores
  it. Checked against PIL for all 2^24 colours.
  """
  rgb = x.astype(jnp.int32)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = jnp.maximum(r, jnp.maximum(g, b))
  minc = jnp.minimum(r, jnp.minimum(g, b))
  chroma = maxc - minc
  safe = jnp.maximum(chroma, 1)
  # H * chroma: g - b (red is max), 2 chroma + b - r (green), 4 chroma + r - g (blue).
  red_max, green_max = r == maxc, (g == maxc) & (r != maxc)
  num = jnp.where(red_max, g - b, jnp.where(green_max, 2 * safe + b - r, 4 * safe + r - g))
  num = jnp.mod(num, 6 * safe)
  hue = (255 * num) // (6 * safe)
  # PIL's float chain: rc, gc, bc = (max - c) / chroma, H in float32 (one of the two ratios is the min
  # channel's, exactly 1, so each branch is one rounding as in PIL's double arithmetic), h = H / 6.
  # The divisor has the dividend's shape, so XLA keeps these true divisions (see _divide).
  rc, gc, bc = ((maxc - c).astype(jnp.float32) / safe.astype(jnp.float32) for c in (r, g, b))
  h_green = jnp.where(b == minc, 1.0 + rc, 3.0 - bc)
  h_blue = jnp.where(r == minc, 3.0 + gc, 5.0 - rc)
  h = divide(jnp.where(red_max, bc - gc, jnp.where(green_max, h_green, h_blue)), 6.0)
  whole = (chroma > 0) & ((255 * num) % (6 * safe) == 0) & (h >= 0.0)
  hue = jnp.where(whole & (h < jnp.asarray(_HUE_THRESHOLDS)[hue]), hue - 1, hue)
  hue = jnp.where(chroma == 0, 0, hue)
  sat = jnp.where(chroma == 0, 0, (255 * chroma) // jnp.maximum(maxc, 1))
  return hue, sat, maxc


def _hsv_to_rgb(hue: jax.Array, sat: jax.Array, val: jax.Array) -> jax.Array:
  """PIL convert('RGB') from 8-bit HSV (int32), equal to PIL's for every HSV triple.

  PIL picks v, p = round(v (1 - s)), q = round(v (1 - s f)) or t = round(v (1 - s (1 - f))) by the
  hue's sextant (f its fraction); all are v (255^2 - s W) / 255^2 with W = 255 (p), 255 f (q),
  255 (1 - f) (t) or 0 (v), W = clip(min(K, 4 * 255 - K), 0, 255), K = (255 n + 6 h) mod (6 * 255),
  n = 5, 3, 1 for R, G, B. Rounded half up in integers (the value is never a half).
  """
  channels = []
  for n in (5, 3, 1):
    k = jnp.mod(255 * n + 6 * hue, 6 * 255)
    weight = jnp.clip(jnp.minimum(k, 4 * 255 - k), 0, 255)
    channels.append((2 * val * (255 * 255 - sat * weight) + 255 * 255) // (2 * 255 * 255))
  return jnp.stack(channels, axis=-1).astype(jnp.float32)


def adjust_hue(x: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision F.adjust_hue on PIL: to 8-bit HSV, add int(factor * 255) to the hue modulo 256, back.

  Args:
    x: pixel floats [h, w, 3], one crop.
    factor: float32 scalar in [-0.5, 0.5].

  Returns:
    Pixel floats [h, w, 3].
  """
  hue, sat, val = _rgb_to_hsv(x)
  hue = jnp.mod(hue + jnp.trunc(factor * 255.0).astype(jnp.int32), 256)
  return _hsv_to_rgb(hue, sat, val)


def _jitter_slot(x: jax.Array, op: jax.Array, factors: jax.Array) -> jax.Array:
  """One slot of the random-order jitter: op 0-3 (brightness, contrast, saturation, hue) or identity.

  Brightness, contrast and saturation are one blend with different degenerate images, so a slot costs one
  blend and one hue shift whichever op it runs (a vmapped switch computes every branch)."""
  degenerate = jnp.where(op == 0, 0.0, jnp.where(op == 1, gray_mean(x), grayscale(x)))
  blended = blend(degenerate, x, factors[jnp.minimum(op, 2)])
  out = jnp.where(op == 3, adjust_hue(x, factors[3]), blended)
  return jnp.where(op == _IDENTITY, x, out)


# ----------------------------------------------------------------------------------------------------
# Blur (PIL's GaussianBlur: three extended box blurs per axis) and solarization.


def box_blur_weights(sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PIL's ImageFilter.GaussianBlur(sigma) as the box blur it runs three times per axis.

  Box radius l + a (Gwosdek et al. 2011: three passes of variance sigma^2 / 3 each), then in 24-bit fixed
  point: each of the 2r + 1 whole taps (r = int(l + a)) weighs ww = 2^24 / (2(l + a) + 1) and the two
  taps just outside weigh fw = (2^24 - (2r + 1) ww) / 2. Float32, as PIL's C code stores each step (its
  square root is in double, here float32: equal results for 10^5 sigmas in [0.01, 2], tested).

  Args:
    sigma: float32 scalar (or array: the results take its shape).

  Returns:
    int32 r, uint32 ww, uint32 fw.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  sigma2 = divide(sigma * sigma, 3.0)
  length = jnp.sqrt(12.0 * sigma2 + 1.0)
  whole = jnp.floor((length - 1.0) / 2.0)
  frac = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * sigma2)
  frac = frac / (6.0 * (sigma2 - (whole + 1.0) * (whole + 1.0)))
  radius = whole + frac
  r = radius.astype(jnp.int32)
  ww = (2.0**24 / (radius * 2.0 + 1.0)).astype(jnp.uint32)
  fw = (jnp.uint32(1 << 24) - (2 * r + 1).astype(jnp.uint32) * ww) // 2
  return r, ww, fw


def gaussian_blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
  """PIL's GaussianBlur(sigma) of one crop [h, w, c]: three box passes along the width, three along the
  height, each on 8-bit pixels with edge replication and rounded, in exact uint32 fixed point.

  A pass is a sum of 2 * BLUR_BOX_EXTENT + 1 shifted copies with per-crop integer weights (zero beyond
  the crop's own box), which XLA fuses into one loop.

  Args:
    x: pixel floats [h, w, c], one crop.
    sigma: float32 scalar.

  Returns:
    float32 pixel floats [h, w, c].
  """
  r, ww, fw = box_blur_weights(sigma)
  extent = constants.BLUR_BOX_EXTENT
  offsets = jnp.arange(-extent, extent + 1)
  taps = jnp.where(jnp.abs(offsets) <= r, ww, jnp.where(jnp.abs(offsets) == r + 1, fw, jnp.uint32(0)))

  def box_pass(axis, y):
    padded = jnp.pad(y, [(extent, extent) if a == axis else (0, 0) for a in range(y.ndim)], mode="edge")
    acc = sum(
      taps[t] * jax.lax.slice_in_dim(padded, t, t + y.shape[axis], axis=axis) for t in range(2 * extent + 1)
    )
    return (acc + jnp.uint32(1 << 23)) >> 24

  y = x.astype(jnp.uint32)
  for axis in (1, 0):
    y = jax.lax.fori_loop(0, 3, lambda _, y, axis=axis: box_pass(axis, y), y)
  return y.astype(jnp.float32)


def solarize(x: jax.Array) -> jax.Array:
  """PIL ImageOps.solarize (threshold 128): whole numbers >= 128 become 255 - x, i.e. min(x, 255 - x).
  (dm-pix's solarize inverts as 1 - x, for images in [0, 1].)

  Args:
    x: pixel floats, any shape.

  Returns:
    Pixel floats of the same shape.
  """
  return jnp.minimum(x, 255.0 - x)


# ----------------------------------------------------------------------------------------------------
# The photometric chain and the whole recipe.


def _photometric_one(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
  x = jnp.where(p["flip"], pix.flip_left_right(x), x)
  x = jax.lax.scan(lambda x, op: (_jitter_slot(x, op, p["factors"]), None), x, p["order"])[0]
  x = jnp.where(p["gray"], jnp.broadcast_to(grayscale(x), x.shape), x)
  x = jnp.where(p["blur"], gaussian_blur(x, p["sigma"]), x)
  return jnp.where(p["solarize"], solarize(x), x)


def apply_photometric(x: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
  """Runs sample_photometric's choices (flip, jitter in its order, grayscale, blur, solarize) on crops.

  Args:
    x: pixel floats [n, h, w, 3].
    params: sample_photometric's dict (or augment.sample_photometric's, as arrays), one entry per crop.

  Returns:
    Pixel floats [n, h, w, 3].
  """
  return jax.vmap(_photometric_one)(x, dict(params))


def dino_views(
  canvas: jax.Array,
  image_size: jax.Array,
  key: jax.Array,
  size: int,
  scale: Sequence[float],
  blur_prob: Sequence[float],
  solarize_prob: Sequence[float],
  jitter: Mapping[str, float] = constants.JITTER_STRENGTH,
  sigma: Sequence[float] = constants.BLUR_SIGMA,
) -> jax.Array:
  """augment.dino_views on the device: len(blur_prob) crops, pixel floats [n, size, size, 3].

  Args:
    canvas: uint8 [S, S, 3], the image in its top-left [:h, :w] corner.
    image_size: int32 [2], the image's (h, w).
    key: a PRNG key.
    size: side of the square crops.
    scale: RandomResizedCrop's (min, max) area fraction.
    blur_prob: per-crop blur probability; its length is the number of crops n.
    solarize_prob: per-crop solarization probability.
    jitter: colour jitter strengths (brightness, contrast, saturation, hue).
    sigma: (min, max) of the blur's sigma.

  Returns:
    float32 pixel floats [n, size, size, 3] (not yet normalised).
  """
  key_crop, key_photo = jax.random.split(key)
  boxes = sample_crop_boxes(key_crop, image_size[0], image_size[1], len(blur_prob), scale)
  params = sample_photometric(key_photo, blur_prob, solarize_prob, jitter=jitter, sigma=sigma)
  return apply_photometric(resized_crops(canvas, boxes, size), params)


def multicrop(
  canvas: jax.Array, image_size: jax.Array, positions: jax.Array, config: ml_collections.ConfigDict, dtype
) -> dict[str, jax.Array]:
  """DataAugmentationDINO on a batch of canvases, on the device.

  Args:
    canvas: uint8 [B, S, S, 3], each image in its top-left [:h, :w] corner.
    image_size: int32 [B, 2], each image's (h, w).
    positions: int32 [B], each example's position in the global input stream: its randomness is a key of
      (config.seed, position).
    config: global_crop_size, local_crop_size, num_local_crops, global_crop_scale, local_crop_scale,
      color_jitter, blur_sigma, seed (the fields of the host path).
    dtype: the output dtype.

  Returns:
    {'globals': [B, 2, G, G, 3], 'locals': [B, N, L, L, 3]}, ImageNet-normalised in dtype; no 'locals'
    when N = 0. Global crop 1 is always blurred, global crop 2 blurred with p 0.1 and solarised with
    p 0.2, local crops blurred with p 0.5.
  """
  n = config.num_local_crops
  jitter = dict(zip(constants.JITTER_STRENGTH, config.color_jitter, strict=True))
  sigma = tuple(config.blur_sigma)
  base = jax.random.key(config.seed)

  def one(canvas, image_size, position):
    key_global, key_local = jax.random.split(jax.random.fold_in(base, position))
    views = {
      "globals": dino_views(
        canvas,
        image_size,
        key_global,
        config.global_crop_size,
        config.global_crop_scale,
        constants.GLOBAL_BLUR_PROB,
        constants.GLOBAL_SOLARIZE_PROB,
        jitter,
        sigma,
      )
    }
    if n:
      views["locals"] = dino_views(
        canvas,
        image_size,
        key_local,
        config.local_crop_size,
        config.local_crop_scale,
        (constants.LOCAL_BLUR_PROB,) * n,
        (0.0,) * n,
        jitter,
        sigma,
      )
    return views

  views = jax.vmap(one)(canvas, image_size, positions)
  return {k: normalize_images(v, dtype) for k, v in views.items()}


# ----------------------------------------------------------------------------------------------------
# One random resized crop per image: MAE's pretraining crop and fine-tuning's.

# Probability of PIL's BILINEAR per interpolation name; the rest of the crops are BICUBIC. "random" is
# timm's per-image choice between the two (MAE-Lite), "bicubic" the original MAE's.
_BILINEAR_PROB = {"random": 0.5, "bicubic": 0.0, "bilinear": 1.0}
MAE_INTERPOLATIONS = tuple(_BILINEAR_PROB)  # The values config.interpolation accepts.


def random_resized_crops(
  canvas: jax.Array, image_size: jax.Array, positions: jax.Array, config: ml_collections.ConfigDict
) -> jax.Array:
  """timm's RandomResizedCropAndInterpolation and a horizontal flip on a batch of canvases, in pixels.

  Args:
    canvas: uint8 [B, S, S, 3], each image in its top-left [:h, :w] corner.
    image_size: int32 [B, 2], each image's (h, w).
    positions: int32 [B], each example's position in the global input stream: its randomness is a key of
      (config.seed, position).
    config: crop_size (the output side), crop_scale (RandomResizedCrop's (min, max) area fraction),
      interpolation ('random': bilinear or bicubic with p 0.5 each, per image; 'bicubic'; 'bilinear'),
      seed.

  Returns:
    float32 [B, crop_size, crop_size, 3] of whole numbers in [0, 255]; each crop flipped with p 0.5.

  Raises:
    errors.UserError: config.interpolation is none of the three.
  """
  if config.interpolation not in _BILINEAR_PROB:
    raise errors.UserError(
      f"config.interpolation is {config.interpolation!r}; use one of {', '.join(map(repr, _BILINEAR_PROB))}."
    )
  probs = (_BILINEAR_PROB[config.interpolation], constants.FLIP_PROB)
  base = jax.random.key(config.seed)

  def one(canvas, image_size, position):
    key_box, key_choice = jax.random.split(jax.random.fold_in(base, position))
    boxes = sample_crop_boxes(key_box, image_size[0], image_size[1], 1, config.crop_scale)
    bilinear, flip = _bernoulli(jax.random.uniform(key_choice, (2,)), probs)
    crop = resized_crops(canvas, boxes, config.crop_size, bilinear)[0]
    return jnp.where(flip, pix.flip_left_right(crop), crop)

  return jax.vmap(one)(canvas, image_size, positions)


def mae_crops(
  canvas: jax.Array, image_size: jax.Array, positions: jax.Array, config: ml_collections.ConfigDict, dtype
) -> jax.Array:
  """MAE's crops: random_resized_crops, ImageNet-normalised.

  Args:
    canvas: uint8 [B, S, S, 3], each image in its top-left [:h, :w] corner.
    image_size: int32 [B, 2], each image's (h, w).
    positions: int32 [B], each example's position in the global input stream.
    config: as random_resized_crops reads it.
    dtype: the output dtype.

  Returns:
    [B, crop_size, crop_size, 3] in dtype.
  """
  return normalize_images(random_resized_crops(canvas, image_size, positions, config), dtype)
