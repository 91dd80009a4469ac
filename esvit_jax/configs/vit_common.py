"""The ViT recipe, written as its differences from the Swin recipe of common.py.

The official ViT runs take main_esvit.py's argument defaults, which are DINO's ViT-S/16 100-epoch recipe
(64 images per GPU on 8 GPUs: the same global batch of 512). Against the Swin runs they differ in:
- epochs 100 (Swin: 300);
- teacher temperature 0.04 from the start, no warm-up (Swin: 0.04 -> 0.07 over 30 epochs);
- norm_last_layer True (Swin: False); DINO's ViT-B/16 keeps it False;
- drop path 0.1 for every size, patch 16 (or 8) and no window.
Everything else (AdamW, lr 5e-4 x batch / 256, 10 warm-up epochs, min lr 1e-6, weight decay 0.04 -> 0.4,
momentum 0.996 -> 1, clip 3.0, last layer frozen 1 epoch, out_dim 65536, 2 x 224 + 8 x 96 crops) is shared.
"""

from esvit_jax.configs import common


def vit_pretrain_config(backbone: str, arg: str | None = None):
  """The recipe of 'vit_tiny', 'vit_small' or 'vit_base'.

  Args:
    backbone: the variant name.
    arg: the config argument: 'patch=8' and/or 'dino=true' (view loss only).

  Returns:
    The pretraining config.
  """
  args = common.parse_arg(arg, patch=16, dino=False)
  config = common.pretrain_config(backbone, drop_path_rate=0.1)
  del config.model["window_size"]
  config.model.patch_size = args.patch
  config.epochs = 100
  config.warmup_teacher_temp = config.teacher_temp = 0.04
  config.warmup_teacher_temp_epochs = 0
  config.model.norm_last_layer = backbone != "vit_base"
  config.region_loss_weight = 0.0 if args.dino else 0.5
  return config
