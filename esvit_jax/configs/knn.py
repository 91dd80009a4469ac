r"""Weighted k-NN evaluation of a pretrained backbone (DINO protocol).

  python main.py --config configs/knn.py --config.pretrained=PATH --config.dataset=imagenet2012 --workdir DIR

PATH is an export directory (WORKDIR/export, `python -m esvit_jax.export`, `python -m esvit_jax.convert`)
or a pretraining workdir (its latest checkpoint's teacher). Writes DIR/results.json.
"""

import ml_collections


def get_config(arg: str | None = None):
  del arg
  config = ml_collections.ConfigDict()
  config.task = "knn"
  config.pretrained = ml_collections.FieldReference(None, field_type=str)
  config.dataset = "imagenet2012"
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.train_split = "train"  # The memory bank.
  config.eval_split = "validation"  # The queries.
  config.max_train_examples = ml_collections.FieldReference(None, field_type=int)  # None: the whole split.
  config.max_eval_examples = ml_collections.FieldReference(None, field_type=int)
  config.eval_resize = 256
  config.eval_crop_size = 224
  config.eval_batch_size = 256
  config.ks = (10, 20, 100, 200)
  config.temperature = 0.07
  # 'pooled': the backbone's pooled feature (a ViT's CLS token, a Swin's mean token); 'mean_patch': the mean
  # of the final-norm patch tokens (MAE's global pool).
  config.features = "pooled"
  config.compute_dtype = "float32"
  # Every matmul of the evaluation (features, similarities, probe) in full float32, as the official
  # code, whatever the accelerator's default (TF32 on GPUs, one bfloat16 pass on TPUs).
  config.matmul_precision = "highest"
  config.seed = 0
  return config
