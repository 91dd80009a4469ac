r"""MAE on the embedded demo dataset, sized for a CPU (the MAE-Lite recipe of configs/mae_common.py, scaled).

  python -m esvit_jax.demo --config configs/mae_demo.py --workdir demo_workdir_mae
  python main.py --config configs/mae_demo.py --workdir demo_workdir_mae/pretrain
  python main.py --config configs/mae_demo.py:task=knn --config.pretrained=demo_workdir_mae/pretrain \
      --workdir demo_workdir_mae/knn
  python main.py --config configs/mae_demo.py:task=finetune --config.pretrained=demo_workdir_mae/pretrain \
      --workdir demo_workdir_mae/finetune

Same code path as ImageNet pretraining: 64 px images of 10 shape/texture classes, one 32 px crop per image
(8 x 8 patches of 4 px, 75% masked), a 4-block ViT encoder of width 96 with heads 16 wide (MAE-Lite's
head width) and a 1-block decoder of width 48.
"""

from esvit_jax.configs import common, finetune, knn, linear_probe, mae_common

CROP = 32


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, task="pretrain", epochs=24)
  data = dict(dataset="demo", eval_split="test", eval_resize=CROP * 9 // 8, eval_crop_size=CROP)
  if args.task == "knn":
    config = knn.get_config()
    config.update(**data, eval_batch_size=200)
    return config
  if args.task == "linear_probe":
    config = linear_probe.get_config()
    config.update(**data, crop_size=CROP, batch_size=256, eval_batch_size=200, epochs=6, lr=0.2)
    config.n_last_blocks = 1  # MAE's linear probe reads the last block's CLS token.
    config.update(log_every_steps=15, shuffle_buffer=1000)
    return config
  if args.task == "finetune":
    config = finetune.small_data_config(CROP)
    config.update(dataset="demo", eval_split="test", canvas_size=64)
    # MAE's network for fine-tuning: the mean patch token through a fresh norm, a head of N(0, 2e-5).
    config.update(pooling="mean_patch", head_init_std=2e-5)
    return config

  config = mae_common.mae_pretrain_config("tiny")
  config.update(**data)
  config.epochs = args.epochs
  # Departures from MAE-Lite's ImageNet recipe, one line each:
  # 32 px crops of 4 px patches (8 x 8 = 64 patches, 16 visible); an encoder of 4 blocks of width 96 and
  # 6 heads, a decoder of width 48 and 3 heads (not 12 x 192 and 96): CPU-sized;
  config.crop_size = CROP
  config.model.update(dict(patch_size=4, image_size=CROP, embed_dim=96, depth=4, num_heads=6))
  config.model.update(dict(decoder_dim=48, decoder_heads=3))
  # crops of 35-100% of a 64 px image (not 8-100%): smaller ones show too little of an object;
  config.crop_scale = (0.35, 1.0)
  # batch 128 (not 4096) and 2 warm-up epochs (not 40): more updates from 4,000 images;
  config.batch_size = 128
  config.warmup_epochs = 2
  # float32 (not bfloat16): bfloat16 matmuls are emulated, hence slow, on most CPUs;
  config.compute_dtype = "float32"
  # the demo images are 64 x 64; a 1,000-image shuffle buffer; monitoring sized to a small dataset.
  config.canvas_size = 64
  config.shuffle_buffer = 1000
  config.log_every_steps = 20
  config.ckpt_every_steps = 200
  config.keep_every_steps = 0
  config.eval_every_steps = 250
  config.knn_train_examples = 4000
  config.knn_eval_examples = 1000
  config.eval_batch_size = 200
  return config
