"""Analytic FLOPs of the EsViT and MAE train steps, for MFU (count the matmuls, 2 FLOPs per multiply-add).

What is counted, per image, on the shapes the hardware really computes:
- Swin block on an H x W map padded to Hp x Wp (multiples of its window w, channels C, MLP ratio r):
    qkv 2*Hp*Wp*C*3C + attention scores 2*Hp*Wp*w^2*C + attention-weighted values 2*Hp*Wp*w^2*C
    + proj 2*Hp*Wp*C*C + MLP 2*H*W*C*rC*2 (the MLP runs on the unpadded map).
- Patch embedding 2*(S/p)^2*(3p^2)*C0, patch merging 2*(h/2)*(w/2)*4C*2C (odd maps padded).
- ViT block on T = 1 + N tokens: qkv 2*T*C*3C + scores 2*T^2*C + weighted values 2*T^2*C + proj 2*T*C*C
  + MLP 2*T*C*rC*2 (the position-embedding resampling, a few small matmuls, is not counted).
- DINO head per row: 2*(C*hid + hid*hid + hid*bot + bot*K); the view head runs once per crop, the region
  head once per region token.
- Loss contractions (losses.py): view CE 2*T*V*K, region similarity 2*T*sum_v(N_v)*N_t*C and region CE
  2*T*sum_v(N_v)*N_t*K (all teacher-student token pairs, as computed).
Training = student forward (2 globals + the locals) + its backward + the teacher forward (2 globals).
The backward of a matmul costs twice its forward (gradients of both operands), except where only one
operand needs a gradient: the patch embedding (the images need none) and the cross-entropy contractions
(the teacher side needs none) cost once their forward; the region similarity (argmax only) has none.
MAE (mae_step_flops), per image of N patches of which K stay visible: the patch embedding on all N, the
encoder blocks on 1 + K tokens, the decoder embedding on 1 + K, the decoder blocks and the pixel
prediction on 1 + N; backward twice the forward except the patch embedding's (once). With distillation,
the head mix of each distilled block's logits 2*H_s*H_t*(1 + K)^2 (backward twice) and the frozen
teacher's forward as far as its last distilled logits: its patch embedding on all N, its blocks before
that one on the same 1 + K tokens, and that block's qkv and scores (XLA drops the rest, which nothing reads).
Elementwise work (softmax, LayerNorm, GELU, the
optimizer, the EMA) is not counted: it is small next to the matmuls and does not run on the matrix units.
"""

from collections.abc import Mapping
from typing import Any

from esvit_jax.models import backbones, mae, swin


def _padded(size: int, multiple: int) -> int:
  return -(-size // multiple) * multiple


def swin_block_flops(height: int, width: int, dim: int, window: int, mlp_ratio: float = 4.0) -> int:
  """Matmul FLOPs of one Swin block on an H x W map.

  Args:
    height: the map's height in tokens.
    width: the map's width in tokens.
    dim: channels C.
    window: window side w (the map is padded to multiples of it for attention).
    mlp_ratio: MLP hidden width / C.

  Returns:
    The forward FLOPs per image.
  """
  padded_tokens = _padded(height, window) * _padded(width, window)
  attention = (
    2 * padded_tokens * dim * 3 * dim + 2 * 2 * padded_tokens * window**2 * dim + 2 * padded_tokens * dim**2
  )
  mlp = 2 * 2 * height * width * dim * int(dim * mlp_ratio)
  return attention + mlp


def vit_block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
  """Matmul FLOPs of one ViT block on `tokens` tokens (CLS included).

  Args:
    tokens: T, the sequence length.
    dim: channels C.
    mlp_ratio: MLP hidden width / C.

  Returns:
    The forward FLOPs per image.
  """
  attention = 2 * tokens * dim * 3 * dim + 2 * 2 * tokens**2 * dim + 2 * tokens * dim**2
  return attention + 2 * 2 * tokens * dim * int(dim * mlp_ratio)


def backbone_flops(arch: Mapping[str, Any], image_size: int) -> dict[str, int]:
  """Forward matmul FLOPs of a backbone on one square image.

  Args:
    arch: backbones.architecture fields ('family' 'swin' when absent).
    image_size: the input's side in pixels.

  Returns:
    {'patch_embed', 'body' (FLOPs), 'tokens' (region tokens), 'features' (their width)}.
  """
  patch, dim = arch["patch_size"], arch["embed_dim"]
  if arch.get("family", "swin") == "vit":
    patches = (image_size // patch) ** 2
    return {
      "patch_embed": 2 * patches * 3 * patch * patch * dim,
      "body": arch["depth"] * vit_block_flops(1 + patches, dim, arch.get("mlp_ratio", 4.0)),
      "tokens": patches,
      "features": dim,
    }
  schedule = swin.block_windows(arch["image_size"], patch, arch["depths"], arch["window_size"])
  side = image_size // patch
  patch_embed = 2 * side * side * 3 * patch * patch * dim
  body = 0
  for stage, windows in enumerate(schedule):
    body += sum(
      swin_block_flops(side, side, dim, window, arch.get("mlp_ratio", 4.0)) for window, _ in windows
    )
    if stage < len(schedule) - 1:
      side = _padded(side, 2) // 2
      body += 2 * side * side * 4 * dim * 2 * dim
      dim *= 2
  return {"patch_embed": patch_embed, "body": body, "tokens": side * side, "features": dim}


def head_flops(in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int) -> int:
  """Forward matmul FLOPs of the 3-layer DINO head on one row.

  Args:
    in_dim: the backbone feature width.
    hidden_dim: width of the two hidden layers.
    bottleneck_dim: width of the bottleneck before the prototypes.
    out_dim: K, the number of prototypes.

  Returns:
    The forward FLOPs per row.
  """
  return 2 * (
    in_dim * hidden_dim + hidden_dim * hidden_dim + hidden_dim * bottleneck_dim + bottleneck_dim * out_dim
  )


def mae_step_flops(config, teacher: Mapping[str, Any] | None = None) -> dict[str, float]:
  """Matmul FLOPs of one MAE (or D-MAE) train step per image, split into parts, and their total ('step').

  Args:
    config: an MAE pretraining config (model with its decoder fields, crop_size, mask_ratio, distill).
    teacher: with config.distill.enabled, the teacher's architecture record (backbones.architecture);
      default ViT-Base/16 with config.distill.teacher_heads heads, D-MAE's teacher.

  Returns:
    {'student_forward', 'student_backward', 'teacher_forward', 'step'} FLOPs per image; the teacher's is 0
    without distillation.
  """
  model = config.model
  arch = backbones.architecture(backbones.backbone_from_config(model))
  size, patch, mlp_ratio = config.crop_size, arch["patch_size"], arch["mlp_ratio"]
  patches = (size // patch) ** 2
  visible = 1 + mae.num_kept(patches, config.mask_ratio)
  decoder = model.decoder_dim
  embed = backbone_flops(arch, size)["patch_embed"]
  body = (
    arch["depth"] * vit_block_flops(visible, arch["embed_dim"], mlp_ratio)
    + 2 * visible * arch["embed_dim"] * decoder
    + model.decoder_depth * vit_block_flops(1 + patches, decoder, mlp_ratio)
    + 2 * (1 + patches) * decoder * patch * patch * 3
  )
  teacher_forward = 0
  if config.distill.enabled:
    heads = config.distill.teacher_heads
    teacher = teacher or backbones.architecture(backbones.build_backbone("vit_base", num_heads=heads))
    body += len(config.distill.blocks) * 2 * arch["num_heads"] * heads * visible**2
    dim, last = teacher["embed_dim"], max(config.distill.blocks)
    teacher_forward = (
      backbone_flops(teacher, size)["patch_embed"]
      + (last - 1) * vit_block_flops(visible, dim, teacher["mlp_ratio"])
      + 2 * visible * dim * 3 * dim
      + 2 * visible**2 * dim
    )
  parts = {
    "student_forward": embed + body,
    "student_backward": embed + 2 * body,
    "teacher_forward": teacher_forward,
  }
  parts["step"] = sum(parts.values())
  return parts


def train_step_flops(config) -> dict[str, float]:
  """Matmul FLOPs of one train step per image, split into parts, and their total ('step').

  Args:
    config: a pretraining config (model, crop sizes and counts, region_loss_weight); an MAE config
      (config.method 'mae') is counted by mae_step_flops.

  Returns:
    {'student_forward', 'student_backward', 'teacher_forward', 'step'} FLOPs per image.
  """
  if config.get("method") == "mae":
    return mae_step_flops(config)
  model = config.model
  arch = backbones.architecture(backbones.backbone_from_config(model))
  crops = [(config.global_crop_size, 2), (config.local_crop_size, config.num_local_crops)]
  crops = [(size, n) for size, n in crops if n]
  region = config.region_loss_weight > 0
  head = head_flops(
    backbone_flops(arch, crops[0][0])["features"], model.hidden_dim, model.bottleneck_dim, model.out_dim
  )

  def network(size: int) -> tuple[int, int, int]:
    """(patch embedding, body + heads, region tokens) forward FLOPs of one crop."""
    b = backbone_flops(arch, size)
    return b["patch_embed"], b["body"] + head * (1 + (b["tokens"] if region else 0)), b["tokens"]

  student_embed = sum(n * network(s)[0] for s, n in crops)
  student_body = sum(n * network(s)[1] for s, n in crops)
  teacher = 2 * sum(network(crops[0][0])[:2])
  num_views = sum(n for _, n in crops)
  teacher_tokens, student_tokens = network(crops[0][0])[2], sum(n * network(s)[2] for s, n in crops)
  features = backbone_flops(arch, crops[0][0])["features"]
  cross_entropy = 2 * 2 * num_views * model.out_dim + (
    2 * 2 * student_tokens * teacher_tokens * model.out_dim if region else 0
  )
  similarity = 2 * 2 * student_tokens * teacher_tokens * features if region else 0
  parts = {
    "student_forward": student_embed + student_body + cross_entropy + similarity,
    "student_backward": student_embed + 2 * student_body + cross_entropy,
    "teacher_forward": teacher,
  }
  parts["step"] = sum(parts.values())
  return parts
