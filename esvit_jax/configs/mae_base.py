r"""MAE ViT-Base pretraining on ImageNet-1K with the original MAE recipe (decoder 512 wide, 8 blocks).

python main.py --config configs/mae_base.py --workdir DIR
"""

from esvit_jax.configs import mae_common


def get_config(arg: str | None = None):
  del arg
  return mae_common.mae_pretrain_config("base", lite=False)
