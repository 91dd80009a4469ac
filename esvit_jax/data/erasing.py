"""Random erasing on the accelerator, as timm's RandomErasing(mode='pixel', max_count=1).

Per image, after normalisation and before mixup: with probability `prob`, up to 10 attempts draw a target
area uniform in [0.02, 1/3] of the image and an aspect ratio log-uniform in [0.3, 1/0.3]; the first attempt
whose box is smaller than the image in both sides is erased at a uniform position, every pixel and channel
replaced by standard normal noise. When no attempt fits the image is left as it is. All attempts are drawn
at once and the first fitting one is picked by a mask, so shapes are static.
"""

import math

import jax
import jax.numpy as jnp

AREA = (0.02, 1 / 3)  # timm's min_area, max_area: the erased fraction of the image.
MIN_ASPECT = 0.3  # timm's min_aspect; the maximum is its inverse.
ATTEMPTS = 10


def erase_box(
  target_area: jax.Array, aspect: jax.Array, position: jax.Array, height: int, width: int
) -> jax.Array:
  """The box timm erases for given attempts.

  Args:
    target_area: float [T], each attempt's area in pixels.
    aspect: float [T], each attempt's aspect ratio h / w.
    position: float [2] uniforms in [0, 1) that place the box: top and left uniform integers in
      [0, height - h] and [0, width - w], both ends included (Python's random.randint).
    height: the image's height.
    width: the image's width.

  Returns:
    int32 [4] (top, left, h, w) of the first attempt with h < height and w < width, where
    h = round(sqrt(area * aspect)) and w = round(sqrt(area / aspect)) (half to even, as Python's round);
    all zeros when none fits.
  """
  h = jnp.round(jnp.sqrt(target_area * aspect))
  w = jnp.round(jnp.sqrt(target_area / aspect))
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits)
  h, w = h[first], w[first]
  top = jnp.minimum(jnp.floor(position[0] * (height - h + 1)), height - h)
  left = jnp.minimum(jnp.floor(position[1] * (width - w + 1)), width - w)
  box = jnp.stack([top, left, h, w]).astype(jnp.int32)
  return jnp.where(fits[first], box, 0)


def sample_erase_box(key: jax.Array, height: int, width: int, prob: float) -> jax.Array:
  """timm's RandomErasing._erase decisions for one image.

  Args:
    key: a PRNG key.
    height: the image's height.
    width: the image's width.
    prob: the probability of erasing.

  Returns:
    int32 [4] (top, left, h, w); all zeros when the image is not erased.
  """
  u = jax.random.uniform(key, (2 * ATTEMPTS + 3,))
  target_area = height * width * (AREA[0] + (AREA[1] - AREA[0]) * u[:ATTEMPTS])
  log_lo, log_hi = math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT)
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[ATTEMPTS : 2 * ATTEMPTS])
  box = erase_box(target_area, aspect, u[2 * ATTEMPTS : 2 * ATTEMPTS + 2], height, width)
  erased = u[-1] < prob
  return jnp.where(erased, box, jnp.zeros_like(box))


def erase(image: jax.Array, box: jax.Array, noise: jax.Array) -> jax.Array:
  """The image with the box replaced by the noise at the same pixels.

  Args:
    image: float [H, W, C].
    box: int32 [4] (top, left, h, w).
    noise: [H, W, C], the values that fill the box.

  Returns:
    float [H, W, C] in the image's dtype.
  """
  top, left, h, w = box
  rows = jnp.arange(image.shape[0])[:, None]
  cols = jnp.arange(image.shape[1])[None, :]
  inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  return jnp.where(inside[:, :, None], noise.astype(image.dtype), image)


def erase_image(key: jax.Array, image: jax.Array, prob: float) -> jax.Array:
  """Random erasing of one image (vmap it over a batch of keys).

  Args:
    key: a PRNG key.
    image: float [H, W, C], normalised.
    prob: the probability of erasing.

  Returns:
    The image, erased with probability prob by per-pixel, per-channel N(0, 1) noise.
  """
  key_box, key_noise = jax.random.split(key)
  box = sample_erase_box(key_box, image.shape[0], image.shape[1], prob)
  return erase(image, box, jax.random.normal(key_noise, image.shape, jnp.float32))


def random_erasing(key: jax.Array, images: jax.Array, prob: float) -> jax.Array:
  """Random erasing of a batch, each image with its own key split from `key`.

  Args:
    key: a PRNG key for the batch.
    images: float [B, H, W, C], normalised.
    prob: the probability of erasing each image (timm's re_prob).

  Returns:
    float [B, H, W, C], the images, each erased with probability prob.
  """
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(erase_image, in_axes=(0, 0, None))(keys, images, prob)
