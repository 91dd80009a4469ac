r"""Linear probe on frozen features of the last 4 blocks (the paper's protocol).

  python main.py --config configs/linear_probe.py --config.pretrained=PATH --workdir DIR

SGD (momentum 0.9, no weight decay) on the concatenated average-pooled outputs of the last 4 blocks of
the frozen teacher backbone (2304-d for Swin-T/S, 3072-d for Swin-B), lr = config.lr * batch / 256 with a
per-epoch cosine schedule, 100 epochs, top-1 on the validation split after every epoch; the best and
the last are reported in DIR/results.json. The official runs tuned lr per model (0.001 to 0.003).
"""

import ml_collections


def get_config(arg: str | None = None):
  del arg
  config = ml_collections.ConfigDict()
  config.task = "linear_probe"
  config.pretrained = ml_collections.FieldReference(None, field_type=str)
  config.dataset = "imagenet2012"
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.train_split = "train"
  config.eval_split = "validation"
  config.crop_size = 224  # RandomResizedCrop(224, scale=crop_scale) + horizontal flip.
  config.crop_scale = (0.08, 1.0)
  config.eval_resize = 256
  config.eval_crop_size = 224
  config.shuffle_buffer = 10_000
  config.n_last_blocks = 4
  config.avgpool_patchtokens = False  # ViT only: append the mean patch token (DINO's ViT-B: n_last_blocks=1).
  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.epochs = 100
  config.lr = 0.001  # Per 256 images.
  config.momentum = 0.9
  config.weight_decay = 0.0
  config.compute_dtype = "float32"
  # Every matmul of the evaluation (features, similarities, probe) in full float32, as the official
  # code, whatever the accelerator's default (TF32 on GPUs, one bfloat16 pass on TPUs).
  config.matmul_precision = "highest"
  config.log_every_steps = 100
  config.keep_ckpts = 2
  config.seed = 0
  return config
