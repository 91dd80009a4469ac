"""Official PyTorch checkpoints <-> esvit-jax parameters (docs/fidelity.md, Checkpoints).

    python -m esvit_jax.convert from-torch checkpoint.pth OUT [--key teacher|student]
    python -m esvit_jax.convert from-torch checkpoint.pth WORKDIR --full --config CONFIG [--steps-per-epoch N]
    python -m esvit_jax.convert from-torch mae_tiny.pth OUT --config configs/mae_tiny.py
    python -m esvit_jax.convert to-torch EXPORT OUT.pth

Read and written: EsViT's Swin and the ViT (DeiT-Tiny/Small, ViT-Base, patch 16 or 8) of EsViT and DINO
(esvit), and MAE and MAE-Lite checkpoints, whose encoder becomes an export and whose whole network (encoder,
decoder, mask token) maps onto our MAE both ways (mae). Any missing, mis-shaped or leftover key is
reported, all together, and nothing is written. The modules: layout (names and array layouts, one rule for
both directions), architecture (what the shapes say), files (.pth files and what they hold), esvit, mae,
command (the command line).

torch is an optional extra, imported only where .pth files are read or written.
"""

from esvit_jax.convert.architecture import (
  VIT_HEAD_DIM,
  infer_architecture,
  infer_head,
  infer_vit_architecture,
)
from esvit_jax.convert.command import from_torch, main
from esvit_jax.convert.esvit import (
  IMAGENET_TRAIN_EXAMPLES,
  PretrainingCheckpoint,
  TorchNetwork,
  convert_state_dict,
  read_pretraining_checkpoint,
  summary,
  to_torch,
  write_pretraining_checkpoint,
)
from esvit_jax.convert.files import TorchCheckpoint, load_config, load_torch_file, select_network
from esvit_jax.convert.layout import (
  PREFIXES,
  WRAPPER_PREFIXES,
  ConversionError,
  TorchMissingError,
  strip_wrappers,
  to_state_dict,
  torch_key,
  torch_layout,
  window_of_table,
)
from esvit_jax.convert.mae import MaeNetwork, mae_params_from_state_dict, mae_state_dict

__all__ = [
  "IMAGENET_TRAIN_EXAMPLES",
  "PREFIXES",
  "VIT_HEAD_DIM",
  "WRAPPER_PREFIXES",
  "ConversionError",
  "MaeNetwork",
  "PretrainingCheckpoint",
  "TorchCheckpoint",
  "TorchMissingError",
  "TorchNetwork",
  "convert_state_dict",
  "from_torch",
  "infer_architecture",
  "infer_head",
  "infer_vit_architecture",
  "load_config",
  "load_torch_file",
  "mae_params_from_state_dict",
  "mae_state_dict",
  "main",
  "read_pretraining_checkpoint",
  "select_network",
  "strip_wrappers",
  "summary",
  "to_state_dict",
  "to_torch",
  "torch_key",
  "torch_layout",
  "window_of_table",
  "write_pretraining_checkpoint",
]
