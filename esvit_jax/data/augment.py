"""DINO's multi-crop augmentations as TensorFlow ops.

The official code runs torchvision transforms on PIL images, so every op here reproduces what PIL does to
an 8-bit image, including its rounding: images travel between ops as float32 tensors that hold whole
numbers in [0, 255] ("pixel floats"), and each op rounds or truncates the way PIL's C code does before the
next op sees the result. The colour ops take a stack of crops [n, h, w, 3] and one parameter per crop.

Speed: the crops of one size go through flip, colour jitter, grayscale, blur and solarization in a single
XLA-compiled function (apply_photometric): TensorFlow's op-by-op CPU kernels spend most of their time
walking memory, XLA fuses each op's dozens of elementwise steps into one loop.

Randomness is stateless (tf.random.stateless_*): the same seed gives the same crops eagerly, inside
tf.data.Dataset.map with any parallelism, and after a restart.
"""

from collections.abc import Mapping, Sequence
import functools
import math

import tensorflow as tf

from esvit_jax.data import constants

DEFAULT_RATIO = (3 / 4, 4 / 3)
_IDENTITY = 4  # Index of "no colour op" in the jitter's per-slot choice.


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """Independent child seeds, one per random decision.

  Args:
    seed: int [2] stateless seed.
    num: number of child seeds.

  Returns:
    num int [2] seeds.
  """
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _bernoulli(seed: tf.Tensor, prob) -> tf.Tensor:
  """One coin per entry of prob ([n]); torchvision applies an op when random() < p."""
  prob = tf.convert_to_tensor(prob, tf.float32)
  return tf.random.stateless_uniform(tf.shape(prob), seed) < prob


def _per_crop(values: tf.Tensor) -> tf.Tensor:
  """Reshapes [n] per-crop values to broadcast against [n, h, w, c]."""
  return tf.reshape(values, [-1, 1, 1, 1])


def to_uint8(x: tf.Tensor) -> tf.Tensor:
  """Pixel floats (already whole numbers) to uint8.

  Args:
    x: float32 pixel floats, any shape.

  Returns:
    uint8 of the same shape, clipped to [0, 255].
  """
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


# ----------------------------------------------------------------------------------------------------
# Geometry: RandomResizedCrop, resize, flip.


def sample_crop_box(
  seed: tf.Tensor,
  height: tf.Tensor,
  width: tf.Tensor,
  num: int,
  scale: Sequence[float],
  ratio: Sequence[float] = DEFAULT_RATIO,
  tries: int = 10,
) -> tf.Tensor:
  """torchvision RandomResizedCrop.get_params for num crops: int32 [num, 4] rows (top, left, h, w).

  Each try draws an area fraction uniform in scale and a log-uniform aspect ratio; the first try whose
  box fits is kept, at a uniform position. If none of the tries fits, the whole image is cropped to the
  nearest allowed ratio, centred. Rounding is Python's round (half to even), as in torchvision.

  Args:
    seed: int [2] stateless seed.
    height: the image height (int scalar tensor).
    width: the image width (int scalar tensor).
    num: number of boxes.
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio w / h.
    tries: draws per box before the centred fallback (torchvision: 10).

  Returns:
    int32 [num, 4] boxes (top, left, h, w).
  """
  seed_try, seed_pos = split_seed(seed, 2)
  height = tf.cast(height, tf.float64)
  width = tf.cast(width, tf.float64)
  u = tf.random.stateless_uniform([num, tries, 2], seed_try, dtype=tf.float64)
  target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[..., 1])
  w = tf.round(tf.sqrt(target_area * aspect))
  h = tf.round(tf.sqrt(target_area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  w = tf.gather(w, first, batch_dims=1)
  h = tf.gather(h, first, batch_dims=1)
  pos = tf.random.stateless_uniform([num, 2], seed_pos, dtype=tf.float64)
  top = tf.floor(pos[:, 0] * (height - h + 1))
  left = tf.floor(pos[:, 1] * (width - w + 1))

  in_ratio = width / height
  fb_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  fb_top = tf.math.floordiv(height - fb_h, 2.0)
  fb_left = tf.math.floordiv(width - fb_w, 2.0)
  found = tf.reduce_any(fits, axis=1)
  box = tf.stack(
    [
      tf.where(found, top, fb_top),
      tf.where(found, left, fb_left),
      tf.where(found, h, fb_h),
      tf.where(found, w, fb_w),
    ],
    axis=1,
  )
  return tf.cast(box, tf.int32)


def _resize_axis(x: tf.Tensor, height, width, method: str) -> tf.Tensor:
  x = tf.image.resize(x, tf.stack([height, width]), method=method, antialias=True)
  return tf.floor(tf.clip_by_value(x, 0.0, 255.0) + 0.5)


def resize(image: tf.Tensor, size: Sequence, method: str = "bicubic") -> tf.Tensor:
  """PIL Image.resize on pixel floats [h, w, c] or [n, h, w, c]: antialiased (the kernel widens when
  shrinking; bicubic is Keys' a = -0.5 in both PIL and TF), width pass then height pass, each rounded to
  8 bits as PIL does.

  Args:
    image: float32 pixel floats [h, w, c] or [n, h, w, c].
    size: (height, width) of the output (ints or int scalar tensors).
    method: tf.image.resize method ('bicubic' or 'bilinear').

  Returns:
    float32 pixel floats [..., size[0], size[1], c].
  """
  shape = tf.shape(image)
  in_height = shape[-3]
  x = _resize_axis(image, in_height, size[1], method)
  return _resize_axis(x, size[0], size[1], method)


def resized_crop(image: tf.Tensor, box: tf.Tensor, size: int, method: str = "bicubic") -> tf.Tensor:
  """Crops box (top, left, h, w) out of image [H, W, 3] and resizes it to size x size, like
  torchvision's F.resized_crop on a PIL image (the crop's border is the resampling border).

  Args:
    image: float32 pixel floats [H, W, 3].
    box: int32 [4] (top, left, h, w).
    size: side of the square output.
    method: tf.image.resize method.

  Returns:
    float32 pixel floats [size, size, 3].
  """
  crop = tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], 3]))
  return resize(crop, (size, size), method)


def random_resized_crops(
  image: tf.Tensor,
  seed: tf.Tensor,
  num: int,
  size: int,
  scale: Sequence[float],
  ratio: Sequence[float] = DEFAULT_RATIO,
  method: str = "bicubic",
) -> tf.Tensor:
  """num RandomResizedCrops of one decoded image [H, W, 3] -> pixel floats [num, size, size, 3].

  Args:
    image: uint8 or float [H, W, 3].
    seed: int [2] stateless seed.
    num: number of crops.
    size: side of the square crops.
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio w / h.
    method: tf.image.resize method.

  Returns:
    float32 pixel floats [num, size, size, 3].
  """
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  boxes = sample_crop_box(seed, shape[0], shape[1], num, scale, ratio)
  crops = [resized_crop(image, boxes[k], size, method) for k in range(num)]
  return tf.stack(crops) if crops else tf.zeros([0, size, size, 3])


# ----------------------------------------------------------------------------------------------------
# Colour: torchvision ColorJitter and RandomGrayscale on PIL images.


def grayscale(x: tf.Tensor) -> tf.Tensor:
  """PIL convert('L'): (19595 R + 38470 G + 7471 B + 2^15) >> 16 (the 299/587/114 per mille weights
  in fixed point); exact in float32 because the sum stays below 2^24. Returns [..., 1].

  Args:
    x: pixel floats [..., 3].

  Returns:
    Pixel floats [..., 1].
  """
  r, g, b = tf.unstack(x, axis=-1)
  return tf.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)[..., None]


def _blend(degenerate: tf.Tensor, x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL Image.blend(degenerate, x, factor): float blend, clipped, truncated to 8 bits."""
  out = degenerate + _per_crop(factor) * (x - degenerate)
  return tf.floor(tf.clip_by_value(out, 0.0, 255.0))


def adjust_brightness(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Brightness: blend with black.

  Args:
    x: pixel floats [n, h, w, 3].
    factor: float32 [n], one per crop.

  Returns:
    Pixel floats [n, h, w, 3].
  """
  return _blend(tf.zeros_like(x), x, factor)


def adjust_contrast(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Contrast: blend with the rounded mean of the grayscale crop.

  Args:
    x: pixel floats [n, h, w, 3].
    factor: float32 [n], one per crop.

  Returns:
    Pixel floats [n, h, w, 3].
  """
  mean = tf.reduce_mean(grayscale(x), axis=[1, 2, 3], keepdims=True)
  return _blend(tf.floor(mean + 0.5), x, factor)


def adjust_saturation(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """ImageEnhance.Color: blend with the grayscale crop.

  Args:
    x: pixel floats [n, h, w, 3].
    factor: float32 [n], one per crop.

  Returns:
    Pixel floats [n, h, w, 3].
  """
  return _blend(grayscale(x), x, factor)


def _rgb_to_hsv(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """PIL convert('HSV'): 8-bit hue and saturation truncated from [0, 1) floats, value = max."""
  r, g, b = tf.unstack(x, axis=-1)
  maxc = tf.maximum(r, tf.maximum(g, b))
  minc = tf.minimum(r, tf.minimum(g, b))
  chroma = maxc - minc
  grey = chroma == 0
  safe = tf.where(grey, 1.0, chroma)
  # PIL's C code: rc, gc, bc and h are stored as float, the arithmetic between is double.
  rc, gc, bc = (tf.cast((maxc - c) / safe, tf.float64) for c in (r, g, b))
  h = tf.where(r == maxc, bc - gc, tf.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
  h = tf.cast(tf.cast(h, tf.float32), tf.float64)
  h = h / 6.0 + 1.0  # In [5/6, 11/6]: fmod(h, 1) is one exact subtraction (fmod itself is slow).
  h = tf.cast(tf.cast(tf.where(h >= 1.0, h - 1.0, h), tf.float32), tf.float64)
  hue = tf.where(grey, 0.0, tf.cast(tf.floor(h * 255.0), tf.float32))
  sat = tf.cast(chroma / tf.maximum(maxc, 1.0), tf.float64) * 255.0
  sat = tf.where(grey, 0.0, tf.cast(tf.floor(sat), tf.float32))
  return hue, sat, maxc


def _hsv_to_rgb(hue: tf.Tensor, sat: tf.Tensor, val: tf.Tensor) -> tf.Tensor:
  """PIL convert('RGB') from HSV: each channel is v, round(v(1-s)), round(v(1-sf)) or round(v(1-s(1-f)))
  by the hue sextant; written as the continuous form v(1 - s clip(min(k, 4 - k), 0, 1)) with
  k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B, which selects the same term."""
  h6 = hue * (6.0 / 255.0)
  s = sat / 255.0
  channels = []
  for n in (5.0, 3.0, 1.0):
    k = n + h6
    k = tf.where(k >= 6.0, k - 6.0, k)  # k mod 6, as k < 12.
    weight = tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0)
    channels.append(tf.floor(val * (1.0 - s * weight) + 0.5))
  return tf.stack(channels, axis=-1)


def adjust_hue(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision F.adjust_hue on PIL: to 8-bit HSV, add int(factor * 255) to hue modulo 256, back.

  Args:
    x: pixel floats [n, h, w, 3].
    factor: float32 [n] in [-0.5, 0.5], one per crop.

  Returns:
    Pixel floats [n, h, w, 3].
  """
  hue, sat, val = _rgb_to_hsv(x)
  shift = tf.cast(tf.cast(factor * 255.0, tf.int32), tf.float32)  # Truncates toward zero.
  hue = hue + tf.reshape(shift, [-1, 1, 1])  # In [-25, 280]: modulo 256 by one add or subtract.
  hue = tf.where(hue < 0.0, hue + 256.0, tf.where(hue >= 256.0, hue - 256.0, hue))
  return _hsv_to_rgb(hue, sat, val)


_COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def sample_jitter(
  seed: tf.Tensor,
  num: int,
  prob: float = constants.JITTER_PROB,
  brightness: float = 0.4,
  contrast: float = 0.4,
  saturation: float = 0.2,
  hue: float = 0.1,
) -> dict:
  """torchvision RandomApply(ColorJitter) parameters for num crops.

  Args:
    seed: int [2] stateless seed.
    num: number of crops.
    prob: probability of applying the jitter to a crop.
    brightness: strength s of the brightness factor.
    contrast: strength s of the contrast factor.
    saturation: strength s of the saturation factor.
    hue: strength h of the hue shift.

  Returns:
    'factors' float32 [num, 4] (brightness, contrast, saturation in [max(0, 1 - s), 1 + s], hue in
    [-h, h]) and 'order' int32 [num, 4]: the op index run in each of the four slots, a uniform random
    permutation, or all _IDENTITY where the jitter is not applied (probability 1 - prob).
  """
  seed_apply, seed_factor, seed_order = split_seed(seed, 3)
  lo = tf.constant([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
  hi = tf.constant([1 + brightness, 1 + contrast, 1 + saturation, hue])
  factors = lo + (hi - lo) * tf.random.stateless_uniform([num, 4], seed_factor)
  order = tf.argsort(tf.random.stateless_uniform([num, 4], seed_order), axis=1, stable=True)
  apply = _bernoulli(seed_apply, tf.fill([num], prob))
  order = tf.where(apply[:, None], order, _IDENTITY)
  return {"factors": factors, "order": tf.cast(order, tf.int32)}


# ----------------------------------------------------------------------------------------------------
# Blur and solarization (DINO's utils.GaussianBlur and utils.Solarization).


def _box_blur_weights(sigma: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """PIL's GaussianBlur(sigma) as the box blur it runs three times per axis, per crop (sigma [n]).

  Box radius l + a (Gwosdek et al. 2011: three passes of variance sigma^2 / 3 each), then in 24-bit fixed
  point: each of the 2r + 1 whole taps (r = int(l + a)) weighs ww = int(2^24 / (2(l + a) + 1)) and the
  two taps just outside weigh fw = (2^24 - (2r + 1) ww) / 2. PIL's C code rounds each step to float32
  (its square root is in double): here every step runs in float64 and is rounded to float32 where PIL's
  is, which also keeps XLA from fusing or reassociating them. Returns float64 r, ww, fw [n].
  """

  def f32(x):
    return tf.cast(tf.cast(x, tf.float32), tf.float64)

  sigma = f32(sigma)
  sigma2 = f32(f32(sigma * sigma) / 3.0)
  length = f32(tf.sqrt(12.0 * sigma2 + 1.0))
  whole = f32(tf.floor((length - 1.0) / 2.0))
  frac = f32(f32(2.0 * whole + 1.0) * f32(f32(whole * (whole + 1.0)) - f32(3.0 * sigma2)))
  frac = f32(frac / f32(6.0 * f32(sigma2 - f32((whole + 1.0) * (whole + 1.0)))))
  radius = f32(whole + frac)
  r = tf.floor(radius)
  ww = tf.floor(f32(2.0**24 / f32(radius * 2.0 + 1.0)))
  return r, ww, tf.floor((2.0**24 - (2.0 * r + 1.0) * ww) / 2.0)


def gaussian_blur(x: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
  """PIL's ImageFilter.GaussianBlur(sigma) of each crop of x [n, h, w, c] with its own sigma [n].

  PIL does not sample a Gaussian: it runs a box blur of fractional radius three times along the width,
  then three times along the height, each pass on 8-bit pixels with edges replicated, in 24-bit fixed
  point, rounded. Here each pass is a sum of 2 * BLUR_BOX_EXTENT + 1 shifted copies with per-crop integer
  weights (zero beyond the crop's own box), exact in float64, which XLA fuses into one loop.

  Args:
    x: pixel floats [n, h, w, c].
    sigma: float32 [n], one per crop.

  Returns:
    float32 pixel floats [n, h, w, c].
  """
  r, ww, fw = _box_blur_weights(sigma)
  extent = constants.BLUR_BOX_EXTENT
  offsets = tf.abs(tf.range(-extent, extent + 1, dtype=tf.float64))[None, :]
  taps = tf.where(offsets <= r[:, None], ww[:, None], tf.where(offsets == r[:, None] + 1.0, fw[:, None], 0.0))
  y = tf.cast(x, tf.float64)
  for axis in (2, 1):
    size = tf.shape(y)[axis]
    for _ in range(3):
      out = tf.zeros_like(y)
      for t in range(2 * extent + 1):
        index = tf.clip_by_value(tf.range(size) + t - extent, 0, size - 1)
        out += _per_crop(taps[:, t]) * tf.gather(y, index, axis=axis)
      y = tf.floor((out + 2.0**23) / 2.0**24)
  return tf.cast(y, tf.float32)


def solarize(x: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.solarize (threshold 128): pixels >= 128 become 255 - x; for whole numbers in
  [0, 255] that is min(x, 255 - x).

  Args:
    x: pixel floats, any shape.

  Returns:
    Pixel floats of the same shape.
  """
  return tf.minimum(x, 255.0 - x)


# ----------------------------------------------------------------------------------------------------
# The photometric chain of DataAugmentationDINO, per crop.


def sample_photometric(
  seed: tf.Tensor,
  blur_prob: Sequence[float],
  solarize_prob: Sequence[float],
  flip_prob: float = constants.FLIP_PROB,
  jitter_prob: float = constants.JITTER_PROB,
  gray_prob: float = constants.GRAY_PROB,
  sigma: Sequence[float] = constants.BLUR_SIGMA,
  jitter: Mapping[str, float] = constants.JITTER_STRENGTH,
) -> dict:
  """Every random choice of flip -> jitter -> grayscale -> blur -> solarize for len(blur_prob) crops:
  bool 'flip', 'gray', 'blur', 'solarize' [n], 'sigma' [n], and sample_jitter's 'factors' and 'order'.

  Args:
    seed: int [2] stateless seed.
    blur_prob: per-crop blur probability; its length is the number of crops n.
    solarize_prob: per-crop solarization probability [n].
    flip_prob: horizontal flip probability.
    jitter_prob: colour jitter probability.
    gray_prob: grayscale probability.
    sigma: (min, max) of the blur's sigma.
    jitter: sample_jitter's strengths (brightness, contrast, saturation, hue).

  Returns:
    The dict of choices above, for apply_photometric.
  """
  n = len(blur_prob)
  seeds = split_seed(seed, 6)
  return {
    "flip": _bernoulli(seeds[0], [flip_prob] * n),
    **sample_jitter(seeds[1], n, jitter_prob, **jitter),
    "gray": _bernoulli(seeds[2], [gray_prob] * n),
    "blur": _bernoulli(seeds[3], blur_prob),
    "sigma": tf.random.stateless_uniform([n], seeds[4], sigma[0], sigma[1]),
    "solarize": _bernoulli(seeds[5], solarize_prob),
  }


def _gray_rgb(x: tf.Tensor) -> tf.Tensor:
  """RandomGrayscale's output: the L image in all three channels."""
  return tf.broadcast_to(grayscale(x), tf.shape(x))


def _photometric_one(args) -> tf.Tensor:
  """One crop [h, w, 3] through the chain; each step runs only if chosen (tf.cond / tf.switch_case)."""
  crop, p = args
  x = crop[None]
  x = tf.cond(p["flip"], lambda: tf.reverse(x, axis=[2]), lambda: x)

  def jitter_slot(slot, x):
    ops = [functools.partial(fn, x, p["factors"][k][None]) for k, fn in enumerate(_COLOR_OPS)]
    return slot + 1, tf.switch_case(p["order"][slot], ops + [lambda: x])

  x = tf.while_loop(lambda slot, _: slot < 4, jitter_slot, (0, x))[1]
  x = tf.cond(p["gray"], lambda: _gray_rgb(x), lambda: x)
  x = tf.cond(p["blur"], lambda: gaussian_blur(x, p["sigma"][None]), lambda: x)
  x = tf.cond(p["solarize"], lambda: solarize(x), lambda: x)
  return x[0]


@tf.function(jit_compile=True)
def apply_photometric(x: tf.Tensor, params: dict) -> tf.Tensor:
  """Runs sample_photometric's choices on crops x [n, h, w, 3] (pixel floats, static shape).

  A loop over the crops keeps the compiled program small (about 3 s to compile per crop shape). The
  compiled chain equals the ops run one by one (which equal PIL), tested; the blur's fixed-point sums are
  exact whatever XLA fuses.

  Args:
    x: float32 pixel floats [n, h, w, 3].
    params: sample_photometric's choices for the n crops.

  Returns:
    float32 pixel floats [n, h, w, 3].
  """
  return tf.map_fn(_photometric_one, (x, params), fn_output_signature=tf.float32)


# ----------------------------------------------------------------------------------------------------
# Full recipes.


def dino_views(
  image: tf.Tensor,
  seed: tf.Tensor,
  size: int,
  scale: Sequence[float],
  blur_prob: Sequence[float],
  solarize_prob: Sequence[float],
  jitter: Mapping[str, float] = constants.JITTER_STRENGTH,
  sigma: Sequence[float] = constants.BLUR_SIGMA,
) -> tf.Tensor:
  """len(blur_prob) crops of one size, each RandomResizedCrop(bicubic) -> flip -> colour jitter (p 0.8,
  strengths `jitter`) -> grayscale (p 0.2) -> blur (its blur_prob, sigma uniform in `sigma`) -> solarize
  (its solarize_prob), as uint8 [n, size, size, 3] (DataAugmentationDINO before ToTensor).

  Args:
    image: decoded image, uint8 [H, W, 3].
    seed: int [2] stateless seed.
    size: side of the square crops.
    scale: RandomResizedCrop's (min, max) area fraction.
    blur_prob: per-crop blur probability; its length is the number of crops.
    solarize_prob: per-crop solarization probability.
    jitter: colour jitter strengths (brightness, contrast, saturation, hue).
    sigma: (min, max) of the blur's sigma.

  Returns:
    uint8 [len(blur_prob), size, size, 3].
  """
  num = len(blur_prob)
  if num == 0:
    return tf.zeros([0, size, size, 3], tf.uint8)
  seed_crop, seed_photo = split_seed(seed, 2)
  x = random_resized_crops(image, seed_crop, num, size, scale)
  params = sample_photometric(seed_photo, blur_prob, solarize_prob, jitter=jitter, sigma=sigma)
  return to_uint8(apply_photometric(x, params))


def inception_crop(
  image: tf.Tensor, seed: tf.Tensor, size: int, scale: Sequence[float] = (0.08, 1.0), method: str = "bilinear"
) -> tf.Tensor:
  """RandomResizedCrop(size) + RandomHorizontalFlip: the linear-probe training transform, uint8.

  Args:
    image: decoded image, uint8 [H, W, 3].
    seed: int [2] stateless seed.
    size: side of the square crop.
    scale: (min, max) fraction of the image area.
    method: tf.image.resize method.

  Returns:
    uint8 [size, size, 3].
  """
  seed_crop, seed_flip = split_seed(seed, 2)
  x = random_resized_crops(image, seed_crop, 1, size, scale, method=method)[0]
  flip = _bernoulli(seed_flip, [0.5])[0]
  return to_uint8(tf.cond(flip, lambda: tf.reverse(x, axis=[1]), lambda: x))


def center_crop_eval(image: tf.Tensor, resize_to: int, crop: int) -> tf.Tensor:
  """Resize(resize_to, bicubic) + CenterCrop(crop), torchvision on PIL, as uint8 [crop, crop, 3].

  The shorter side becomes resize_to and the longer int(resize_to * long / short); the crop offset is
  round((size - crop) / 2).

  Args:
    image: decoded image, uint8 [H, W, 3].
    resize_to: length of the shorter side after the resize.
    crop: side of the square centre crop.

  Returns:
    uint8 [crop, crop, 3].
  """
  image = tf.cast(image, tf.float32)
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  short = tf.reduce_min(shape)
  new = tf.where(shape == short, tf.constant(resize_to, tf.float64), tf.floor(resize_to * shape / short))
  new = tf.cast(new, tf.int32)
  resized = tf.cond(
    tf.reduce_all(new == tf.shape(image)[:2]),
    lambda: image,
    lambda: resize(image, (new[0], new[1]), "bicubic"),
  )
  offset = tf.cast(tf.round(tf.cast(new - crop, tf.float64) / 2.0), tf.int32)
  out = tf.slice(resized, tf.stack([offset[0], offset[1], 0]), [crop, crop, 3])
  return to_uint8(out)
