r"""Fine-tuning the whole pretrained backbone with a new linear head (default: a Swin from EsViT).

  python main.py --config configs/finetune.py --config.pretrained=PATH --workdir DIR
  python main.py --config configs/finetune_mae_tiny.py --config.pretrained=PATH --workdir DIR  # MAE-Lite

PATH is an export, a pretraining workdir (EsViT's teacher, MAE's encoder) or a converted official
checkpoint. Every augmentation is made on the accelerator in the train step (the host only decodes):
RandomResizedCrop + flip, RandAugment, normalisation, random erasing, then mixup / CutMix of the batch.
Top-1 and top-5 on the validation split (resize to crop / crop_ratio, bicubic, centre crop) after every
epoch, of the weights and, with an EMA, of their average; the best and last go to DIR/results.json and the
fine-tuned classifier to DIR/export (`esvit_jax.load_pretrained(DIR/export, classifier=True)`).

The default recipe is SimMIM's fine-tuning of a pretrained Swin (its Swin-B yaml: 100 epochs, batch 2048,
lr 1.25e-3 per 512 images, 20 warm-up epochs, minimum lr 2.5e-7, weight decay 0.05, layer decay 0.9, drop
path 0.1, gradient norm clipped at 5) with the augmentation of Swin's supervised ImageNet training
(RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, CutMix 1.0, label smoothing 0.1, random erasing 0.25, bicubic
crops). EsViT released no fine-tuning recipe.
"""

import ml_collections


def finetune_config() -> ml_collections.ConfigDict:
  """Every fine-tuning field, at the default (Swin) recipe.

  Returns:
    The ConfigDict; configs/finetune_mae_tiny.py and configs/finetune_mae_base.py change the recipe.
  """
  config = ml_collections.ConfigDict()
  config.task = "finetune"
  config.pretrained = ml_collections.FieldReference(None, field_type=str)
  # 'pretrained': start from config.pretrained's weights; 'random': the same network freshly initialised
  # (the baseline that shows what pretraining buys).
  config.init = "pretrained"
  config.seed = 0

  # Data.
  config.dataset = "imagenet2012"
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.train_split = "train"
  config.eval_split = "validation"
  config.canvas_size = 512  # Images are shrunk to fit this square on the host; crops are made on the device.
  config.shuffle_buffer = 10_000

  # Training augmentation (timm's create_transform, then its Mixup), all in the train step.
  config.crop_size = 224
  config.crop_scale = (0.08, 1.0)
  config.interpolation = "bicubic"  # Of the crops: 'bicubic', 'bilinear' or 'random' (either, per image).
  config.randaugment = "rand-m9-mstd0.5-inc1"  # timm's policy string; '' for none.
  config.reprob = 0.25  # Random erasing probability (per image, noise-filled box).
  config.mixup_alpha = 0.8
  config.cutmix_alpha = 1.0
  config.mixup_switch_prob = 0.5  # CutMix instead of mixup, per batch, when both alphas are > 0.
  config.mixup_prob = 1.0  # Batches mixed at all.
  config.label_smoothing = 0.1

  # Evaluation: resize to eval_crop_size / eval_crop_ratio (bicubic), centre crop.
  config.eval_crop_size = 224
  config.eval_crop_ratio = 0.875
  config.eval_batch_size = 1024

  # Network.
  config.pooling = "pooled"  # 'pooled' (Swin's mean token, a ViT's CLS), 'cls', or 'mean_patch' (+ fc_norm).
  config.head_init_std = 0.0  # 0: a zero head; MAE: 2e-5.
  config.drop_path_rate = 0.1
  config.compute_dtype = "bfloat16"

  # Optimisation: AdamW, lr = config.lr * batch / 256, warm-up then cosine per step, scaled per layer.
  config.epochs = 100
  config.batch_size = 2048
  config.lr = 6.25e-4  # Per 256 images (SimMIM: 1.25e-3 per 512).
  config.min_lr = 2.5e-7
  config.warmup_epochs = 20
  config.weight_decay = 0.05  # Not on biases, norms, position tables or the CLS token.
  config.adam_betas = (0.9, 0.999)
  config.layer_decay = 0.9
  config.clip_grad = 5.0  # Global gradient norm; 0: no clipping.
  config.ema_decay = 0.0  # > 0: an EMA of the weights (timm: 0.9999), evaluated beside them.

  # Loop.
  config.sharding = "data"
  config.log_every_steps = 100
  config.keep_ckpts = 2
  return config


def small_data_config(crop: int) -> ml_collections.ConfigDict:
  """The recipe for 1k-100k images at low resolution (configs/small.py:task=finetune and the demos).

  Args:
    crop: the training and evaluation crop in px.

  Returns:
    The ConfigDict; the caller sets the dataset.
  """
  config = finetune_config()
  config.crop_size = config.eval_crop_size = crop
  # Departures from the ImageNet recipe, one line each:
  # a short schedule (5 epochs, 1 of warm-up; not 100 and 20) of batch 128 (not 2048), at lr 4e-3 per 256;
  config.update(epochs=5, warmup_epochs=1, batch_size=128, lr=4e-3, min_lr=1e-6)
  # layer decay 0.5 (not 0.9): in a few epochs the pretrained early layers should move little;
  config.layer_decay = 0.5
  # crops of 80-100% of the image (not 8-100%) and no RandAugment: at low resolution smaller crops, 45%
  # translations and 27-degree rotations show too little of an object (the pretraining crops' reasoning);
  config.update(crop_scale=(0.8, 1.0), randaugment="")
  # no mixup, CutMix, label smoothing, random erasing or drop path: a shallow network, few epochs;
  config.update(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0, reprob=0.0, drop_path_rate=0.0)
  # resize to 9/8 of the crop for evaluation, as the small pretraining recipe;
  config.eval_crop_ratio = 8 / 9
  # float32 (not bfloat16): bfloat16 matmuls are emulated, hence slow, on most CPUs; no gradient clipping;
  config.update(compute_dtype="float32", clip_grad=0.0)
  # a 1,000-image shuffle buffer, evaluation and logging sized to a small dataset.
  config.update(shuffle_buffer=1000, eval_batch_size=200, log_every_steps=20)
  return config


def get_config(arg: str | None = None):
  del arg
  return finetune_config()
