"""The masked autoencoder of MAE and MAE-Lite: a ViT encoder on the visible patches, a light decoder.

As the official MAE code:
- Per image, a uniform noise ranks the patches; the lowest int(N * (1 - mask_ratio)) are kept (49 of 196
  at 75%). The ranking `ids_shuffle` can be given, so that two networks (or two implementations) see the
  same mask.
- The encoder (vit.VisionTransformer with fixed sin-cos positions and xavier init) runs on the CLS token
  and the visible patches, then its final norm.
- The decoder projects those tokens to its width, fills the masked positions with one shared mask token,
  puts every token back at its patch index, adds its own fixed sin-cos table, runs its blocks, a LayerNorm
  and a linear prediction of the p * p * 3 pixels of each patch (row, column, channel order); the CLS
  token's prediction is dropped.
Everything has static shapes (gathers by index), so the step shards along the batch under jit.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from esvit_jax.models import swin, vit


def head_mix_name(block: int) -> str:
  """The param holding the head mix of 1-based student `block` (the official attn_adapter.adapter{i}).

  Args:
    block: the 1-based block index.

  Returns:
    The param name.
  """
  return f"attn_adapter{block - 1}"


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """How many patches stay visible: int(N * (1 - mask_ratio)), as the official code (49 of 196 at 0.75).

  Args:
    num_patches: N.
    mask_ratio: the fraction masked.

  Returns:
    The number of visible patches.
  """
  return int(num_patches * (1 - mask_ratio))


def random_ids_shuffle(key: jax.Array, positions: jax.Array, num_patches: int) -> jax.Array:
  """Per-image patch rankings: argsort of uniform noise keyed by (key, the image's stream position).

  An image's mask depends on its position only: the same for any number of devices or hosts, and after a
  resume.

  Args:
    key: a PRNG key (the run's masking key).
    positions: int32 [B], each image's position in the global input stream.
    num_patches: N.

  Returns:
    int32 [B, N]: patch indices, the kept ones first.
  """
  noise = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(key, p), (num_patches,)))(positions)
  return jnp.argsort(noise, axis=1).astype(jnp.int32)


def patch_mask(ids_shuffle: jax.Array, keep: int) -> jax.Array:
  """float32 [B, N]: 1 where the patch is masked (removed), 0 where it is visible.

  Args:
    ids_shuffle: int32 [B, N] rankings (random_ids_shuffle).
    keep: the number of visible patches (num_kept).

  Returns:
    The mask, in patch (row-major) order.
  """
  ranks = jnp.argsort(ids_shuffle, axis=1)  # The official ids_restore: each patch's rank.
  return (ranks >= keep).astype(jnp.float32)


def encoder_export_params(encoder_params: Any, embed_dim: int, grid_size: int) -> Any:
  """The params of the encoder as a plain ViT backbone: its own plus the sin-cos table as `pos_embed`.

  Args:
    encoder_params: params['encoder'] of the MaskedAutoencoder.
    embed_dim: the encoder's width.
    grid_size: patches per side at the construction resolution.

  Returns:
    The VisionTransformer params (what an export holds and the evaluations read).
  """
  return {**encoder_params, "pos_embed": jnp.asarray(vit.sincos_pos_embed(embed_dim, grid_size))[None]}


class MaskedAutoencoder(nn.Module):
  """MAE: images and patch rankings -> (predicted pixels [B, N, p * p * 3], mask [B, N]).

  Attributes:
    encoder: a VisionTransformer (fixed_pos_embed=True, weight_init="xavier" for the official init).
    decoder_dim: the decoder's width.
    decoder_depth: its number of blocks.
    decoder_heads: its attention heads.
    mask_ratio: the fraction of patches masked.
    distill_blocks: D-MAE: 1-based encoder blocks whose attention logits are distilled; each gets a learned
      [heads, teacher_heads] mix of its heads onto the teacher's (PyTorch's default init of the official
      bias-free 1 x 1 convolution: U(+-1 / sqrt(heads))).
    teacher_heads: the teacher's heads (with distill_blocks).
    dtype: the matmul dtype.
  """

  encoder: vit.VisionTransformer
  decoder_dim: int = 96
  decoder_depth: int = 1
  decoder_heads: int = 3
  mask_ratio: float = 0.75
  distill_blocks: tuple[int, ...] = ()
  teacher_heads: int = 12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, images: jax.Array, ids_shuffle: jax.Array, train: bool = False
  ) -> tuple[jax.Array, jax.Array]:
    """Encodes the visible patches and predicts the pixels of every patch.

    Args:
      images: NHWC float images, ImageNet-normalised, square, side a multiple of the patch size.
      ids_shuffle: int32 [B, N] patch rankings, the visible ones first (random_ids_shuffle).
      train: drop path on in the encoder (needs a 'dropout' rng when its rate is above 0).

    Returns:
      (pred float32 [B, N, p * p * 3] in patch order, mask float32 [B, N], 1 = masked).
    """
    heads = self.encoder.num_heads
    for block in self.distill_blocks:  # Read by the loss (losses.attention_distillation_loss).
      self.param(head_mix_name(block), swin.torch_default_bias_init(heads), (heads, self.teacher_heads))
    num_patches = ids_shuffle.shape[1]
    keep = num_kept(num_patches, self.mask_ratio)
    cls, visible = self.encoder(images, train, keep=ids_shuffle[:, :keep])
    init = nn.initializers.xavier_uniform()
    x = nn.Dense(self.decoder_dim, dtype=self.dtype, kernel_init=init, name="decoder_embed")(
      jnp.concatenate([cls[:, None], visible], axis=1)
    ).astype(jnp.float32)
    mask_token = self.param("mask_token", nn.initializers.normal(stddev=0.02), (1, 1, self.decoder_dim))
    b = x.shape[0]
    patches = jnp.concatenate(
      [x[:, 1:], jnp.broadcast_to(mask_token, (b, num_patches - keep, x.shape[-1]))], 1
    )
    ranks = jnp.argsort(ids_shuffle, axis=1)  # Token at rank r goes back to the patch whose rank is r.
    patches = jnp.take_along_axis(patches, ranks[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(vit.sincos_pos_embed(self.decoder_dim, math.isqrt(num_patches)))[None]
    for i in range(self.decoder_depth):
      x = vit.Block(
        self.decoder_heads, self.encoder.mlp_ratio, 0.0, self.dtype, init, name=f"decoder_blocks_{i}"
      )(x)
    x = swin.LayerNorm(name="decoder_norm")(x)
    pixels = self.encoder.patch_size**2 * images.shape[-1]
    pred = nn.Dense(pixels, dtype=self.dtype, kernel_init=init, name="decoder_pred")(x)
    return pred[:, 1:].astype(jnp.float32), patch_mask(ids_shuffle, keep)
