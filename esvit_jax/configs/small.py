r"""The small-data recipe: EsViT on 1k-100k images at low resolution (32 or 64 px), e.g. one's own folder.

  python main.py --config configs/small.py:dataset=folder:/data/mine --workdir DIR
  python main.py --config configs/small.py:dataset=folder:/data/mine,crop=64,epochs=200 --workdir DIR
  python main.py --config configs/small.py:dataset=folder:/data/mine,task=knn \
      --config.pretrained=DIR/export --workdir DIR/knn
  python main.py --config configs/small.py:dataset=folder:/data/mine,task=finetune \
      --config.pretrained=DIR/export --workdir DIR/finetune

Arguments: dataset ('folder:/path' with train/<class>/*.png and val/<class>/..., 'demo' or a TFDS name),
crop (the training and evaluation crop in px, a multiple of 32), epochs, task (pretrain, knn, linear_probe,
finetune: fine-tuning's small-data recipe, configs/finetune.py's small_data_config).
The algorithm is EsViT's (view and region losses, EMA teacher, multi-crop); only the recipe changes. The
collapse warning (config.collapse_patience) and the k-NN monitor (config.eval_every_steps) say early if a
run does not learn. The fewer the images, the more epochs: on 1,437 digits (benchmarks/digits.py) 30
epochs left the k-NN where initialisation put it, 100 and 200 epochs raised it steadily.
"""

from esvit_jax import errors
from esvit_jax.configs import common, finetune, knn, linear_probe
from esvit_jax.data import constants

IMAGENET_CROP = 224  # The crop size DINO's pixel-valued augmentation strengths were chosen for.


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, dataset="folder:", crop=32, epochs=100, task="pretrain")
  if args.crop % 32:
    raise errors.UserError(f"crop={args.crop} must be a multiple of 32 (4 px patches, 3 stages of window 4).")
  data = dict(dataset=args.dataset, eval_resize=args.crop * 9 // 8, eval_crop_size=args.crop)
  if args.task == "knn":
    config = knn.get_config()
    config.update(**data, eval_batch_size=200)
    return config
  if args.task == "linear_probe":
    config = linear_probe.get_config()
    config.update(
      **data,
      crop_size=args.crop,
      batch_size=256,
      eval_batch_size=200,
      epochs=6,
      lr=0.2,
      log_every_steps=15,
      shuffle_buffer=1000,
    )
    return config
  if args.task == "finetune":
    config = finetune.small_data_config(args.crop)
    config.dataset = args.dataset
    return config

  config = common.pretrain_config("swin_tiny", drop_path_rate=0.1, window_size=4)
  config.update(**data)
  config.epochs = args.epochs
  # Departures from the ImageNet recipe (configs/common.py), one line each:
  # a 3-stage Swin of width 32 (not Swin-T's 4 stages of 96): 8 x 8 tokens of a 32 px crop, CPU-sized;
  config.model.update(dict(embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), image_size=args.crop))
  # drop path 0.1 (not 0.2): a shallow network on few images needs little of this regulariser;
  # heads of 1024 prototypes over a 64-d bottleneck (not 65536 over 256): a few classes, few images;
  # a normalised last layer (as DINO's ViT-S recipe) keeps the small heads from collapsing;
  config.model.update(dict(out_dim=1024, hidden_dim=256, bottleneck_dim=64, norm_last_layer=True))
  # two global crops of the training size covering 80-100% (not 40-100%) of the image: at low resolution
  # smaller crops show too little of an object for the two views to be matched by what it is;
  config.global_crop_size = args.crop
  config.global_crop_scale = (0.8, 1.0)
  # no local crops (not 8 of 96 px): half-size crops of 5-40% of a small image match nothing of the
  # global views, and the teacher drifts to uniform outputs (--config.num_local_crops=N puts them back);
  config.num_local_crops = 0
  config.local_crop_size = args.crop // 2
  # strong hue and saturation jitter (not 0.1 / 0.2): otherwise colour alone matches the views of one image;
  config.color_jitter = (0.4, 0.4, 0.8, 0.5)
  # the blur's sigma scaled to the crop (DINO's 0.1-2 px are for 224 px crops; unscaled it erases shapes);
  config.blur_sigma = tuple(s * args.crop / IMAGENET_CROP for s in constants.BLUR_SIGMA)
  # batch 64 (not 512) and 2 warm-up epochs (not 10): more updates from a small dataset;
  config.batch_size = 64
  config.warmup_epochs = 2
  # lr 4e-3 (1e-3 after the batch / 256 scaling; not 5e-4 x 512 / 256): short schedules need larger steps;
  config.lr = 4e-3
  # teacher momentum 0.99 (not 0.996): with a few thousand steps the teacher has to follow faster;
  config.momentum_teacher = 0.99
  # a constant sharp teacher temperature 0.04 (not 0.04 -> 0.07): a soft teacher lets small heads go uniform;
  config.warmup_teacher_temp = config.teacher_temp = 0.04
  # float32 (not bfloat16): bfloat16 matmuls are emulated, hence slow, on most CPUs;
  config.compute_dtype = "float32"
  # a 1,000-image shuffle buffer (not 10,000), and monitoring sized to a small dataset.
  config.shuffle_buffer = 1000
  config.log_every_steps = 20
  config.ckpt_every_steps = 500
  config.keep_every_steps = 0
  config.eval_every_steps = 500
  config.knn_train_examples = 10_000
  config.knn_eval_examples = 2_000
  config.eval_batch_size = 200
  return config
