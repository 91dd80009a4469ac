"""Networks: the Swin and ViT backbones (one registry), the DINO heads, the EsViT multi-crop wrapper and the
masked autoencoder of MAE."""

from esvit_jax.models.backbones import VARIANTS, backbone_from_config, build_backbone
from esvit_jax.models.esvit import EsViT, build_esvit
from esvit_jax.models.heads import DINOHead, WeightNormDense
from esvit_jax.models.mae import MaskedAutoencoder
from esvit_jax.models.swin import SwinTransformer
from esvit_jax.models.vit import VisionTransformer

__all__ = [
  "EsViT",
  "build_esvit",
  "DINOHead",
  "MaskedAutoencoder",
  "WeightNormDense",
  "VARIANTS",
  "SwinTransformer",
  "VisionTransformer",
  "backbone_from_config",
  "build_backbone",
]
