"""A backbone with a linear classifier on a pooled feature: the network that fine-tuning trains.

Parameters: {'backbone': the backbone's, 'head': the linear layer's} and, for 'mean_patch' pooling,
'fc_norm'. With 'mean_patch' the backbone's final norm is never called, so the tree has no 'norm' under
'backbone' (MAE's fine-tuning drops the pretrained one).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from esvit_jax.errors import UserError
from esvit_jax.models import swin, vit

# How the feature the head reads is pooled:
#   'cls': a ViT's final-norm CLS token;
#   'mean_patch': a ViT's patch tokens of the last block averaged, then a fresh LayerNorm (`fc_norm`);
#   'pooled': the backbone's own pooled output (a Swin's mean of its final-norm tokens; a ViT's CLS token).
POOLINGS = ("cls", "mean_patch", "pooled")


def check_pooling(backbone: nn.Module, pooling: str) -> None:
  """Raises UserError unless `pooling` is one of POOLINGS that `backbone` has.

  Args:
    backbone: a SwinTransformer or VisionTransformer.
    pooling: a key of POOLINGS.
  """
  if pooling not in POOLINGS:
    raise UserError(f"pooling={pooling!r}; use one of {POOLINGS}.")
  if pooling != "pooled" and not isinstance(backbone, vit.VisionTransformer):
    raise UserError(f"pooling={pooling!r} needs a ViT (it has a CLS token); use 'pooled' for a Swin.")


class Classifier(nn.Module):
  """images -> logits [B, num_classes]: backbone, pooling, a linear head.

  Attributes:
    backbone: a SwinTransformer or VisionTransformer.
    num_classes: outputs of the head.
    pooling: a key of POOLINGS.
    head_init_std: the head's weights ~ N(0, std) (MAE: 2e-5, whose cut at +-2 never acts); 0: zeros.
      Its bias is 0.
  """

  backbone: nn.Module
  num_classes: int
  pooling: str = "pooled"
  head_init_std: float = 0.0

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Logits, float32 [B, num_classes].

    Args:
      images: NHWC float images, ImageNet-normalised.
      train: drop path on (needs a 'dropout' rng).

    Returns:
      The head's output.
    """
    check_pooling(self.backbone, self.pooling)
    init = nn.initializers.normal(self.head_init_std) if self.head_init_std else nn.initializers.zeros
    if self.pooling == "mean_patch":
      features = swin.LayerNorm(name="fc_norm")(self.backbone.tokens(images, train)[:, 1:].mean(axis=1))
    else:
      features = self.backbone(images, train)[0]
    features = features.astype(jnp.float32)
    return nn.Dense(self.num_classes, kernel_init=init, bias_init=nn.initializers.zeros, name="head")(
      features
    )
