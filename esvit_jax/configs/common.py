"""The EsViT pretraining recipe shared by every pretraining config (docs/fidelity.md: what it reproduces)."""

import ml_collections

from esvit_jax import errors
from esvit_jax.data import constants


def parse_arg(arg: str | None, **defaults):
  """Parses 'k=v,k2=v2' config arguments, typing each value like its default.

  Args:
    arg: the text after the config file's colon (`configs/swin_t.py:window=14`), or None.
    **defaults: every argument the config file accepts, with its default value.

  Returns:
    A ConfigDict of every argument: the given ones typed like their defaults, the others at their defaults.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise errors.UserError(f"Unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    try:
      parsed[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    except ValueError as e:
      raise errors.UserError(f"Config argument {key}={value!r} is not of type {kind.__name__}.") from e
  return parsed


def base_config(method: str):
  """What every pretraining method shares: the data source, input, batch, loop, checkpoints, monitoring.

  Args:
    method: 'esvit' or 'mae'.

  Returns:
    A ConfigDict of those fields, ImageNet-1K by default; the method's recipe adds the rest.
  """
  config = ml_collections.ConfigDict()
  config.task = "pretrain"
  config.method = method  # 'esvit' (view + region losses; DINO with region_loss_weight 0) or 'mae'.
  config.seed = 0

  # Data: one string names the dataset ('demo', a TFDS name, or 'folder:/path').
  config.dataset = "imagenet2012"
  config.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir.
  config.manual_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS manual downloads.
  config.download = False  # Let TFDS download and prepare a dataset that is not prepared yet.
  config.train_split = "train"
  config.eval_split = "validation"
  # 'device': the host decodes each image into a canvas and the train step makes the crops (the default);
  # 'host': the host makes them with the PIL-exact TensorFlow ops (the reference, and slower; EsViT only).
  config.augment_on = "device"
  config.canvas_size = 512  # Device mode: images are shrunk to fit this square (500 x 375 fits whole).
  config.eval_resize = 256
  config.eval_crop_size = 224
  config.shuffle_buffer = 10_000
  config.batch_size = 512  # Global, over all hosts and devices.
  config.epochs = 300
  config.total_steps = ml_collections.FieldReference(None, field_type=int)  # Overrides epochs.
  config.compute_dtype = "bfloat16"

  # Parallelism: 'data' replicates parameters; 'fsdp' shards them over the data axis.
  config.sharding = "data"
  config.fsdp_min_size_mb = 4.0  # Under 'fsdp', smaller tensors stay replicated.

  # Loop, logging, checkpoints, monitoring.
  config.log_every_steps = 100
  config.ckpt_every_steps = 2000
  config.keep_ckpts = 3
  config.keep_every_steps = 50_000
  config.eval_every_steps = 25_000  # Periodic k-NN on a held-out split; 0 disables it.
  config.knn_k = 20
  config.knn_temperature = 0.07
  config.knn_features = "pooled"  # As configs/knn.py's features: 'pooled' or 'mean_patch'.
  config.knn_matmul_precision = "highest"  # The monitor's matmuls, as configs/knn.py's matmul_precision.
  config.knn_train_examples = 50_000  # Examples of the train split used as the k-NN memory bank.
  config.knn_eval_examples = 10_000
  config.eval_batch_size = 256  # Global batch of feature extraction.
  config.profile_steps = 0  # > 0: trace that many steps after the first few.
  return config


def pretrain_config(backbone: str, drop_path_rate: float, window_size: int = 7):
  """The published EsViT recipe: batch 512, 300 epochs, ImageNet-1K, view + region losses.

  Args:
    backbone: a registered Swin or ViT name (esvit_jax.models), e.g. 'swin_tiny'.
    drop_path_rate: the backbone's stochastic depth rate.
    window_size: the Swin attention window (7 or 14).

  Returns:
    The pretraining config, every field a `--config.NAME=VALUE` override can change.
  """
  config = base_config("esvit")
  config.global_crop_size = 224
  config.local_crop_size = 96
  config.num_local_crops = 8
  config.global_crop_scale = (0.4, 1.0)
  config.local_crop_scale = (0.05, 0.4)
  config.color_jitter = tuple(constants.JITTER_STRENGTH.values())  # Brightness, contrast, saturation, hue.
  config.blur_sigma = constants.BLUR_SIGMA  # Range of the Gaussian blur's sigma, in crop pixels.

  # Model: a Swin backbone with a view head and a region head.
  config.model = ml_collections.ConfigDict()
  config.model.backbone = backbone
  config.model.window_size = window_size
  config.model.image_size = 224  # Construction resolution: fixes each block's window and shift.
  config.model.drop_path_rate = drop_path_rate  # Student only; the teacher runs without drop path.
  config.model.out_dim = 65536
  config.model.hidden_dim = 2048
  config.model.bottleneck_dim = 256
  config.model.norm_last_layer = False
  config.model.remat = False

  # Objective.
  config.region_loss_weight = 0.5  # 0 gives plain DINO (view loss only).
  config.student_temp = 0.1
  config.teacher_temp = 0.07
  config.warmup_teacher_temp = 0.04
  config.warmup_teacher_temp_epochs = 30
  config.center_momentum = 0.9

  # Optimisation: AdamW, lr = lr * batch_size / 256.
  config.lr = 5e-4
  config.min_lr = 1e-6
  config.warmup_epochs = 10
  config.weight_decay = 0.04
  config.weight_decay_end = 0.4
  config.clip_grad = 3.0
  config.freeze_last_layer_epochs = 1
  config.momentum_teacher = 0.996
  # Warn (once) when the teacher's output stays near-uniform, or on one prototype, this many log intervals.
  config.collapse_patience = 10
  return config
