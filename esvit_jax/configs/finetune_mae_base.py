r"""MAE's fine-tuning of its ViT-B (83.6% ImageNet top-1 after 100 epochs).

  python main.py --config configs/finetune_mae_base.py --config.pretrained=PATH --workdir DIR

PATH: an MAE ViT-B export or pretraining workdir (configs/mae_base.py), or a converted MAE file. The
differences from configs/finetune.py's Swin recipe, each MAE's: batch 1024, lr 5e-4 per 256 images after 5
warm-up epochs and down to 1e-6, layer decay 0.65, no gradient clipping; the mean patch token through a
fresh LayerNorm (the pretrained final norm dropped) and a head initialised N(0, 2e-5). The augmentation is
the Swin recipe's (RandAugment m9, mixup 0.8, CutMix 1.0, smoothing 0.1, erasing 0.25), as are the 100
epochs and drop path 0.1.
"""

from esvit_jax.configs import finetune


def get_config(arg: str | None = None):
  del arg
  config = finetune.finetune_config()
  config.update(
    batch_size=1024,
    lr=5e-4,
    min_lr=1e-6,
    warmup_epochs=5,
    layer_decay=0.65,
    clip_grad=0.0,
    pooling="mean_patch",
    head_init_std=2e-5,
  )
  return config
