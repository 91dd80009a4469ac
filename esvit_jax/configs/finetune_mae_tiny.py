r"""MAE-Lite's fine-tuning of MAE-Tiny (its "improved" recipe, 78.0% ImageNet top-1 after 300 epochs).

  python main.py --config configs/finetune_mae_tiny.py --config.pretrained=PATH --workdir DIR

PATH: an MAE-Tiny export or pretraining workdir (configs/mae_tiny.py), or a converted MAE-Lite file. The
differences from configs/finetune.py's Swin recipe, each MAE-Lite's: 300 epochs of batch 1024, lr 1e-3 per
256 images after 5 warm-up epochs and down to 1e-6, layer decay 0.85, no drop path, no gradient clipping;
mixup 0.2 and no CutMix, no label smoothing, RandAugment at magnitude 10, no random erasing; the mean patch
token through a fresh LayerNorm (the pretrained final norm dropped) and a head initialised N(0, 2e-5).
"""

from esvit_jax.configs import finetune


def get_config(arg: str | None = None):
  del arg
  config = finetune.finetune_config()
  config.update(
    epochs=300,
    batch_size=1024,
    lr=1e-3,
    min_lr=1e-6,
    warmup_epochs=5,
    layer_decay=0.85,
    drop_path_rate=0.0,
    clip_grad=0.0,
    mixup_alpha=0.2,
    cutmix_alpha=0.0,
    label_smoothing=0.0,
    randaugment="rand-m10-mstd0.5-inc1",
    reprob=0.0,
    pooling="mean_patch",
    head_init_std=2e-5,
  )
  return config
