r"""MAE-Tiny pretraining on ImageNet-1K with the MAE-Lite recipe (configs/mae_common.py).

python main.py --config configs/mae_tiny.py --workdir DIR
"""

from esvit_jax.configs import mae_common


def get_config(arg: str | None = None):
  del arg
  return mae_common.mae_pretrain_config("tiny")
