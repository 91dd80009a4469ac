"""esvit-jax: EsViT (Li et al., ICLR 2022) and DINO self-supervised pretraining of Swin and ViT in JAX/Flax.

model, params = esvit_jax.load_pretrained(path)   # an export directory or a pretraining workdir
pooled, regions = model.apply({'params': params}, images)  # Swin: mean-pooled; ViT: the CLS token
"""

from esvit_jax.export import load_pretrained

__all__ = ["load_pretrained"]
