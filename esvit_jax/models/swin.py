"""Swin Transformer backbone exactly as EsViT uses it (docs/fidelity.md, Swin backbone).

Points where EsViT's Swin differs from a textbook Swin, all reproduced here:
- LayerNorm eps 1e-6 and exact (erf) GELU.
- Any square input: each block zero-pads its LayerNorm-ed input up to a multiple of its window; padded
  tokens take part in attention unmasked (k = b_k, v = b_v), only the shift regions are masked (-100).
- Each block's window size and shift come from the construction resolution (224), not from the input:
  96px local crops keep window 7 and shift 3 in stages 1-3.
- PatchMerging zero-pads odd maps and concatenates [x0, x1, x2, x3] = [(0,0), (1,0), (0,1), (1,1)].

Window-attention constants (relative position index, shift masks) are numpy arrays computed at trace
time from static shapes, so they are never parameters and never reach checkpoints or the EMA.
Activations between blocks stay float32; matmuls run in `dtype` (bfloat16 for training).
"""

from collections.abc import Sequence
import functools
import math
from typing import Any, ClassVar

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esvit_jax import errors

LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6)
# torch's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. 100 sigma: an untruncated normal.
dense_init = nn.initializers.normal(stddev=0.02)
# torch's default Linear/Conv init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
  """torch's default bias init for Linear/Conv: U(+-1/sqrt(fan_in)).

  Args:
    fan_in: the layer's input size (times the kernel area for a convolution).

  Returns:
    A flax initializer (key, shape, dtype) -> array.
  """
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


VARIANTS = {
  "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.1),
  "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
  "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.2),
}


def relative_position_index(window_size: int) -> np.ndarray:
  """[N, N] index into the ((2w-1)^2, heads) bias table; tokens row-major inside the window.

  Args:
    window_size: w; N = w * w.

  Returns:
    An int [N, N] numpy array.
  """
  ys, xs = np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + window_size - 1
  dx = xs[:, None] - xs[None, :] + window_size - 1
  return dy * (2 * window_size - 1) + dx


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> np.ndarray:
  """[num_windows, N, N] additive mask (0 or -100) for a map padded up to multiples of the window.

  The padded map is cut by the slices (0:-w), (-w:-s), (-s:) on each axis into 9 regions; tokens of a
  window attend across regions only through the -100 penalty, as in the official create_attn_mask.

  Args:
    height: the map's height in tokens (before padding).
    width: the map's width in tokens (before padding).
    window_size: w; N = w * w.
    shift: the cyclic shift s (> 0).

  Returns:
    A float32 numpy array [num_windows, N, N].
  """
  padded_h = -(-height // window_size) * window_size
  padded_w = -(-width // window_size) * window_size
  slices = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
  regions = np.zeros((padded_h, padded_w), np.int32)
  for i, rows in enumerate(slices):
    for j, cols in enumerate(slices):
      regions[rows, cols] = 3 * i + j
  windows = einops.rearrange(regions, "(h wh) (w ww) -> (h w) (wh ww)", wh=window_size, ww=window_size)
  return np.where(windows[:, :, None] != windows[:, None, :], -100.0, 0.0).astype(np.float32)


def block_windows(
  image_size: int, patch_size: int, depths: Sequence[int], window_size: int
) -> list[list[tuple[int, int]]]:
  """(window, shift) of every block, fixed from the construction resolution as the official code does.

  Args:
    image_size: the construction resolution in pixels.
    patch_size: the patch embedding's stride.
    depths: blocks per stage.
    window_size: the configured window; a stage whose map is no larger uses its map size and no shift.

  Returns:
    One list of (window, shift) per stage, one pair per block.
  """
  schedule = []
  for stage, depth in enumerate(depths):
    resolution = image_size // patch_size // 2**stage
    if resolution < 1:
      raise errors.UserError(
        f"image_size={image_size} is too small for {len(depths)} stages of patch {patch_size}."
      )
    stage_windows = []
    for block in range(depth):
      window, shift = window_size, (0 if block % 2 == 0 else window_size // 2)
      if resolution <= window_size:
        window, shift = resolution, 0
      stage_windows.append((window, shift))
    schedule.append(stage_windows)
  return schedule


class DropPath(nn.Module):
  """Stochastic depth per sample; the teacher and evaluation run with deterministic=True."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows, with a learned relative position bias."""

  dim: int
  num_heads: int
  window_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, windows: jax.Array, mask: np.ndarray | None) -> jax.Array:
    """windows: [B, num_windows, N, C]; mask: [num_windows, N, N] or None."""
    n = self.window_size**2
    table = self.param(
      "relative_position_bias_table", dense_init, ((2 * self.window_size - 1) ** 2, self.num_heads)
    )
    qkv = nn.Dense(3 * self.dim, dtype=self.dtype, kernel_init=dense_init, name="qkv")(windows)
    q, k, v = einops.rearrange(qkv, "b w n (three h d) -> three b w h n d", three=3, h=self.num_heads)
    q = q * (self.dim // self.num_heads) ** -0.5
    logits = jnp.einsum("bwhqd,bwhkd->bwhqk", q, k, preferred_element_type=jnp.float32)
    bias = table[relative_position_index(self.window_size).reshape(-1)].reshape(n, n, self.num_heads)
    logits = logits + jnp.transpose(bias, (2, 0, 1))
    if mask is not None:
      logits = logits + mask[:, None]
    attention = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "attention", attention)
    out = jnp.einsum("bwhqk,bwhkd->bwhqd", attention.astype(self.dtype), v)
    out = einops.rearrange(out, "b w h n d -> b w n (h d)")
    return nn.Dense(self.dim, dtype=self.dtype, kernel_init=dense_init, name="proj")(out)


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer = dense_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=self.kernel_init, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(out_dim, dtype=self.dtype, kernel_init=self.kernel_init, name="fc2")(x)


class SwinBlock(nn.Module):
  """Pre-norm (shifted-)window attention block on a [B, H, W, C] map of any size."""

  num_heads: int
  window_size: int
  shift: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _, height, width, dim = x.shape
    w, s = self.window_size, self.shift
    y = LayerNorm(name="norm1")(x)
    y = jnp.pad(y, ((0, 0), (0, -height % w), (0, -width % w), (0, 0)))
    mask = None
    if s:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
      mask = shifted_window_mask(height, width, w, s)
    windows = einops.rearrange(y, "b (h wh) (w ww) c -> b (h w) (wh ww) c", wh=w, ww=w)
    windows = WindowAttention(dim, self.num_heads, w, self.dtype, name="attn")(windows, mask)
    y = einops.rearrange(windows, "b (h w) (wh ww) c -> b (h wh) (w ww) c", h=y.shape[1] // w, wh=w)
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    y = y[:, :height, :width]
    drop_path = DropPath(self.drop_path)
    x = x + drop_path(y, deterministic=not train)
    y = Mlp(int(dim * self.mlp_ratio), self.dtype, name="mlp")(LayerNorm(name="norm2")(x))
    return x + drop_path(y, deterministic=not train)


class PatchMerging(nn.Module):
  """2x2 neighbourhood -> one token: [x0, x1, x2, x3] concat, LayerNorm(4C), Linear(4C -> 2C, no bias)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
    # Channel blocks ordered (column offset, row offset): (0,0), (1,0), (0,1), (1,1) = x0, x1, x2, x3.
    x = einops.rearrange(x, "b (h dh) (w dw) c -> b h w (dw dh c)", dh=2, dw=2)
    x = LayerNorm(name="norm")(x)
    x = nn.Dense(2 * dim, use_bias=False, dtype=self.dtype, kernel_init=dense_init, name="reduction")(x)
    return x.astype(jnp.float32)


class PatchEmbed(nn.Module):
  """Non-overlapping patch_size x patch_size convolution, with PyTorch's default init, then LayerNorm
  (Swin) or nothing (ViT, norm=False): float32 [B, H / p, W / p, C]."""

  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32
  norm: bool = True
  kernel_init: nn.initializers.Initializer = torch_default_kernel_init

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(
      self.embed_dim,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      kernel_init=self.kernel_init,
      bias_init=torch_default_bias_init(images.shape[-1] * p * p),
      name="proj",
    )(images)
    x = x.astype(jnp.float32)
    return LayerNorm(name="norm")(x) if self.norm else x


class Stage(nn.Module):
  """The blocks of one resolution, then PatchMerging unless it is the last stage."""

  windows: Sequence[tuple[int, int]]
  num_heads: int
  drop_path_rates: Sequence[float]
  downsample: bool
  mlp_ratio: float = 4.0
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
    """Returns the input of the next stage and the output of every block (before merging)."""
    block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
    features = []
    for j, ((window, shift), rate) in enumerate(zip(self.windows, self.drop_path_rates, strict=False)):
      x = block_cls(
        self.num_heads, window, shift, self.mlp_ratio, float(rate), self.dtype, name=f"blocks_{j}"
      )(x, train)
      features.append(x)
    if self.downsample:
      x = PatchMerging(self.dtype, name="downsample")(x)
    return x, features


class SwinTransformer(nn.Module):
  """EsViT's Swin backbone: NHWC float images of any square size -> (pooled [B, C], regions [B, N, C]).

  `regions` are the stage-4 tokens after the final LayerNorm (row-major, N = 49 at 224, 9 at 96) and
  `pooled` is their mean. Images are expected normalised with the ImageNet mean and std.
  """

  # The fields that fix the parameters and the computation (what an export records).
  ARCHITECTURE_FIELDS: ClassVar[tuple[str, ...]] = (
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "image_size",
    "patch_size",
    "mlp_ratio",
  )
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  image_size: int = 224  # Construction resolution: fixes each block's window and shift.
  patch_size: int = 4
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.1
  remat: bool = False
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """Width of the pooled feature and the region tokens (channels of the last stage).

    Returns:
      embed_dim * 2 ** (number of stages - 1).
    """
    return self.embed_dim * 2 ** (len(self.depths) - 1)

  def setup(self):
    if len(self.depths) != len(self.num_heads):
      raise errors.UserError(f"depths {self.depths} and num_heads {self.num_heads} differ in length.")
    self.patch_embed = PatchEmbed(self.embed_dim, self.patch_size, self.dtype)
    schedule = block_windows(self.image_size, self.patch_size, self.depths, self.window_size)
    rates = np.linspace(0, self.drop_path_rate, sum(self.depths))
    starts = np.cumsum([0, *self.depths])
    self.layers = [
      Stage(
        schedule[i],
        self.num_heads[i],
        tuple(rates[starts[i] : starts[i + 1]]),
        downsample=i < len(self.depths) - 1,
        mlp_ratio=self.mlp_ratio,
        remat=self.remat,
        dtype=self.dtype,
      )
      for i in range(len(self.depths))
    ]
    self.norm = LayerNorm()

  def _block_features(self, images: jax.Array, train: bool) -> list[list[jax.Array]]:
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] < self.patch_size:
      raise errors.UserError(
        f"Expected square NHWC images of at least {self.patch_size}px, got shape {images.shape}."
      )
    x = self.patch_embed(images)
    features = []
    for stage in self.layers:
      x, stage_features = stage(x, train)
      features.append(stage_features)
    return features

  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    last = self._block_features(images, train)[-1][-1]
    regions = self.norm(einops.rearrange(last, "b h w c -> b (h w) c"))
    return regions.mean(axis=1), regions

  def last_blocks(self, images: jax.Array, n: int = 4) -> jax.Array:
    """Concatenated average-pooled outputs of the last n blocks across stages (the linear-probe input).

    Blocks of the last stage go through the final LayerNorm first; earlier ones are pooled as they are
    (spec 5.1): 2304-d for Swin-T/S and 3072-d for Swin-B with n = 4.

    Args:
      images: NHWC float images, ImageNet-normalised, square.
      n: number of last blocks, counted across stages.

    Returns:
      [B, sum of the n blocks' widths] features (evaluation mode, no drop path).
    """
    features = self._block_features(images, train=False)
    last_stage = len(features) - 1
    blocks = [(i, f) for i, stage in enumerate(features) for f in stage][-n:]
    return jnp.concatenate(
      [(self.norm(f) if i == last_stage else f).mean(axis=(1, 2)) for i, f in blocks], axis=-1
    )
