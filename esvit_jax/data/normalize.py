"""The one place where uint8 pixels become network input (torchvision ToTensor + Normalize)."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esvit_jax.data.constants import IMAGENET_MEAN, IMAGENET_STD


def normalize_images(images: jax.Array | np.ndarray, dtype: Any = jnp.float32) -> jax.Array:
  """RGB pixels in [0, 255] [..., 3] -> (x / 255 - mean) / std in `dtype`.

  Args:
    images: uint8 or float pixel values, channels last.
    dtype: the output dtype (the compute dtype of the network that reads them).

  Returns:
    The ImageNet-normalised images, same shape.
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(dtype)
