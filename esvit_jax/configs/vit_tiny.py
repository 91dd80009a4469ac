r"""EsViT (or DINO) vit_tiny pretraining on ImageNet-1K with the official ViT recipe (configs/vit_common.py).

python main.py --config configs/vit_tiny.py --workdir DIR
python main.py --config configs/vit_tiny.py:patch=8 --workdir DIR            # vit_tiny/8
python main.py --config configs/vit_tiny.py:dino=true --workdir DIR          # plain DINO (view loss only)
"""

from esvit_jax.configs import vit_common


def get_config(arg: str | None = None):
  return vit_common.vit_pretrain_config("vit_tiny", arg)
