r"""EsViT swin_tiny pretraining on ImageNet-1K with the published recipe.

python main.py --config configs/swin_t.py --workdir DIR
python main.py --config configs/swin_t.py:window=14 --workdir DIR   # the W=14 variant
"""

from esvit_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, window=7)
  return common.pretrain_config("swin_tiny", drop_path_rate=0.1, window_size=args.window)
