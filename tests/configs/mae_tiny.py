"""The MAE demo config shrunk until a whole run (compile included) takes seconds: for end-to-end tests.

Its `task=knn`, `task=linear_probe` and `task=finetune` arguments give the demo's evaluations, the probe and
the fine-tuning cut to one epoch.
"""

from esvit_jax.configs import common, mae_demo


def get_config(arg: str | None = None):
  task = common.parse_arg(arg, task="pretrain").task
  config = mae_demo.get_config(f"task={task}")
  if task == "linear_probe":
    config.epochs = 1
  if task == "finetune":
    config.update(epochs=1, warmup_epochs=0)
  if task != "pretrain":
    return config
  config.model.update(dict(embed_dim=32, depth=2, num_heads=4, decoder_dim=16, decoder_heads=2))
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
