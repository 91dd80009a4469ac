"""esvit-jax: EsViT (Li et al., ICLR 2022) self-supervised Swin pretraining in JAX/Flax."""
