r"""EsViT swin_small pretraining on ImageNet-1K with the published recipe.

python main.py --config configs/swin_s.py --workdir DIR
python main.py --config configs/swin_s.py:window=14 --workdir DIR   # the W=14 variant
"""

from esvit_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, window=7)
  return common.pretrain_config("swin_small", drop_path_rate=0.2, window_size=args.window)
