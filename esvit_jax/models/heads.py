"""The DINO projection head that EsViT uses twice: once on the pooled feature, once on every region token."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from esvit_jax.models.swin import dense_init, torch_default_kernel_init


class WeightNormDense(nn.Module):
  """Bias-free Linear with torch's weight_norm: W[:, k] = g[k] * v[:, k] / ||v[:, k]||.

  `kernel` is v [in, K]; `scale` is g [1, K], a 2-D tensor so that it is weight-decayed like torch's
  weight_g [K, 1]. With `trainable_scale=False` (norm_last_layer=True) g is fixed to 1.
  """

  features: int
  trainable_scale: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.param("kernel", torch_default_kernel_init, (x.shape[-1], self.features))
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    if self.trainable_scale:
      w = w * self.param("scale", nn.initializers.ones, (1, self.features))
    return jnp.dot(x.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)


class DINOHead(nn.Module):
  """MLP (in -> 2048 -> 2048 -> 256, exact GELU) -> L2 normalisation -> weight-normed prototypes (K)."""

  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] features -> [..., K] float32 logits."""
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init, name=f"mlp_{i}")(x)
      x = nn.gelu(x, approximate=False)
    x = nn.Dense(
      self.bottleneck_dim, dtype=self.dtype, kernel_init=dense_init, name=f"mlp_{self.num_layers - 1}"
    )(x)
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize, eps 1e-12.
    return WeightNormDense(self.out_dim, not self.norm_last_layer, self.dtype, name="last_layer")(x)
