r"""D-MAE-Tiny: MAE-Tiny pretraining with attention distillation from a frozen MAE ViT-Base.

python -m esvit_jax.convert from-torch mae_pretrain_vit_base.pth TEACHER --config configs/mae_base.py
python main.py --config configs/mae_tiny_distill.py --config.distill.teacher=TEACHER --workdir DIR

The teacher runs on the student's visible patches; the last block's attention logits of the student,
mixed over heads by a learned 12 x 12 matrix, are matched to the teacher's with a mean squared error of
weight 1, added to the reconstruction loss.
"""

from esvit_jax.configs import mae_common


def get_config(arg: str | None = None):
  del arg
  config = mae_common.mae_pretrain_config("tiny")
  config.distill.enabled = True  # The teacher comes from --config.distill.teacher=PATH.
  return config
