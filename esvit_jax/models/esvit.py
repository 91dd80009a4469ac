"""EsViT network: a backbone with an unshared view head and region head, run over multi-crop views."""

from collections.abc import Mapping, Sequence
import functools
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from esvit_jax.models.backbones import backbone_from_config
from esvit_jax.models.heads import DINOHead


class EsViT(nn.Module):
  """Backbone + view head (on pooled features) + region head (on every final-norm region token).

  Any backbone of models.backbones: for a Swin the pooled feature is the mean of the stage-4 tokens, for
  a ViT the CLS token; the regions are the final-norm tokens of the last stage or the patch tokens.

  The student and the EMA teacher are this same module applied to two parameter sets; the teacher runs
  with train=False (no drop path) on the global crops only.
  """

  backbone: nn.Module
  view_head: nn.Module
  region_head: nn.Module | None = None

  def __call__(self, crop_groups: Sequence[jax.Array], train: bool = False) -> list[dict[str, jax.Array]]:
    """crop_groups: one [B, n, H, W, 3] array per crop resolution; one backbone call per group.

    Returns per group: 'view_logits' [B, n, K], 'region_features' [B, n, N, C] and, with a region
    head, 'region_logits' [B, n, N, K]. Crops are merged batch-major ((b n)), so a batch sharded over
    devices stays sharded without any data movement.
    """
    outputs = []
    for crops in crop_groups:
      batch = crops.shape[0]
      pooled, regions = self.backbone(einops.rearrange(crops, "b n h w c -> (b n) h w c"), train=train)
      out = {
        "view_logits": einops.rearrange(self.view_head(pooled), "(b n) k -> b n k", b=batch),
        "region_features": einops.rearrange(regions, "(b n) t c -> b n t c", b=batch),
      }
      if self.region_head is not None:
        out["region_logits"] = einops.rearrange(self.region_head(regions), "(b n) t k -> b n t k", b=batch)
      outputs.append(out)
    return outputs


def build_esvit(model_config: Mapping[str, Any], *, use_region_head: bool, dtype: Any = jnp.float32) -> EsViT:
  """The EsViT network described by config.model (see configs/common.py).

  Args:
    model_config: config.model (backbone fields and out_dim, hidden_dim, bottleneck_dim, norm_last_layer).
    use_region_head: whether to add the region head (the region loss is on).
    dtype: the matmul dtype of the backbone and heads.

  Returns:
    The EsViT module.
  """
  backbone = backbone_from_config(model_config, dtype)
  head = functools.partial(
    DINOHead,
    out_dim=model_config["out_dim"],
    hidden_dim=model_config["hidden_dim"],
    bottleneck_dim=model_config["bottleneck_dim"],
    norm_last_layer=model_config["norm_last_layer"],
    dtype=dtype,
  )
  return EsViT(backbone=backbone, view_head=head(), region_head=head() if use_region_head else None)
