r"""MAE-Small pretraining on ImageNet-1K with the MAE-Lite recipe (12 heads, a 192-wide 1-block decoder).

python main.py --config configs/mae_small.py --workdir DIR
"""

from esvit_jax.configs import mae_common


def get_config(arg: str | None = None):
  del arg
  return mae_common.mae_pretrain_config("small")
