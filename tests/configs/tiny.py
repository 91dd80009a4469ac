"""The demo config shrunk until a whole run (compile included) takes seconds: for end-to-end tests.

Its `task=knn`, `task=linear_probe` and `task=finetune` arguments give the demo's evaluations, cut to a
fraction of the demo dataset (k-NN) or one epoch, so that the demo runs whole on it in about a minute.
"""

from esvit_jax.configs import common, demo


def get_config(arg: str | None = None):
  task = common.parse_arg(arg, task="pretrain").task
  if task != "pretrain":
    config = demo.get_config(f"task={task}")
    if task == "knn":
      config.update(max_train_examples=512, max_eval_examples=128)
    elif task == "linear_probe":
      config.epochs = 1
    elif task == "finetune":
      config.update(epochs=1, warmup_epochs=0)
    return config
  config = demo.get_config()
  config.model.update(
    dict(
      embed_dim=16,
      depths=(2, 2),
      num_heads=(1, 2),
      image_size=32,
      out_dim=64,
      hidden_dim=32,
      bottleneck_dim=16,
    )
  )
  config.global_crop_size = 32
  config.local_crop_size = 16
  config.num_local_crops = 2
  config.batch_size = 16
  config.total_steps = 6
  config.warmup_epochs = 0
  config.log_every_steps = 1
  config.ckpt_every_steps = 2
  config.keep_ckpts = 10
  config.eval_every_steps = 0
  config.knn_train_examples = 64
  config.knn_eval_examples = 32
  config.eval_batch_size = 32
  return config
