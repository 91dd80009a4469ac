"""The architecture of an official state dict, read from its keys and tensor shapes (Swin, ViT, DINO heads).

What shapes cannot tell is the number of heads of a ViT (the qkv weight is [3C, C] whatever the heads):
EsViT and DINO use the official head width of 64; any other source of ViT weights must say its heads.
"""

from collections.abc import Mapping
import math
import re
from typing import Any

from esvit_jax.convert.layout import BIAS_TABLE, ConversionError, window_of_table

# Key fragments of the other backbones that DINO-family checkpoints hold, to say what was found instead.
OTHER_LAYOUTS = (
  ("layer4.", "a ResNet"),
  ("stage0.", "a CvT"),
  ("local_relative_position_bias_table", "a ViL (Vision Longformer)"),
)


def describe(state_dict: Mapping[str, Any]) -> str:
  """What a state dict that is not the expected backbone looks like, for an error message.

  Args:
    state_dict: key -> array.

  Returns:
    A sentence or two.
  """
  keys = list(state_dict)
  hints = sorted({what for fragment, what in OTHER_LAYOUTS if any(fragment in k for k in keys)})
  looks = f"it looks like {' or '.join(hints)}. " if hints else ""
  return f"{looks}It has {len(keys)} keys, starting with {keys[:6]}."


VIT_HEAD_DIM = 64  # Every official ViT (3, 6, 12 heads for 192, 384, 768 channels); shapes do not tell heads.


def infer_vit_architecture(state_dict: Mapping[str, Any], num_heads: int | None = None) -> dict[str, Any]:
  """VisionTransformer fields from the shapes of a (prefix-stripped) ViT state dict.

  The patch size comes from the patch convolution, the construction resolution from the position grid and
  the heads, unless given, from the official head width of 64 of EsViT and DINO (the qkv weight is
  [3C, C] whatever the heads).

  Args:
    state_dict: key -> array (anything with .shape).
    num_heads: the number of heads, when the checkpoint's source says it (MAE-Tiny: 12 at width 192).

  Returns:
    The fields ('family' 'vit', embed_dim, depth, num_heads, patch_size, image_size, mlp_ratio); raises
    ConversionError if the keys or shapes are not a ViT's.
  """
  proj, pos_embed = state_dict.get("patch_embed.proj.weight"), state_dict.get("pos_embed")
  blocks = sorted({int(m[1]) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
  problems = []
  if proj is None or len(proj.shape) != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
    problems.append(
      f"patch_embed.proj.weight {None if proj is None else tuple(proj.shape)}: expected (embed_dim, 3, p, p)"
    )
  grid = None if pos_embed is None or len(pos_embed.shape) != 3 else math.isqrt(pos_embed.shape[1] - 1)
  if grid is None or grid * grid != pos_embed.shape[1] - 1:
    shape = None if pos_embed is None else tuple(pos_embed.shape)
    problems.append(f"pos_embed {shape}: expected (1, 1 + g^2, C)")
  if not blocks or blocks != list(range(len(blocks))) or "blocks.0.mlp.fc1.weight" not in state_dict:
    problems.append(f"blocks.N.* are not contiguous from 0 or lack blocks.0.mlp.fc1.weight: found {blocks}")
  if problems:
    raise ConversionError(["Not a ViT state dict: " + "; ".join(problems)])
  embed_dim, patch = int(proj.shape[0]), int(proj.shape[2])
  if num_heads is not None and (num_heads < 1 or embed_dim % num_heads):
    raise ConversionError([f"embed_dim {embed_dim} does not split into {num_heads} heads."])
  if num_heads is None and embed_dim % VIT_HEAD_DIM:
    raise ConversionError(
      [
        f"embed_dim {embed_dim} is not a multiple of the official head width "
        f"{VIT_HEAD_DIM}, so the number of heads cannot be inferred."
      ]
    )
  return {
    "family": "vit",
    "embed_dim": embed_dim,
    "depth": len(blocks),
    "num_heads": num_heads or embed_dim // VIT_HEAD_DIM,
    "patch_size": patch,
    "image_size": grid * patch,
    "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
  }


def infer_architecture(
  state_dict: Mapping[str, Any], image_size: int = 224, num_heads: int | None = None
) -> dict[str, Any]:
  """Backbone fields (backbones.architecture) from the shapes of a (prefix-stripped) backbone state dict.

  A state dict with cls_token or pos_embed is a ViT (see infer_vit_architecture); otherwise a Swin, read
  as follows.

  The window of the config is the largest table's: stages whose construction resolution fits in one
  window use that resolution instead (a W14 model has 169-row tables in stage 4). `image_size` is the
  construction resolution, 224 for every official config.

  Args:
    state_dict: key -> array (anything with .shape).
    image_size: the construction resolution of a Swin.
    num_heads: a ViT's number of heads, when known (a Swin's are read from its tables).

  Returns:
    The fields of backbones.architecture; raises ConversionError if the keys or shapes do not fit.
  """
  if "cls_token" in state_dict or "pos_embed" in state_dict:
    return infer_vit_architecture(state_dict, num_heads)
  if num_heads is not None:
    raise ConversionError(["A Swin's heads are read from its relative position tables; give no heads."])
  proj = state_dict.get("patch_embed.proj.weight")
  blocks: dict[int, set[int]] = {}
  for key in state_dict:
    if match := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key):
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if proj is None or len(proj.shape) != 4 or not blocks:
    raise ConversionError(
      [
        f"Not a Swin Transformer state dict (no patch_embed.proj.weight and "
        f"layers.*.blocks.* keys): {describe(state_dict)}"
      ]
    )
  embed_dim, channels, patch, patch_w = proj.shape
  if channels != 3 or patch != patch_w:
    raise ConversionError(
      [
        f"patch_embed.proj.weight has shape {tuple(proj.shape)}: expected "
        "(embed_dim, 3, p, p), a square patch over RGB images."
      ]
    )
  stages = sorted(blocks)
  if stages != list(range(len(stages))) or any(sorted(b) != list(range(len(b))) for b in blocks.values()):
    found = {i: sorted(b) for i, b in sorted(blocks.items())}
    raise ConversionError([f"Stage and block indices are not contiguous from 0: {found}."])
  tables = [f"layers.{i}.blocks.0.{BIAS_TABLE}" for i in stages]
  missing = [k for k in tables + ["layers.0.blocks.0.mlp.fc1.weight"] if k not in state_dict]
  if missing:
    raise ConversionError([f"Cannot read the architecture, missing keys: {missing}."])
  windows = [window_of_table(state_dict[k].shape[0]) for k in tables]
  if None in windows:
    shapes = {k: tuple(state_dict[k].shape) for k in tables}
    raise ConversionError([f"Relative position tables are not ((2w-1)^2, heads): {shapes}."])
  return {
    "family": "swin",
    "embed_dim": int(embed_dim),
    "depths": [len(blocks[i]) for i in stages],
    "num_heads": [int(state_dict[k].shape[1]) for k in tables],
    "window_size": max(windows),
    "image_size": image_size,
    "patch_size": int(patch),
    "mlp_ratio": state_dict["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
  }


def infer_head(state_dict: Mapping[str, Any], prefix: str) -> dict[str, int]:
  """DINOHead fields from the keys under `prefix` ('head.' or 'head_dense.').

  Args:
    state_dict: a prefix-stripped state dict.
    prefix: the head's key prefix, with its trailing dot.

  Returns:
    {'out_dim', 'hidden_dim', 'bottleneck_dim', 'num_layers'}; raises ConversionError if the keys are not
    a DINOHead's.
  """
  keys = [k for k in state_dict if k.startswith(prefix)]
  linear = sorted(
    int(m[1]) for k in keys if (m := re.fullmatch(re.escape(prefix) + r"mlp\.(\d+)\.weight", k))
  )
  weight_v = state_dict.get(prefix + "last_layer.weight_v")
  if weight_v is None or not linear or linear != list(range(0, 2 * len(linear), 2)):
    raise ConversionError(
      [
        f"{prefix}* is not a DINOHead without BatchNorm (Linear layers at mlp.0, mlp.2, "
        f"..., weight-normed last_layer); found {sorted(keys)[:8]}."
      ]
    )
  return {
    "out_dim": int(weight_v.shape[0]),
    "hidden_dim": int(state_dict[prefix + "mlp.0.weight"].shape[0]),
    "bottleneck_dim": int(weight_v.shape[1]),
    "num_layers": len(linear),
  }
