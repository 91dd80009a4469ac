r"""EsViT (or DINO) vit_base pretraining on ImageNet-1K with the official ViT recipe (configs/vit_common.py).

python main.py --config configs/vit_base.py --workdir DIR
python main.py --config configs/vit_base.py:patch=8 --workdir DIR            # vit_base/8
python main.py --config configs/vit_base.py:dino=true --workdir DIR          # plain DINO (view loss only)
"""

from esvit_jax.configs import vit_common


def get_config(arg: str | None = None):
  return vit_common.vit_pretrain_config("vit_base", arg)
