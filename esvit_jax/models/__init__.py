"""Networks: the Swin backbone, the DINO heads and the EsViT multi-crop wrapper."""
from esvit_jax.models.esvit import EsViT, build_esvit
from esvit_jax.models.heads import DINOHead, WeightNormDense
from esvit_jax.models.swin import VARIANTS, SwinTransformer, build_backbone

__all__ = ["EsViT", "build_esvit", "DINOHead", "WeightNormDense", "VARIANTS", "SwinTransformer", "build_backbone"]
