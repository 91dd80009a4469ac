r"""A small Swin pretrained with the full EsViT recipe on the embedded demo dataset, on a CPU.

  python main.py --config configs/demo.py --workdir demo_workdir/pretrain
  python main.py --config configs/demo.py:task=knn --config.pretrained=demo_workdir/pretrain --workdir demo_workdir/knn
  python main.py --config configs/demo.py:task=linear_probe --config.pretrained=demo_workdir/pretrain \
      --workdir demo_workdir/linear_probe
  (`make demo` runs all three through `python -m esvit_jax.demo` and prints what the network learned.)

Same code path as ImageNet pretraining, scaled down: 64 px images of 10 shape/texture classes, two 32 px
global crops (no local crops: see below), a 3-stage Swin (window 4), heads of 1024 prototypes. Sized to
finish on a 2-core CPU in under 10 minutes; k-NN on the demo test split is logged during training.
"""
from configs import common
from configs import knn
from configs import linear_probe

DEMO_DATA = dict(dataset="demo", eval_split="test", eval_resize=36, eval_crop_size=32)


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, task="pretrain", epochs=16)
  if args.task == "knn":
    config = knn.get_config()
    config.update(**DEMO_DATA, eval_batch_size=200)
    return config
  if args.task == "linear_probe":
    config = linear_probe.get_config()
    config.update(**DEMO_DATA, crop_size=32, batch_size=256, eval_batch_size=200, epochs=6, lr=0.2,
                  log_every_steps=15, shuffle_buffer=1000)
    return config
  config = common.pretrain_config("swin_tiny", drop_path_rate=0.1, window_size=4)
  config.update(**DEMO_DATA)
  config.global_crop_size = 32
  config.global_crop_scale = (0.6, 1.0)
  config.num_local_crops = 0
  config.local_crop_size = 16  # For --config.num_local_crops=N.
  config.shuffle_buffer = 1000

  config.model.update(dict(embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), image_size=32,
                           out_dim=1024, hidden_dim=256, bottleneck_dim=64, norm_last_layer=True))
  config.batch_size = 64
  config.epochs = args.epochs
  # Departures from the ImageNet recipe that a few minutes on tiny images need:
  # no local crops (16 px crops of 5-40% of a 64 px image show too little of a shape to be matched with
  # the global views: with 4 of them the teacher drifts to uniform outputs and the k-NN does not rise in
  # the demo's steps) and global crops of 60-100% rather than 40-100% (faster learning; see README);
  # a faster-following teacher, a constant sharp teacher temperature and a normalised last layer keep the
  # small heads from collapsing; strong hue and saturation jitter hide colour, which would otherwise
  # match the crops of one image by itself; the blur's sigma, in pixels, is scaled from DINO's 224 px
  # crops to these 32 px ones (unscaled, the always-blurred first global crop loses its shapes).
  config.lr = 1e-3
  config.warmup_epochs = 2
  config.momentum_teacher = 0.99
  config.warmup_teacher_temp = config.teacher_temp = 0.04
  config.color_jitter = (0.4, 0.4, 0.8, 0.5)
  config.blur_sigma = (0.02, 0.3)
  config.compute_dtype = "float32"  # bfloat16 matmuls are emulated, hence slow, on most CPUs.

  config.log_every_steps = 20
  config.ckpt_every_steps = 200
  config.keep_every_steps = 0
  config.eval_every_steps = 250
  config.knn_train_examples = 4000
  config.knn_eval_examples = 1000
  config.eval_batch_size = 200
  return config
