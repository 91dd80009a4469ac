"""Plain ViT backbone (DeiT/ViT-Tiny, -Small, -Base) as EsViT and DINO use it.

What the official ViT does, reproduced here:
- Patch convolution (torch's default init), a CLS token and learned position embeddings for the construction
  resolution (both trunc-normal 0.02), 12 pre-norm blocks (qkv bias, LayerNorm eps 1e-6, exact GELU, MLP
  ratio 4), drop path linear over the depth, then a final LayerNorm.
- Other input sizes: the patch-grid part of the position embeddings is resampled with torch's bicubic
  `F.interpolate(scale_factor=sqrt(new patches / old patches))`, whose cubic coefficient is -0.75 and whose
  source coordinates use that scale factor, not the ratio of the grid sizes; the CLS position is kept.
- Outputs for EsViT: the final-norm CLS token is the view feature, the final-norm patch tokens the regions.

As MAE's encoder (models/mae.py), the same network takes `weight_init="xavier"` (xavier-uniform Dense
layers with the fused qkv as one matrix, the patch convolution xavier-uniform on its flattened
[C, p * p * 3] view, CLS normal 0.02), `fixed_pos_embed=True` (a 2-D sin-cos table that is a constant, not a
parameter) and the indices of the patch tokens it keeps.
"""

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esvit_jax import errors
from esvit_jax.models import swin

VARIANTS = {
  "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16, drop_path_rate=0.1),
  "vit_small": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, drop_path_rate=0.1),
  "vit_base": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, drop_path_rate=0.1),
}
CUBIC_COEFFICIENT = -0.75  # torch's bicubic; PIL and jax.image use -0.5.
# Initialisation schemes: name -> (Dense kernel init, patch convolution kernel init, CLS token init).
WEIGHT_INITS = {
  "normal": (swin.dense_init, swin.torch_default_kernel_init, swin.dense_init),  # DINO / EsViT.
  "xavier": (  # MAE: torch's xavier_uniform on Linear weights and on the [C, p * p * 3] patch kernel.
    nn.initializers.xavier_uniform(),
    nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1),
    nn.initializers.normal(stddev=0.02),
  ),
}


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """MAE's 1-D sin-cos code: sin(p w_k) in the first dim / 2 channels, cos(p w_k) in the rest, with
  frequencies w_k = 10000^(-k / (dim / 2)), k = 0 .. dim / 2 - 1.

  Args:
    dim: the code's width, even.
    positions: any array of positions (flattened).

  Returns:
    float64 numpy [positions.size, dim].
  """
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = positions.reshape(-1)[:, None].astype(np.float64) * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed(dim: int, grid_size: int) -> np.ndarray:
  """MAE's fixed 2-D sin-cos position table of a grid_size x grid_size patch grid, with a CLS row of zeros.

  Patch tokens are row-major; the first dim / 2 channels encode the column (x), the last dim / 2 the row
  (y), each as sincos_1d.

  Args:
    dim: the embedding width, a multiple of 4.
    grid_size: patches per side.

  Returns:
    float32 numpy [1 + grid_size^2, dim].
  """
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = CUBIC_COEFFICIENT) -> np.ndarray:
  """[..., 4] weights of the taps at offsets -1, 0, 1, 2 from floor(x), for the fraction t = x - floor(x)."""
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1.
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2.
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, scale_factor: float) -> np.ndarray:
  """[out, in] matrix of torch's 1-D bicubic resampling (align_corners=False) with a given scale factor.

  As torch: out = floor(in * scale_factor), source x = (i + 0.5) / scale_factor - 0.5 (not clamped),
  taps clamped to the border; computed in float64 (torch's own float32 arithmetic is ~1e-6 off it).
  Written here rather than taken from jax.image.resize, whose Keys cubic uses a = -0.5 and the grid-size
  ratio, both unlike the official call.

  Args:
    in_size: the input length.
    scale_factor: torch's scale_factor.

  Returns:
    A float64 [floor(in_size * scale_factor), in_size] numpy matrix.
  """
  out_size = math.floor(in_size * scale_factor)
  source = (np.arange(out_size, dtype=np.float64) + 0.5) / scale_factor - 0.5
  first = np.floor(source).astype(np.int64)
  weights = _cubic_weights(source - first)
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    np.add.at(matrix, (np.arange(out_size), np.clip(first - 1 + tap, 0, in_size - 1)), weights[:, tap])
  return matrix


def interpolate_pos_embed(pos_embed: jax.Array, num_patches: int) -> jax.Array:
  """[1, 1 + N, C] position embeddings of a sqrt(N) grid -> [1, 1 + num_patches, C], as the official code.

  Args:
    pos_embed: [1, 1 + N, C], the CLS position first.
    num_patches: the new number of patches, a square.

  Returns:
    [1, 1 + num_patches, C] (pos_embed itself when N == num_patches); raises UserError where torch's
    bicubic would give another grid size.
  """
  old = pos_embed.shape[1] - 1
  if old == num_patches:
    return pos_embed
  side, new_side = math.isqrt(old), math.isqrt(num_patches)
  matrix = bicubic_matrix(side, math.sqrt(num_patches / old))
  if matrix.shape[0] != new_side:
    raise errors.UserError(
      f"The official bicubic interpolation turns the {side}x{side} position grid into "
      f"{matrix.shape[0]}x{matrix.shape[0]}, not the input's {new_side}x{new_side} patches; "
      "choose another input size."
    )
  matrix = jnp.asarray(matrix, jnp.float32)
  grid = pos_embed[0, 1:].reshape(side, side, -1)
  grid = jnp.einsum("yi,xj,ijc->yxc", matrix, matrix, grid, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos_embed[:, :1], grid.reshape(1, num_patches, -1)], axis=1)


class Attention(nn.Module):
  """Global multi-head self-attention over the CLS and patch tokens.

  Sows (collection 'intermediates') the scaled logits q k^T / sqrt(d_h) before the softmax as
  'attention_logits' (what MAE-Lite's attention distillation matches) and the softmax as 'attention'.
  """

  dim: int
  num_heads: int
  dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer = swin.dense_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    qkv = nn.Dense(3 * self.dim, dtype=self.dtype, kernel_init=self.kernel_init, name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, -1), 2, 0)
    q = q * (self.dim // self.num_heads) ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    self.sow("intermediates", "attention_logits", logits)
    attention = jax.nn.softmax(logits, axis=-1)
    self.sow("intermediates", "attention", attention)
    out = jnp.einsum("bhqk,bkhd->bqhd", attention.astype(self.dtype), v).reshape(b, n, self.dim)
    return nn.Dense(self.dim, dtype=self.dtype, kernel_init=self.kernel_init, name="proj")(out)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each with drop path."""

  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer = swin.dense_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    drop_path = swin.DropPath(self.drop_path)
    attention = Attention(dim, self.num_heads, self.dtype, self.kernel_init, name="attn")
    y = attention(swin.LayerNorm(name="norm1")(x))
    x = x + drop_path(y.astype(jnp.float32), deterministic=not train)
    mlp = swin.Mlp(int(dim * self.mlp_ratio), self.dtype, self.kernel_init, name="mlp")
    y = mlp(swin.LayerNorm(name="norm2")(x))
    return x + drop_path(y.astype(jnp.float32), deterministic=not train)


class VisionTransformer(nn.Module):
  """ViT: square NHWC float images (side a multiple of the patch) -> (pooled [B, C], regions [B, N, C]).

  `pooled` is the final-norm CLS token, `regions` the final-norm patch tokens (row-major, N = 36 for a
  96 px crop at patch 16). Images are expected normalised with the ImageNet mean and std.
  """

  # The fields that fix the parameters and the computation (what an export records).
  ARCHITECTURE_FIELDS: ClassVar[tuple[str, ...]] = (
    "embed_dim",
    "depth",
    "num_heads",
    "patch_size",
    "image_size",
    "mlp_ratio",
  )
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 16
  image_size: int = 224  # Construction resolution: the grid of the learned position embeddings.
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.1
  remat: bool = False
  dtype: Any = jnp.float32
  weight_init: str = "normal"  # A key of WEIGHT_INITS.
  fixed_pos_embed: bool = False  # MAE pretraining: the sin-cos table of the input's grid, not a parameter.

  @property
  def num_features(self) -> int:
    """Width of the pooled feature and the region tokens.

    Returns:
      embed_dim.
    """
    return self.embed_dim

  def setup(self):
    if self.image_size % self.patch_size:
      raise errors.UserError(
        f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}."
      )
    if self.weight_init not in WEIGHT_INITS:
      raise errors.UserError(f"weight_init={self.weight_init!r}; use one of {sorted(WEIGHT_INITS)}.")
    dense_init, patch_init, token_init = WEIGHT_INITS[self.weight_init]
    self.patch_embed = swin.PatchEmbed(
      self.embed_dim, self.patch_size, self.dtype, norm=False, kernel_init=patch_init
    )
    self.cls_token = self.param("cls_token", token_init, (1, 1, self.embed_dim))
    if not self.fixed_pos_embed:
      num_patches = (self.image_size // self.patch_size) ** 2
      self.pos_embed = self.param("pos_embed", swin.dense_init, (1, 1 + num_patches, self.embed_dim))
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    rates = np.linspace(0, self.drop_path_rate, self.depth)
    self.blocks = [
      block_cls(self.num_heads, self.mlp_ratio, float(rates[i]), self.dtype, dense_init, name=f"blocks_{i}")
      for i in range(self.depth)
    ]
    self.norm = swin.LayerNorm()

  def _position_table(self, num_patches: int) -> jax.Array:
    """[1, 1 + num_patches, C]: the learned table (resampled to the grid) or the fixed sin-cos one."""
    if self.fixed_pos_embed:
      return jnp.asarray(sincos_pos_embed(self.embed_dim, math.isqrt(num_patches)))[None]
    return interpolate_pos_embed(self.pos_embed, num_patches)

  def _block_outputs(self, images: jax.Array, train: bool, keep: jax.Array | None = None) -> list[jax.Array]:
    """The [B, 1 + N, C] tokens after every block (before the final norm); N = K with `keep` [B, K]."""
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] % self.patch_size:
      raise errors.UserError(
        f"Expected square NHWC images whose side is a multiple of {self.patch_size}, got "
        f"shape {images.shape}."
      )
    x = self.patch_embed(images)
    x = x.reshape(x.shape[0], -1, self.embed_dim)  # Row-major patch tokens.
    positions = self._position_table(x.shape[1])
    x = x + positions[:, 1:]
    if keep is not None:  # MAE: the visible patches only, a static-shape gather per image.
      x = jnp.take_along_axis(x, keep[:, :, None], axis=1)
    cls = jnp.broadcast_to(self.cls_token + positions[:, :1], (x.shape[0], 1, self.embed_dim))
    x = jnp.concatenate([cls, x], axis=1)
    outputs = []
    for block in self.blocks:
      x = block(x, train)
      outputs.append(x)
    return outputs

  def __call__(
    self, images: jax.Array, train: bool = False, keep: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """(final-norm CLS token [B, C], final-norm patch tokens [B, N, C]).

    Args:
      images: NHWC float images, ImageNet-normalised.
      train: drop path on (needs a 'dropout' rng).
      keep: int32 [B, K]: only these patch tokens (row-major indices) enter the blocks, each with its
        position embedding (MAE's visible patches); the regions are then those K tokens in that order.

    Returns:
      (pooled, regions).
    """
    tokens = self.norm(self.tokens(images, train, keep))
    return tokens[:, 0], tokens[:, 1:]

  def tokens(self, images: jax.Array, train: bool = False, keep: jax.Array | None = None) -> jax.Array:
    """The last block's tokens before the final norm (what MAE's fine-tuning pools through a fresh norm).

    Args:
      images: NHWC float images, ImageNet-normalised.
      train: drop path on (needs a 'dropout' rng).
      keep: int32 [B, K]: only these patch tokens enter the blocks (see __call__).

    Returns:
      [B, 1 + N, C]: the CLS token, then the patch tokens.
    """
    return self._block_outputs(images, train, keep)[-1]

  def last_blocks(self, images: jax.Array, n: int = 4, avgpool: bool = False) -> jax.Array:
    """The linear-probe input: the final-norm CLS tokens of the last n blocks, concatenated, followed with
    `avgpool` by the mean of the last block's final-norm patch tokens (DINO: n=4 for ViT-S, n=1 with
    avgpool for ViT-B).

    Args:
      images: NHWC float images, ImageNet-normalised, square, side a multiple of patch_size.
      n: number of last blocks whose CLS token is taken (0: none, with avgpool).
      avgpool: append the mean patch token of the last block.

    Returns:
      [B, (n + avgpool) * embed_dim] features (evaluation mode, no drop path).
    """
    blocks = self._block_outputs(images, train=False)
    cls_tokens = [self.norm(x)[:, 0] for x in blocks[len(blocks) - n :]]
    mean_patch = [self.norm(blocks[-1])[:, 1:].mean(axis=1)] if avgpool else []
    return jnp.concatenate(cls_tokens + mean_patch, axis=-1)
