"""The MAE pretraining recipes: MAE-Lite's for ViT-Tiny and -Small, the original MAE's for ViT-Base.

What they share (MAE-Lite kept the original's optimisation): 75% of the patches masked per image, the loss
on the masked patches against per-patch normalised pixels, AdamW (0.9, 0.95) with weight decay 0.05 on
every tensor of more than one dimension that is not a bias, lr 1.5e-4 x batch / 256 warmed up from 0 for
40 epochs then a per-step cosine to 0, batch 4096, no gradient clipping, no drop path, one random resized
crop and a horizontal flip per image, no colour operation. MAE-Lite differs from the original in its
encoder heads (12 at every width), its small decoders, crops of scale (0.08, 1) with bilinear or bicubic
resampling drawn per image (the original: (0.2, 1), bicubic) and 400 epochs (the original: 1600).
"""

import ml_collections

from esvit_jax.configs import common

# size -> (backbone, encoder heads, decoder width, decoder blocks, decoder heads).
MODELS = {
  "tiny": ("vit_tiny", 12, 96, 1, 3),
  "small": ("vit_small", 12, 192, 1, 6),
  "base": ("vit_base", 12, 512, 8, 16),
}


def mae_pretrain_config(size: str, lite: bool = True):
  """An MAE pretraining recipe.

  Args:
    size: 'tiny', 'small' or 'base' (a key of MODELS).
    lite: MAE-Lite's crops and epochs (scale (0.08, 1), random interpolation, 400 epochs); False: the
      original MAE's ((0.2, 1), bicubic, 1600 epochs).

  Returns:
    The pretraining config, every field a `--config.NAME=VALUE` override can change.
  """
  backbone, heads, decoder_dim, decoder_depth, decoder_heads = MODELS[size]
  config = common.base_config("mae")
  config.batch_size = 4096
  config.epochs = 400 if lite else 1600
  config.crop_size = 224
  config.crop_scale = (0.08, 1.0) if lite else (0.2, 1.0)
  config.interpolation = "random" if lite else "bicubic"  # 'random': bilinear or bicubic, per image.

  config.model = ml_collections.ConfigDict()
  config.model.backbone = backbone
  config.model.num_heads = heads
  config.model.patch_size = 16
  config.model.image_size = 224  # The grid of the exported encoder's position table.
  config.model.drop_path_rate = 0.0
  config.model.remat = False
  config.model.decoder_dim = decoder_dim
  config.model.decoder_depth = decoder_depth
  config.model.decoder_heads = decoder_heads

  # Objective.
  config.mask_ratio = 0.75
  config.norm_pix_loss = True
  # D-MAE: the attention logits of these 1-based encoder blocks are matched, through a learned mix of
  # heads, to those of a frozen MAE teacher (an export or a pretraining workdir).
  config.distill = ml_collections.ConfigDict()
  config.distill.enabled = False
  config.distill.teacher = ml_collections.FieldReference(None, field_type=str)
  config.distill.blocks = (12,)
  config.distill.teacher_heads = 12
  config.distill.weight = 1.0

  # Optimisation: AdamW, lr = lr * batch_size / 256.
  config.lr = 1.5e-4
  config.min_lr = 0.0
  config.warmup_epochs = 40
  config.weight_decay = 0.05
  config.adam_betas = (0.9, 0.95)
  config.clip_grad = 0.0
  config.eval_every_steps = 0  # MAE's features are judged by fine-tuning; k-NN on demand (configs/knn.py).
  return config
