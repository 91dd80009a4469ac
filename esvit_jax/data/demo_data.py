"""The embedded demo dataset: coloured shapes and textures drawn in numpy, no download.

Ten classes are defined by shape or texture only. Colour, background, position, size and rotation are
drawn independently of the class, so raw pixels separate the classes only partly (a k-NN on them reaches
33.7% on the test split, a randomly initialised demo Swin 22.6%, and the teacher after `make demo`'s
pretraining 48.7%: see README). Images are drawn with anti-aliased edges at any resolution,
deterministically from a seed.
"""

import os

import numpy as np
from PIL import Image

CLASS_NAMES = (
  "disc",
  "square",
  "triangle",
  "ring",
  "cross",
  "frame",
  "star",
  "striped_disc",
  "checkered_square",
  "dot_cluster",
)
NUM_CLASSES = len(CLASS_NAMES)
_CHUNK = 256  # Images drawn per vectorised step (bounds the float temporaries).


def _box(x, y):
  return np.maximum(np.abs(x), np.abs(y))


def _dots(x, y):
  return np.maximum(
    np.hypot(x, y) - 1.0, np.hypot(x - np.round(x * 2.2) / 2.2, y - np.round(y * 2.2) / 2.2) - 0.14
  )


_S3 = np.sqrt(3) / 2
# Signed distance-like fields (< 0 inside) of each class's silhouette, in object units (radius 1).
_SILHOUETTES = (
  lambda x, y: np.hypot(x, y) - 1.0,  # disc
  lambda x, y: _box(x, y) - 0.8,  # square
  lambda x, y: np.maximum(np.maximum(-y - 0.5, _S3 * x + y / 2 - 0.5), -_S3 * x + y / 2 - 0.5),
  lambda x, y: np.abs(np.hypot(x, y) - 0.7) - 0.25,  # ring
  lambda x, y: np.minimum(
    np.maximum(np.abs(x) - 1.0, np.abs(y) - 0.3), np.maximum(np.abs(x) - 0.3, np.abs(y) - 1.0)
  ),  # cross
  lambda x, y: np.abs(_box(x, y) - 0.7) - 0.18,  # frame
  lambda x, y: np.hypot(x, y) - (0.62 + 0.33 * np.cos(5 * np.arctan2(y, x))),  # star
  lambda x, y: np.hypot(x, y) - 1.0,  # striped disc
  lambda x, y: _box(x, y) - 0.8,  # checkered square
  _dots,  # dot cluster
)
# Where the second colour shows inside the silhouette (> 0): stripes, checks, or nowhere.
_TEXTURES = {
  7: lambda x, y: np.sin(np.pi * 3.0 * x),
  8: lambda x, y: np.sin(np.pi * 2.5 * x) * np.sin(np.pi * 2.5 * y),
}


def _object_layers(labels, x, y, pixel):
  """Anti-aliased coverage of the silhouette and fraction of the second colour, [n, h, w] each."""
  cover = np.empty_like(x)
  mix = np.zeros_like(x)
  for k in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == k)
    if rows.size:
      px = pixel[rows]
      cover[rows] = np.clip(0.5 - _SILHOUETTES[k](x[rows], y[rows]) / px, 0, 1)
      if k in _TEXTURES:
        mix[rows] = np.clip(0.5 + _TEXTURES[k](x[rows], y[rows]) / (6 * px), 0, 1)
  return cover, mix


def _random_colours(rng, n):
  """RGB colours in [0, 1] from a palette of 6 hues x 2 saturations x 2 values, slightly perturbed.

  A small palette keeps colour from identifying an image: DINO's colour jitter moves hues by at most
  0.1, so with free colours the crops of one image are matched by colour alone and self-supervised
  training learns colour instead of shape (seen: k-NN at chance).
  """
  hue = rng.integers(0, 6, n) / 6 + rng.uniform(-0.02, 0.02, n)
  sat = rng.choice([0.45, 0.9], n)
  val = rng.choice([0.45, 0.9], n)
  k = (np.array([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
  return val[:, None] * (1 - sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))


def _luma(rgb):
  return rgb @ np.array([0.299, 0.587, 0.114])


def _col(values):
  """Per-image scalars [n] -> float32 [n, 1, 1], to broadcast over pixels."""
  return np.asarray(values, np.float32)[:, None, None]


def _rgb(colours):
  """Per-image colours [n, 3] -> float32 [n, 1, 1, 3]."""
  return np.asarray(colours, np.float32)[:, None, None, :]


def _draw(rng, labels, height, width):
  """float32 images [n, height, width, 3] in [0, 1] for the given labels."""
  n = len(labels)
  short = min(height, width)
  gx = ((np.arange(width) + 0.5 - width / 2) * 2 / short).astype(np.float32)[None, None, :]
  gy = ((np.arange(height) + 0.5 - height / 2) * 2 / short).astype(np.float32)[None, :, None]

  # Background: a gentle gradient between two nearby colours. It must carry less structure than the
  # object: crops of one image share their background, so a distinctive background pattern (waves,
  # stripes) is a shortcut that self-supervised training learns instead of the shapes.
  bg1 = _random_colours(rng, n)
  bg2 = np.clip(bg1 + rng.uniform(-0.1, 0.1, (n, 3)), 0, 1)
  angle = rng.uniform(0, 2 * np.pi, n)
  ramp = np.clip(0.5 + 0.35 * (_col(np.cos(angle)) * gx + _col(np.sin(angle)) * gy), 0, 1)[..., None]
  image = _rgb(bg1) + (_rgb(bg2) - _rgb(bg1)) * ramp

  # Object: the salient content; position, size and colours vary within every class, colours contrast
  # with the background.
  radius = rng.uniform(0.45, 0.8, n)
  cx, cy = rng.uniform(-0.9, 0.9, (2, n)) * (1 - radius) * np.array([[width], [height]]) / short
  # Small rotations only: crops keep an object's orientation, so a free one would identify the image
  # (another shortcut) while saying nothing about its class.
  rot = rng.uniform(-0.35, 0.35, n)
  cos, sin = _col(np.cos(rot) / radius), _col(np.sin(rot) / radius)
  dx, dy = gx - _col(cx), gy - _col(cy)
  x = cos * dx + sin * dy
  y = cos * dy - sin * dx
  pixel = _col(2 / short / radius)  # One pixel in object units.
  cover, mix = _object_layers(labels, x, y, pixel)
  fg1, fg2 = _random_colours(rng, n), _random_colours(rng, n)
  close = np.abs(_luma(fg1) - _luma(0.5 * (bg1 + bg2))) < 0.25
  fg1[close] = 1 - fg1[close]
  shade = 1 + 0.075 * (_col(rng.uniform(-1, 1, n)) * x + _col(rng.uniform(-1, 1, n)) * y)
  fg = (_rgb(fg1) + (_rgb(fg2) - _rgb(fg1)) * mix[..., None]) * shade[..., None]
  image += (fg - image) * cover[..., None]
  image += rng.random(image.shape, np.float32) * 0.05 - 0.025
  return np.clip(image, 0, 1)


def generate(num: int, size: int | tuple[int, int] = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """num demo images as (uint8 [num, height, width, 3], int32 labels [num]), balanced over the classes.

  size is an int (square) or (height, width). The same (num, size, seed) always gives the same arrays.

  Args:
    num: how many images.
    size: the image size.
    seed: the generator's seed.

  Returns:
    (images uint8 [num, height, width, 3], labels int32 [num] in [0, NUM_CLASSES)).
  """
  height, width = (size, size) if isinstance(size, int) else size
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num) % NUM_CLASSES).astype(np.int32)
  chunk = max(1, _CHUNK * 4096 // (height * width))
  images = np.empty((num, height, width, 3), np.uint8)
  for start in range(0, num, chunk):
    drawn = _draw(rng, labels[start : start + chunk], height, width)
    images[start : start + chunk] = np.round(drawn * 255).astype(np.uint8)
  return images, labels


def write_jpeg_folder(
  root: str, num: int, size: tuple[int, int] = (375, 500), quality: int = 90
) -> list[str]:
  """Writes num demo images as root/train/<class>/<i>.jpg, ImageNet-sized by default: benchmark inputs.

  Args:
    root: the image folder's root (created if needed).
    num: how many images.
    size: (height, width) of each image.
    quality: JPEG quality.

  Returns:
    The paths written, in order.
  """
  paths = []
  for start in range(0, num, 64):  # In chunks, to bound memory.
    images, labels = generate(min(64, num - start), size, seed=start)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      folder = os.path.join(root, "train", CLASS_NAMES[label])
      os.makedirs(folder, exist_ok=True)
      paths.append(os.path.join(folder, f"{start + i:06d}.jpg"))
      Image.fromarray(image).save(paths[-1], quality=quality)
  return paths
