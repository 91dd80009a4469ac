"""EsViT network: a backbone with an unshared view head and region head, run over multi-crop views."""
import functools
from typing import Any, Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from esvit_jax.models.heads import DINOHead
from esvit_jax.models.swin import build_backbone

BACKBONE_FIELDS = ("window_size", "image_size", "drop_path_rate", "embed_dim", "depths", "num_heads",
                   "patch_size", "mlp_ratio", "remat")


class EsViT(nn.Module):
  """Backbone + view head (on pooled features) + region head (on every final-norm region token).

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
  """The EsViT network described by config.model (see configs/common.py)."""
  overrides = {k: model_config[k] for k in BACKBONE_FIELDS if k in model_config}
  backbone = build_backbone(model_config["backbone"], dtype=dtype, **overrides)
  head = functools.partial(DINOHead, out_dim=model_config["out_dim"], hidden_dim=model_config["hidden_dim"],
                           bottleneck_dim=model_config["bottleneck_dim"],
                           norm_last_layer=model_config["norm_last_layer"], dtype=dtype)
  return EsViT(backbone=backbone, view_head=head(), region_head=head() if use_region_head else None)
