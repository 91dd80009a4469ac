"""timm's RandAugment (MAE's fine-tuning policy rand-m9-mstd0.5-inc1) on the accelerator, equal to PIL's.

timm 0.4.12 draws num_ops operations per image, uniformly with replacement from 15, and applies each
with probability 0.5 at a magnitude drawn from N(m, mstd) clipped to [0, 10]. The ops are PIL's on
8-bit RGB, and run here on whole-number float32 pixels rounded as PIL's C code rounds, in three families
so that a vmapped layer costs one of each whichever op it runs (a vmapped switch computes every branch):

- lookup tables: AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd are per-channel 256-entry
  tables, the first two built from the image's own histogram; one gather applies the chosen table.
- blends (ImageEnhance): Color, Contrast, Brightness, Sharpness blend with a degenerate image (grayscale,
  its mean, black, PIL's 3 x 3 SMOOTH filter).
- affine warps: Rotate, ShearX/Y, TranslateX/YRel are one inverse-mapped warp with PIL's bicubic
  (Image.transform, the cubic with a = -1 and edge clamping), pixels outside filled with the ImageNet mean
  colour, as timm's img_mean.

The policy's magnitude and its op choice are per image, from one key per image.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from esvit_jax import errors
from esvit_jax.data import constants
from esvit_jax.data.device_augment import blend, divide, gray_mean, grayscale

MAX_LEVEL = 10.0  # timm's _MAX_LEVEL: magnitudes are clipped to [0, MAX_LEVEL].
APPLY_PROB = 0.5  # timm's rand_augment_ops: each drawn op runs with this probability.
TRANSLATE_PCT = 0.45  # timm's translate_pct: TranslateX/YRel move by up to this fraction of the side.
# timm's img_mean: the ImageNet mean in 8 bits, (124, 116, 104), the colour of pixels a warp brings in.
IMAGENET_FILL = tuple(min(255, round(255 * float(m))) for m in constants.IMAGENET_MEAN)

# timm's _RAND_TRANSFORMS; _RAND_INCREASING_TRANSFORMS replaces the six whose severity falls with the
# magnitude (or does not change with it) by variants whose severity rises, at the same positions.
OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "SolarizeAdd",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
_INCREASING = ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")
INCREASING_OPS = tuple(f"{name}Increasing" if name in _INCREASING else name for name in OPS)
_OP = {name: i for i, name in enumerate(OPS)}
_LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd")
_BLEND_OPS = ("Color", "Contrast", "Brightness", "Sharpness")
_AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_LUT, _BLEND_FAMILY, _AFFINE = 0, 1, 2
_FAMILY = np.array([_LUT if n in _LUT_OPS else _BLEND_FAMILY if n in _BLEND_OPS else _AFFINE for n in OPS])
_LUT_SLOT = np.array([_LUT_OPS.index(n) if n in _LUT_OPS else 0 for n in OPS])
_AFFINE_SLOT = np.array([_AFFINE_OPS.index(n) if n in _AFFINE_OPS else 0 for n in OPS])


@dataclasses.dataclass(frozen=True)
class Policy:
  """timm's RandAugment configuration (hashable: a static argument of jitted code).

  Attributes:
    num_ops: ops drawn per image (timm's n, default 2).
    magnitude: the mean magnitude (m, default 10), on timm's 0-10 scale.
    magnitude_std: the standard deviation of the per-op magnitude (mstd, default 0: fixed).
    increasing: timm's inc1: the op list whose severity rises with the magnitude.
  """

  num_ops: int = 2
  magnitude: float = MAX_LEVEL
  magnitude_std: float = 0.0
  increasing: bool = False


_SECTION = re.compile(r"([a-z]*)(\d.*)")
_FORM = (
  "timm's form rand-m<magnitude>[-n<ops>][-mstd<std>][-inc1], e.g. 'rand-m9-mstd0.5-inc1' (MAE's), or '' "
  "for no RandAugment"
)


def parse_policy(text: str) -> Policy | None:
  """timm's rand_augment_transform config string as a Policy.

  Sections after 'rand' are m (an integer magnitude), n (an integer number of ops), mstd (a float) and
  inc1, in any order. timm takes any inc section, inc0 included, as the increasing list, so inc0 is refused
  rather than read either way; its 'w' (weighted op choice) is not supported.

  Args:
    text: the policy string, e.g. 'rand-m9-mstd0.5-inc1'; '' for none.

  Returns:
    The Policy, or None for ''.

  Raises:
    errors.UserError: text is not of that form.
  """
  if not text:
    return None
  sections = text.split("-")
  fields = {}
  try:
    if sections[0] != "rand":
      raise ValueError(sections[0])
    for section in sections[1:]:
      match = _SECTION.fullmatch(section)
      if match is None:
        raise ValueError(section)
      key, value = match.groups()
      if key == "m":
        fields["magnitude"] = float(int(value))
      elif key == "n":
        fields["num_ops"] = int(value)
      elif key == "mstd":
        fields["magnitude_std"] = float(value)
      elif key == "inc" and value == "1":
        fields["increasing"] = True
      else:
        raise ValueError(section)
  except ValueError as e:
    raise errors.UserError(f"RandAugment policy {text!r} is not understood ({e}); use {_FORM}.") from None
  return Policy(**fields)


def op_names(policy: Policy) -> tuple[str, ...]:
  """timm's op list of the policy, in the order of sample_ops's indices.

  Args:
    policy: the policy.

  Returns:
    The 15 op names.
  """
  return INCREASING_OPS if policy.increasing else OPS


def sample_ops(key: jax.Array, policy: Policy) -> dict[str, jax.Array]:
  """One image's random choices: policy.num_ops ops, uniform with replacement (timm's np.random.choice),
  each applied with probability 0.5 at a magnitude N(m, mstd) clipped to [0, 10], its signed level
  negated with probability 0.5 (timm's _randomly_negate).

  Args:
    key: a PRNG key.
    policy: the policy.

  Returns:
    int32 'op' (index into op_names(policy)), float32 'magnitude', bool 'apply' and 'negate', each
    [policy.num_ops].
  """
  key_u, key_z = jax.random.split(key)
  n = policy.num_ops
  u = jax.random.uniform(key_u, (n, 3))
  z = jax.random.normal(key_z, (n,))
  return {
    "op": jnp.minimum(jnp.floor(u[:, 0] * len(OPS)), len(OPS) - 1).astype(jnp.int32),
    "magnitude": jnp.clip(policy.magnitude + policy.magnitude_std * z, 0.0, MAX_LEVEL),
    "apply": u[:, 1] < APPLY_PROB,
    "negate": u[:, 2] < 0.5,
  }


# ----------------------------------------------------------------------------------------------------
# Lookup tables.


@functools.cache
def _autocontrast_undershoots() -> np.ndarray:
  """Sorted int32 keys (lo * 256 + hi) * 256 + level of the levels in [lo, hi] that PIL's autocontrast maps
  one below (level - lo) * 255 / (hi - lo) where that is a whole number: int(level * scale + offset)
  in double, with scale = 255 / (hi - lo) and offset = -lo * scale each rounded, lands just under it
  (12094 of the 2.8 million (lo, hi, level) triples, e.g. hi = 25 with lo = 0 maps to 254)."""
  level = np.arange(256)
  keys = []
  for lo in range(255):
    hi = np.arange(lo + 1, 256)[:, None]
    scale = 255.0 / (hi - lo)
    offset = -lo * scale
    exact = (level - lo) * 255
    under = ((level * scale + offset).astype(np.int64) < exact // (hi - lo)) & (exact % (hi - lo) == 0)
    under &= (level >= lo) & (level <= hi)
    h, v = np.nonzero(under)
    keys.append((lo * 256 + hi[h, 0]) * 256 + level[v])
  return np.sort(np.concatenate(keys)).astype(np.int32)


def _autocontrast_lut(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """ImageOps.autocontrast's table [256] (cutoff 0) of a channel with extreme levels lo and hi."""
  level = jnp.arange(256)
  span = jnp.maximum(hi - lo, 1)
  out = jnp.floor_divide((level - lo) * 255, span)
  table = jnp.asarray(_autocontrast_undershoots())
  key = (lo * 256 + hi) * 256 + level
  found = table[jnp.clip(jnp.searchsorted(table, key), 0, table.shape[0] - 1)] == key
  out = jnp.clip(out - found, 0, 255)
  return jnp.where(hi > lo, out, level)


def _equalize_lut(hist: jax.Array) -> jax.Array:
  """ImageOps.equalize's table [256] from a channel's histogram [256]: (step // 2 + pixels below the level)
  // step, step = (pixels - pixels at the top level) // 255; identity for one level or step 0."""
  level = jnp.arange(256)
  top = jnp.max(jnp.where(hist > 0, level, 0))
  step = (jnp.sum(hist) - hist[top]) // 255
  below = jnp.cumsum(hist) - hist
  out = jnp.clip((step // 2 + below) // jnp.maximum(step, 1), 0, 255)
  return jnp.where((jnp.sum(hist > 0) > 1) & (step > 0), out, level)


def _scaled(magnitude: jax.Array, numerator: float, denominator: float) -> jax.Array:
  """timm's level / 10 * c (c = numerator / denominator * 10) as magnitude * numerator / denominator,
  one true division: for a whole magnitude the product is exact and the quotient is the correctly rounded
  value, as float32 of timm's double (magnitude / 10 * 0.9 in float32 rounds three times)."""
  return divide(magnitude * numerator, denominator)


def _luts(x: jax.Array, op: jax.Array, magnitude: jax.Array, increasing: bool) -> jax.Array:
  """The chosen lookup-table op's tables, int32 [3, 256] (one per channel)."""
  level = jnp.arange(256)
  pixels = x.reshape(-1, 3).astype(jnp.int32)
  lo, hi = jnp.min(pixels, axis=0), jnp.max(pixels, axis=0)
  hist = jax.vmap(lambda c: jnp.bincount(c, length=256), in_axes=1)(pixels)
  bits = jnp.floor(_scaled(magnitude, 2.0, 5.0)).astype(jnp.int32)  # timm's int(level / 10 * 4).
  # Posterize keeps 4 - bits (increasing) or bits high bits; 0 kept bits give 0, as PIL 8's posterize.
  shift = 4 + bits if increasing else 8 - bits
  threshold = jnp.floor(_scaled(magnitude, 128.0, 5.0)).astype(jnp.int32)  # int(level / 10 * 256).
  threshold = 256 - threshold if increasing else threshold
  add = jnp.floor(magnitude * 11.0).astype(jnp.int32)  # int(level / 10 * 110).
  per_channel = jnp.stack(
    [
      jax.vmap(_autocontrast_lut)(lo, hi),
      jax.vmap(_equalize_lut)(hist),
    ]
  )
  shared = jnp.stack(
    [
      255 - level,
      (level >> shift) << shift,
      jnp.where(level < threshold, level, 255 - level),
      jnp.where(level < 128, jnp.minimum(level + add, 255), level),
    ]
  )
  tables = jnp.concatenate([per_channel, jnp.broadcast_to(shared[:, None], (4, 3, 256))])
  return tables[jnp.asarray(_LUT_SLOT)[op]]


def _apply_luts(x: jax.Array, tables: jax.Array) -> jax.Array:
  """tables[c, x[..., c]] for the three channels."""
  index = x.astype(jnp.int32) + 256 * jnp.arange(3)
  return tables.reshape(-1)[index].astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Blends (ImageEnhance).


def smooth(x: jax.Array) -> jax.Array:
  """PIL's ImageFilter.SMOOTH: the 3 x 3 kernel (1 1 1; 1 5 1; 1 1 1) / 13, edge rows and columns kept.

  PIL sums in float32 and truncates sum / 13 + 0.5; for 8-bit pixels that value is never within 1 / 26 of
  a whole number, so it is the integer (2 sum + 13) // 26 exactly.

  Args:
    x: pixel floats [h, w, c].

  Returns:
    Pixel floats [h, w, c].
  """
  h, w = x.shape[:2]
  p = x.astype(jnp.int32)
  window = sum(p[dy : h - 2 + dy, dx : w - 2 + dx] for dy in range(3) for dx in range(3))
  total = window + 4 * p[1:-1, 1:-1]
  inner = (2 * total + 13) // 26
  return x.at[1:-1, 1:-1].set(inner.astype(x.dtype))


def _enhance_factor(magnitude: jax.Array, negate: jax.Array, increasing: bool) -> jax.Array:
  """timm's _enhance_increasing_level_to_arg (1 +- level / 10 * 0.9) or _enhance_level_to_arg
  (level / 10 * 1.8 + 0.1)."""
  if increasing:
    return divide(100.0 + jnp.where(negate, -9.0, 9.0) * magnitude, 100.0)
  return divide(9.0 * magnitude + 5.0, 50.0)


def _enhance(x: jax.Array, op: jax.Array, factor: jax.Array) -> jax.Array:
  """ImageEnhance's Color, Contrast, Brightness or Sharpness by op: one blend with its degenerate image."""
  degenerate = jnp.where(
    op == _OP["Color"],
    grayscale(x),
    jnp.where(op == _OP["Contrast"], gray_mean(x), jnp.where(op == _OP["Brightness"], 0.0, smooth(x))),
  )
  return blend(degenerate, x, factor)


# ----------------------------------------------------------------------------------------------------
# Affine warps (Image.transform AFFINE and Image.rotate, BICUBIC, with a fill colour).


def _affine_matrix(
  op: jax.Array, magnitude: jax.Array, negate: jax.Array, height: int, width: int
) -> jax.Array:
  """PIL's inverse affine (a, b, c, d, e, f) of the chosen op: the output pixel centre (x, y) samples the
  input at (a x + b y + c, d x + e y + f)."""
  sign = jnp.where(negate, -1.0, 1.0)
  shear = sign * _scaled(magnitude, 3.0, 100.0)  # level / 10 * 0.3
  # timm's pixels = level / 10 * translate_pct * side.
  shift_x, shift_y = (sign * _scaled(magnitude, 20 * TRANSLATE_PCT * side, 200.0) for side in (width, height))
  # Image.rotate(level / 10 * 30 degrees): the inverse rotation about the image's centre (w / 2, h / 2).
  angle = -jnp.deg2rad(sign * magnitude * 3.0)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = width / 2.0, height / 2.0
  rotate = jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])
  one, zero = jnp.ones(()), jnp.zeros(())
  matrices = jnp.stack(
    [
      rotate,
      jnp.stack([one, shear, zero, zero, one, zero]),
      jnp.stack([one, zero, zero, shear, one, zero]),
      jnp.stack([one, zero, shift_x, zero, one, zero]),
      jnp.stack([one, zero, zero, zero, one, shift_y]),
    ]
  )
  return matrices[jnp.asarray(_AFFINE_SLOT)[op]]


def _cubic(v1: jax.Array, v2: jax.Array, v3: jax.Array, v4: jax.Array, d: jax.Array) -> jax.Array:
  """Geometry.c's BICUBIC: the a = -1 cubic through four taps at fraction d, in PIL's Horner form."""
  p2 = v3 - v1
  p3 = 2.0 * (v1 - v2) + v3 - v4
  p4 = v2 - v1 - v3 + v4
  return v2 + d * (p2 + d * (p3 + d * p4))


def warp(x: jax.Array, matrix: jax.Array, fill: jax.Array) -> jax.Array:
  """PIL's Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill) of one image.

  Output pixel (x, y) samples the input at matrix applied to (x + 0.5, y + 0.5); a sample outside the
  image gets the fill colour, one inside the 4 x 4 taps around it (clamped at the edges), each row then
  the column through the cubic, clipped and truncated to 8 bits. PIL computes the coordinates in double,
  here in float32: a sample position within float32's error of a whole pixel is taken as that pixel (as
  double lands on it), and values within that error of a level can truncate one level apart.

  Args:
    x: pixel floats [h, w, 3].
    matrix: float32 [6], PIL's (a, b, c, d, e, f).
    fill: float32 [3], the colour of pixels that map outside the image.

  Returns:
    Pixel floats [h, w, 3].
  """
  h, w = x.shape[:2]
  ys, xs = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
  sx = matrix[0] * xs + matrix[1] * ys + matrix[2]
  sy = matrix[3] * xs + matrix[4] * ys + matrix[5]
  inside = (sx >= 0.0) & (sx < w) & (sy >= 0.0) & (sy < h)
  tolerance = 4.0 * (h + w) * float(np.finfo(np.float32).eps)

  def taps(coordinate, size):
    centre = coordinate - 0.5
    whole = jnp.round(centre)
    centre = jnp.where(jnp.abs(centre - whole) < tolerance, whole, centre)
    first = jnp.floor(centre)
    index = jnp.clip(first[..., None] + jnp.arange(-1, 3), 0, size - 1).astype(jnp.int32)
    return index, centre - first

  cols, dx = taps(sx, w)
  rows, dy = taps(sy, h)
  values = x.reshape(h * w, 3)[rows[..., :, None] * w + cols[..., None, :]]  # [h, w, row, col, 3]
  row_values = _cubic(*(values[..., i, :] for i in range(4)), dx[..., None, None])  # [h, w, row, 3]
  out = _cubic(*(row_values[..., i, :] for i in range(4)), dy[..., None])
  return jnp.where(inside[..., None], jnp.floor(jnp.clip(out, 0.0, 255.0)), fill)


# ----------------------------------------------------------------------------------------------------
# Layers and the batch.


def _layer(x: jax.Array, sampled: dict[str, jax.Array], increasing: bool, fill: jax.Array) -> jax.Array:
  """One drawn op on one image: each family computed once, the op's family kept."""
  op, magnitude, negate = sampled["op"], sampled["magnitude"], sampled["negate"]
  h, w = x.shape[:2]
  by_lut = _apply_luts(x, _luts(x, op, magnitude, increasing))
  by_blend = _enhance(x, op, _enhance_factor(magnitude, negate, increasing))
  by_warp = warp(x, _affine_matrix(op, magnitude, negate, h, w), fill)
  family = jnp.asarray(_FAMILY)[op]
  out = jnp.where(family == _LUT, by_lut, jnp.where(family == _BLEND_FAMILY, by_blend, by_warp))
  return jnp.where(sampled["apply"], out, x)


def apply_ops(
  image: jax.Array, sampled: dict[str, jax.Array], policy: Policy, fill: tuple[int, ...] = IMAGENET_FILL
) -> jax.Array:
  """Runs one image's drawn ops in order (timm's RandAugment.__call__).

  Args:
    image: pixel floats [h, w, 3] (whole numbers in [0, 255]).
    sampled: sample_ops's dict for this image (any leading length: the ops run in order).
    policy: the policy (its op list).
    fill: the RGB colour of pixels that warps bring in.

  Returns:
    Pixel floats [h, w, 3].
  """
  fill_colour = jnp.asarray(fill, jnp.float32)

  def step(x, one):
    return _layer(x, one, policy.increasing, fill_colour), None

  return jax.lax.scan(step, image.astype(jnp.float32), dict(sampled))[0]


def rand_augment(
  key: jax.Array, images: jax.Array, policy: Policy, fill: tuple[int, ...] = IMAGENET_FILL
) -> jax.Array:
  """timm's RandAugment of each image of a batch, with its own randomness.

  Args:
    key: a typed PRNG key (jax.random.key), split into one per image, or one per image [B].
    images: uint8 [B, h, w, 3], or float pixels holding whole numbers in [0, 255].
    policy: the policy.
    fill: the RGB colour of pixels that warps bring in (timm's img_mean).

  Returns:
    [B, h, w, 3] in the dtype of images (float32 for float input).
  """
  keys = jax.random.split(key, images.shape[0]) if key.ndim == 0 else key
  out = jax.vmap(lambda k, x: apply_ops(x, sample_ops(k, policy), policy, fill))(keys, images)
  return out.astype(images.dtype if images.dtype == jnp.uint8 else jnp.float32)
