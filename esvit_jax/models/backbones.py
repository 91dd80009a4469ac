"""The one registry of backbones (Swin and ViT variants by name) and the architecture record of an export.

Each backbone class declares its ARCHITECTURE_FIELDS (what fixes its parameters and computation); the
config, the export and the converter read them from there.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from esvit_jax.errors import UserError
from esvit_jax.models import swin, vit

FAMILIES: dict[str, type[nn.Module]] = {"swin": swin.SwinTransformer, "vit": vit.VisionTransformer}
# Variant name -> (family, default fields): the names config.model.backbone accepts.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
  **{name: ("swin", fields) for name, fields in swin.VARIANTS.items()},
  **{name: ("vit", fields) for name, fields in vit.VARIANTS.items()},
}
TRAINING_FIELDS = ("drop_path_rate", "remat")  # Fields of the student only; exports run without them.


def config_fields(name: str) -> tuple[str, ...]:
  """The config.model keys that the backbone `name` reads (architecture and training fields).

  Args:
    name: a key of VARIANTS; raises UserError for another name.

  Returns:
    The field names.
  """
  return FAMILIES[_variant(name)[0]].ARCHITECTURE_FIELDS + TRAINING_FIELDS


def _variant(name: str) -> tuple[str, dict[str, Any]]:
  if name not in VARIANTS:
    raise UserError(f"Unknown backbone {name!r}; choose one of {sorted(VARIANTS)}.")
  return VARIANTS[name]


def _tuples(fields: Mapping[str, Any]) -> dict[str, Any]:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def build_backbone(name: str, **overrides) -> nn.Module:
  """A backbone variant by name, any field overridden.

  Args:
    name: 'swin_tiny', 'swin_small', 'swin_base', 'vit_tiny', 'vit_small' or 'vit_base'.
    **overrides: module fields, e.g. window_size=14 (Swin), patch_size=8 (ViT), drop_path_rate=0.0, dtype.

  Returns:
    The flax module (SwinTransformer or VisionTransformer).
  """
  family, fields = _variant(name)
  return FAMILIES[family](**_tuples({**fields, **overrides}))


def backbone_from_config(model_config: Mapping[str, Any], dtype: Any = jnp.float32) -> nn.Module:
  """The student backbone of config.model: its variant with the fields the config sets.

  Args:
    model_config: config.model (its 'backbone' names the variant).
    dtype: the matmul dtype.

  Returns:
    The flax module, with drop path and remat as configured.
  """
  name = model_config["backbone"]
  overrides = {k: model_config[k] for k in config_fields(name) if k in model_config}
  return build_backbone(name, dtype=dtype, **overrides)


def architecture(backbone: nn.Module) -> dict[str, Any]:
  """{'family', *ARCHITECTURE_FIELDS} of a backbone as JSON values (no dtype, drop path or remat).

  Args:
    backbone: a SwinTransformer or VisionTransformer.

  Returns:
    The architecture record (tuples as lists).
  """
  family = next(f for f, cls in FAMILIES.items() if isinstance(backbone, cls))
  fields = {f: getattr(backbone, f) for f in type(backbone).ARCHITECTURE_FIELDS}
  return {"family": family, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def from_architecture(arch: Mapping[str, Any], dtype: Any = jnp.float32) -> nn.Module:
  """The evaluation-mode backbone (no drop path) of an architecture record; 'family' defaults to 'swin'.

  Args:
    arch: an architecture record (keys other than the family's ARCHITECTURE_FIELDS are ignored).
    dtype: the matmul dtype.

  Returns:
    The flax module.
  """
  family = arch.get("family", "swin")
  if family not in FAMILIES:
    raise UserError(f"Unknown backbone family {family!r}; this version knows {sorted(FAMILIES)}.")
  cls = FAMILIES[family]
  fields = {k: v for k, v in arch.items() if k in cls.ARCHITECTURE_FIELDS}
  return cls(**_tuples(fields), drop_path_rate=0.0, dtype=dtype)


def variant_name(arch: Mapping[str, Any]) -> str | None:
  """The registry name of an architecture record with an official variant's widths, depths and heads (and
  MLP ratio 4, and patch 4 for Swin; a ViT variant comes with patch 16 or 8), else None.

  Args:
    arch: an architecture record.

  Returns:
    A key of VARIANTS, or None.
  """
  family = arch.get("family", "swin")
  if arch.get("mlp_ratio") != 4 or (family == "swin" and arch.get("patch_size") != 4):
    return None
  for name, (variant_family, fields) in VARIANTS.items():
    keys = [k for k in ("embed_dim", "depth", "depths", "num_heads") if k in fields]
    if variant_family == family and all(_tuples(arch).get(k) == _tuples(fields)[k] for k in keys):
      return name
  return None
