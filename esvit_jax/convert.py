"""Official EsViT PyTorch checkpoints <-> esvit-jax parameters (docs/fidelity.md, Checkpoints).

    python -m esvit_jax.convert from-torch checkpoint.pth OUT [--key teacher|student]
    python -m esvit_jax.convert from-torch checkpoint.pth WORKDIR --full --config CONFIG [--steps-per-epoch N]
    python -m esvit_jax.convert to-torch EXPORT OUT.pth

Both official layouts are read and written: EsViT's Swin, and the ViT (DeiT-Tiny/Small, ViT-Base, patch 16
or 8) of EsViT and DINO, whose full DINO checkpoints add a 'backbone.' prefix that is dropped. Conversion is
driven by our own parameter tree: the architecture is read from the tensor shapes, the
module is built, and every one of its parameters is looked up under its official name. So a missing key,
a mis-shaped tensor or a leftover key can never slip through: all of them are collected into one report
and nothing is written. Buffers (`relative_position_index`) are recomputed and compared, never copied.

Layouts (ours <- torch): Dense kernel [in, out] = Linear weight.T; Conv kernel [kh, kw, in, out] =
weight.permute(2, 3, 1, 0); LayerNorm scale = weight; the weight-normed prototypes keep (g, v):
kernel [256, K] = weight_v.T and scale [1, K] = weight_g.T, so training can continue from them.

torch is an optional extra, imported only where .pth files are read or written.
"""

import argparse
from collections.abc import Mapping, Sequence
import dataclasses
import importlib.util
import math
import pickle
import re
from typing import Any

from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esvit_jax import checkpointing, cli, errors, export, optim, sharding, train_step
from esvit_jax.models import backbones
from esvit_jax.models.heads import DINOHead
from esvit_jax.models.swin import relative_position_index

TORCH_HINT = (
  "Reading or writing PyTorch checkpoints needs torch, an optional extra of esvit-jax: "
  "`pip install torch==2.13.0` (or `make install-torch`)."
)
# Our submodule -> the attribute of the official network that holds it ('' for the backbone itself).
PREFIXES = {"backbone": "", "view_head": "head.", "region_head": "head_dense."}
WRAPPER_PREFIXES = ("module.", "backbone.")  # DistributedDataParallel; DINO's MultiCropWrapper.
INDEX_BUFFER = "attn.relative_position_index"
BIAS_TABLE = "attn.relative_position_bias_table"
# Key fragments of the other backbones that DINO-family checkpoints hold, to say what was found instead.
OTHER_LAYOUTS = (
  ("layer4.", "a ResNet"),
  ("stage0.", "a CvT"),
  ("local_relative_position_bias_table", "a ViL (Vision Longformer)"),
)


class ConversionError(errors.UserError):
  """A checkpoint that cannot be converted exactly; the message lists every problem found."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__("\n  ".join(["Cannot convert the checkpoint:", *self.problems]))


class TorchMissingError(errors.UserError, ImportError):
  """torch is needed (to read or write a .pth file) and is not installed."""


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TorchMissingError(TORCH_HINT) from e
  return torch


# ----------------------------------------------------------------------------------------------------
# Names and layouts: one rule, used in both directions.


def torch_key(path: Sequence[str]) -> str:
  """Our parameter path -> its official key (layers_0/blocks_1/norm1/scale: layers.0.blocks.1.norm1.weight)

  Args:
    path: a flattened parameter path, e.g. ('layers_0', 'blocks_1', 'norm1', 'scale').

  Returns:
    The official state-dict key.
  """
  *modules, leaf = path
  names = []
  for name in modules:
    if indexed := re.fullmatch(r"(layers|blocks)_(\d+)", name):
      names.append(f"{indexed[1]}.{indexed[2]}")
    elif linear := re.fullmatch(r"mlp_(\d+)", name):
      names.append(f"mlp.{2 * int(linear[1])}")  # DINOHead's nn.Sequential: Linear, GELU, Linear, GELU, ...
    else:
      names.append(name)
  if modules and modules[-1] == "last_layer":
    leaf = {"kernel": "weight_v", "scale": "weight_g"}[leaf]
  elif leaf in ("kernel", "scale"):
    leaf = "weight"
  return ".".join([*names, leaf])


def torch_layout(path: Sequence[str], value: np.ndarray, *, inverse: bool = False) -> np.ndarray:
  """Ours -> torch (inverse: torch -> ours): Dense [in, out] <-> Linear [out, in]; Conv [kh, kw, in, out]
  <-> [out, in, kh, kw]; weight-norm g [1, K] <-> [K, 1]; everything else as it is.

  Args:
    path: the parameter's path (its leaf name decides the layout).
    value: the array in the source layout.
    inverse: convert torch -> ours instead.

  Returns:
    The array in the target layout (transposed for kernels and weight-norm g, else value itself).
  """
  if path[-1] != "kernel" and tuple(path[-2:]) != ("last_layer", "scale"):
    return value
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0) if inverse else (3, 2, 0, 1))
  return value.T


def window_of_table(rows: int) -> int | None:
  """The window w of a ((2w-1)^2, heads) relative position bias table, or None if rows is no such square.

  Args:
    rows: the table's first dimension.

  Returns:
    w with (2w - 1)^2 == rows, or None.
  """
  side = math.isqrt(rows)
  return (side + 1) // 2 if side * side == rows and side % 2 == 1 else None


def to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'backbone', 'view_head'?, 'region_head'?} param trees -> the official state dict as numpy arrays.

  The backbone's relative_position_index buffers are included (the official module registers them, so
  load_state_dict(strict=True) expects them); EsViT keeps no attn_mask buffers.

  Args:
    params: some of 'backbone', 'view_head', 'region_head' (param trees of esvit_jax.models.EsViT).

  Returns:
    Official key -> numpy array in torch layout (int64 relative_position_index buffers included).
  """
  unknown = set(params) - set(PREFIXES)
  if unknown:
    raise errors.UserError(f"Unknown parts {sorted(unknown)}; expected some of {sorted(PREFIXES)}.")
  state = {}
  for part, tree in params.items():
    for path, value in traverse_util.flatten_dict(tree).items():
      key = PREFIXES[part] + torch_key(path)
      state[key] = np.array(torch_layout(path, np.asarray(value)), order="C")  # A writable copy.
      if part == "backbone" and key.endswith(BIAS_TABLE):
        window = window_of_table(value.shape[0])
        state[key.replace(BIAS_TABLE, INDEX_BUFFER)] = relative_position_index(window).astype(np.int64)
  return state


# ----------------------------------------------------------------------------------------------------
# From an official state dict.


@dataclasses.dataclass(frozen=True)
class TorchNetwork:
  """One converted network (the teacher or the student of a checkpoint).

  architecture: SwinTransformer fields (the `architecture` of esvit_jax.export).
  params: 'backbone' and, when converted with heads, 'view_head' / 'region_head': the param trees of
    esvit_jax.models.EsViT.
  heads: official head attribute ('head', 'head_dense') -> DINOHead fields when converted, else the
    number of tensors found.
  """

  architecture: dict[str, Any]
  params: dict[str, Any]
  heads: dict[str, dict[str, int]]
  checked_buffers: int

  @property
  def name(self) -> str | None:
    """The official variant this architecture is, for the summary.

    Returns:
      Its registry name (e.g. 'swin_tiny'), or None for a custom architecture.
    """
    return backbones.variant_name(self.architecture)


def strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops 'module.' / 'backbone.' prefixes and renames torch>=2.1 weight-norm parametrizations.

  Args:
    state_dict: an official state dict, possibly wrapped.

  Returns:
    The same values under the bare module's keys.
  """
  stripped = {}
  for key, value in state_dict.items():
    while key.startswith(WRAPPER_PREFIXES):
      key = key.split(".", 1)[1]
    key = key.replace(".parametrizations.weight.original0", ".weight_g")
    key = key.replace(".parametrizations.weight.original1", ".weight_v")
    stripped[key] = value
  return stripped


def _describe(state_dict: Mapping[str, Any]) -> str:
  keys = list(state_dict)
  hints = sorted({what for fragment, what in OTHER_LAYOUTS if any(fragment in k for k in keys)})
  looks = f"it looks like {' or '.join(hints)}. " if hints else ""
  return f"{looks}It has {len(keys)} keys, starting with {keys[:6]}."


VIT_HEAD_DIM = 64  # Every official ViT (3, 6, 12 heads for 192, 384, 768 channels); shapes do not tell heads.


def infer_vit_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """VisionTransformer fields from the shapes of a (prefix-stripped) ViT state dict.

  The patch size comes from the patch convolution, the construction resolution from the position grid and
  the heads from the official head width of 64 (the qkv weight is [3C, C] whatever the heads).

  Args:
    state_dict: key -> array (anything with .shape).

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
  if embed_dim % VIT_HEAD_DIM:
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
    "num_heads": embed_dim // VIT_HEAD_DIM,
    "patch_size": patch,
    "image_size": grid * patch,
    "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
  }


def infer_architecture(state_dict: Mapping[str, Any], image_size: int = 224) -> dict[str, Any]:
  """Backbone fields (backbones.architecture) from the shapes of a (prefix-stripped) backbone state dict.

  A state dict with cls_token or pos_embed is a ViT (see infer_vit_architecture); otherwise a Swin, read
  as follows.

  The window of the config is the largest table's: stages whose construction resolution fits in one
  window use that resolution instead (a W14 model has 169-row tables in stage 4). `image_size` is the
  construction resolution, 224 for every official config.

  Args:
    state_dict: key -> array (anything with .shape).
    image_size: the construction resolution of a Swin.

  Returns:
    The fields of backbones.architecture; raises ConversionError if the keys or shapes do not fit.
  """
  if "cls_token" in state_dict or "pos_embed" in state_dict:
    return infer_vit_architecture(state_dict)
  proj = state_dict.get("patch_embed.proj.weight")
  blocks: dict[int, set[int]] = {}
  for key in state_dict:
    if match := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key):
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if proj is None or len(proj.shape) != 4 or not blocks:
    raise ConversionError(
      [
        f"Not a Swin Transformer state dict (no patch_embed.proj.weight and "
        f"layers.*.blocks.* keys): {_describe(state_dict)}"
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


def _read_part(
  module, sample: jax.Array, state_dict: Mapping[str, Any], prefix: str, problems: list[str]
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
  """Every parameter of `module` read from state_dict[prefix + official name]; records what is wrong.

  Returns the param tree and the official shape expected under each key.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), sample)["params"]
  params, expected = {}, {}
  for path, shape in traverse_util.flatten_dict(shapes).items():
    key = prefix + torch_key(path)
    expected[key] = torch_layout(path, np.broadcast_to(np.float32(0), shape.shape)).shape
    if key not in state_dict:
      problems.append(f"missing key {key} {expected[key]}")
      continue
    value = np.asarray(state_dict[key], np.float32)
    if value.shape != expected[key]:
      problems.append(f"wrong shape for {key}: {value.shape} in the checkpoint, {expected[key]} expected")
      continue
    params[path] = torch_layout(path, value, inverse=True)
  return traverse_util.unflatten_dict(params), expected


def _check_index_buffers(
  state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], problems: list[str]
) -> set[str]:
  """Compares every relative_position_index buffer with the index of its block's window."""
  checked = set()
  for key, value in state_dict.items():
    table = key.replace(INDEX_BUFFER, BIAS_TABLE)
    if not key.endswith(INDEX_BUFFER) or table not in expected:
      continue
    checked.add(key)
    window = window_of_table(expected[table][0])
    if not np.array_equal(np.asarray(value), relative_position_index(window)):
      problems.append(
        f"{key} {tuple(np.shape(value))} differs from the relative position index of the "
        f"block's {window}x{window} window"
      )
  return checked


def convert_state_dict(
  state_dict: Mapping[str, Any], *, image_size: int = 224, with_heads: bool = True
) -> TorchNetwork:
  """An official (student or teacher) state dict -> our parameters; raises ConversionError on any problem.

  With `with_heads`, head.* and head_dense.* become 'view_head' / 'region_head' (DINOHead layout with
  g kept as `scale`, i.e. norm_last_layer=False, the layout of all released runs); otherwise they are only
  counted, as an export holds the backbone alone.

  Args:
    state_dict: official key -> array (torch tensors or numpy), possibly wrapped (strip_wrappers).
    image_size: the construction resolution of a Swin (a ViT's is read from its position grid).
    with_heads: convert the heads too.

  Returns:
    The TorchNetwork, its params as float32 numpy trees.
  """
  state_dict = strip_wrappers(state_dict)
  arch = infer_architecture(state_dict, image_size)
  backbone = backbones.from_architecture(arch)
  problems: list[str] = []
  params = {}
  sample = jnp.zeros((1, backbone.image_size, backbone.image_size, 3))
  params["backbone"], expected = _read_part(backbone, sample, state_dict, "", problems)
  buffers = _check_index_buffers(state_dict, expected, problems)
  used = set(expected) | buffers
  heads = {}
  for part in ("view_head", "region_head"):
    prefix = PREFIXES[part]
    head_keys = {k for k in state_dict if k.startswith(prefix)}
    if not head_keys:
      continue
    name = prefix[:-1]
    if with_heads:
      try:
        heads[name] = infer_head(state_dict, prefix)
      except ConversionError as e:
        problems += e.problems
        used |= head_keys
        continue
      head = DINOHead(**heads[name], norm_last_layer=False)
      params[part], head_expected = _read_part(
        head, jnp.zeros((1, backbone.num_features)), state_dict, prefix, problems
      )
      used |= set(head_expected)
    else:
      weight_v = state_dict.get(prefix + "last_layer.weight_v")
      heads[name] = {
        "tensors": len(head_keys),
        **({} if weight_v is None else {"out_dim": weight_v.shape[0]}),
      }
      used |= head_keys
  problems += [f"unexpected key {k} {tuple(np.shape(v))}" for k, v in state_dict.items() if k not in used]
  if problems:
    raise ConversionError(problems)
  return TorchNetwork(arch, params, heads, len(buffers))


# ----------------------------------------------------------------------------------------------------
# .pth files.


@dataclasses.dataclass(frozen=True)
class TorchCheckpoint:
  """One network of a .pth file as numpy, with what the official training loop saved around it."""

  state_dict: dict[str, np.ndarray]
  key: str | None  # 'teacher' / 'student'; None for a bare state dict.
  centres: dict[str, np.ndarray]  # dino_loss 'center' (view) and 'center_grid' (region), when saved.
  epoch: int | None  # The number of finished epochs.


def _numpy(value: Any) -> np.ndarray:
  """A torch tensor (any float precision) or array -> numpy, floats as float32."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)


def load_torch_file(path: str | epath.PathLike, *, trust_pickle: bool = False) -> Any:
  """torch.load on CPU, restricted to tensors, containers and argparse.Namespace unless trust_pickle.

  The official checkpoint pickles its argparse.Namespace ('args'); allowing that one class keeps the
  safety of weights_only loading. trust_pickle=True runs arbitrary pickled code: only for trusted files.

  Args:
    path: the .pth file (local or any epath path).
    trust_pickle: allow arbitrary pickled objects.

  Returns:
    What the file holds (a checkpoint dict or a state dict of torch tensors); raises ConversionError if it
    pickles other objects and trust_pickle is False.
  """
  torch = _import_torch()
  with epath.Path(path).open("rb") as f:
    if trust_pickle:
      return torch.load(f, map_location="cpu", weights_only=False)
    try:
      with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      first_line = str(e).strip().splitlines()[-1]
      raise ConversionError(
        [
          f"{path} pickles Python objects other than tensors and argparse.Namespace "
          f"({first_line}). If you trust the file, pass --trust-pickle."
        ]
      ) from e


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def select_network(checkpoint: Mapping[str, Any], key: str = "teacher") -> TorchCheckpoint:
  """The `key` network of an official checkpoint dict, or a bare state dict as it is.

  Args:
    checkpoint: what load_torch_file returned.
    key: 'teacher' or 'student'.

  Returns:
    The network as numpy, with the checkpoint's loss centres and epoch when it has them; raises
    ConversionError if neither a state dict nor a checkpoint with `key`.
  """
  if _is_state_dict(checkpoint):
    return TorchCheckpoint({k: _numpy(v) for k, v in checkpoint.items()}, None, {}, None)
  if not isinstance(checkpoint, Mapping) or not _is_state_dict(checkpoint.get(key)):
    entries = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ConversionError(
      [f"Neither a state dict nor a checkpoint with a {key!r} state dict; found {entries}."]
    )
  centres = {k: _numpy(v) for k, v in (checkpoint.get("dino_loss") or {}).items()}
  epoch = checkpoint.get("epoch")
  return TorchCheckpoint(
    {k: _numpy(v) for k, v in checkpoint[key].items()}, key, centres, None if epoch is None else int(epoch)
  )


@dataclasses.dataclass(frozen=True)
class PretrainingCheckpoint:
  """What continuing an official run needs: both networks with both heads, the centres and the epoch.

  The AdamW moments are not converted: a continued run starts them afresh.
  """

  student: TorchNetwork
  teacher: TorchNetwork
  centres: dict[str, np.ndarray]  # 'center' [1, K] for view logits, 'center_grid' [1, K] for region logits.
  epoch: int | None


def read_pretraining_checkpoint(
  path: str | epath.PathLike, *, image_size: int = 224, trust_pickle: bool = False
) -> PretrainingCheckpoint:
  """An official checkpoint.pth -> student and teacher trees {'backbone', 'view_head', 'region_head'}.

  Args:
    path: the official checkpoint.pth.
    image_size: the construction resolution of a Swin.
    trust_pickle: allow arbitrary pickled objects.

  Returns:
    Both networks converted with their heads, the teacher's loss centres and the epoch; raises
    ConversionError for a bare state dict or if student and teacher differ.
  """
  raw = load_torch_file(path, trust_pickle=trust_pickle)
  student, teacher = (select_network(raw, key) for key in ("student", "teacher"))
  if student.key is None:
    raise ConversionError(
      [f"{path} is a bare state dict, not a pretraining checkpoint with student and teacher."]
    )
  networks = [convert_state_dict(n.state_dict, image_size=image_size) for n in (student, teacher)]
  if networks[0].architecture != networks[1].architecture or networks[0].heads != networks[1].heads:
    raise ConversionError(
      [
        f"Student and teacher differ: {networks[0].architecture}, {networks[0].heads} "
        f"against {networks[1].architecture}, {networks[1].heads}."
      ]
    )
  return PretrainingCheckpoint(*networks, teacher.centres, teacher.epoch)


def _count(tree: Any) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def summary(network: TorchNetwork, checkpoint: TorchCheckpoint) -> str:
  """What was converted and what else the checkpoint holds, for the user to check.

  Args:
    network: the converted network.
    checkpoint: the network as read from the file (its key, epoch and centres).

  Returns:
    A few lines of text.
  """
  arch = network.architecture
  what = f"the {checkpoint.key}" if checkpoint.key else "a bare state dict"
  epoch = f" after {checkpoint.epoch} epochs" if checkpoint.epoch is not None else ""
  if arch["family"] == "vit":
    shape = (
      f"{network.name or 'a custom ViT'}/{arch['patch_size']} (embed_dim {arch['embed_dim']}, depth "
      f"{arch['depth']}, heads {arch['num_heads']}, position grid for {arch['image_size']} px)"
    )
    buffers = ""
  else:
    shape = (
      f"{network.name or 'a custom Swin'}, window {arch['window_size']} (embed_dim "
      f"{arch['embed_dim']}, depths {arch['depths']}, heads {arch['num_heads']})"
    )
    buffers = f", {network.checked_buffers} relative_position_index buffers checked"
  lines = [
    f"Converted {what}{epoch}: {shape}, {_count(network.params['backbone']) / 1e6:.2f}M backbone "
    f"parameters{buffers}."
  ]
  for name, fields in network.heads.items():
    if "tensors" in fields:
      out_dim = f", out_dim {fields['out_dim']}" if "out_dim" in fields else ""
      lines.append(f"Found {name} ({fields['tensors']} tensors{out_dim}); heads are not part of an export.")
    else:
      lines.append(f"Converted {name}: DINOHead " + ", ".join(f"{k} {v}" for k, v in fields.items()))
  for name, value in checkpoint.centres.items():
    lines.append(f"Loss centre {name}: shape {value.shape}")
  return "\n".join(lines)


def from_torch(
  checkpoint_path: str,
  out_dir: str,
  *,
  key: str = "teacher",
  image_size: int = 224,
  trust_pickle: bool = False,
) -> str:
  """Writes the backbone of a .pth file as an export directory (esvit_jax.export); returns a summary.

  Args:
    checkpoint_path: an official checkpoint.pth or a bare Swin or ViT state dict.
    out_dir: the export directory to write (new or empty).
    key: which network of a full checkpoint ('teacher' or 'student').
    image_size: the construction resolution of a Swin.
    trust_pickle: allow arbitrary pickled objects.

  Returns:
    summary()'s text and the directory written.
  """
  out = _empty_dir(out_dir)
  checkpoint = select_network(load_torch_file(checkpoint_path, trust_pickle=trust_pickle), key)
  network = convert_state_dict(checkpoint.state_dict, image_size=image_size, with_heads=False)
  backbone = backbones.from_architecture(network.architecture)
  source = f"{checkpoint_path}:{checkpoint.key}" if checkpoint.key else str(checkpoint_path)
  export.save_backbone(out, backbone, jax.device_put(network.params["backbone"]), source=source)
  return f"{summary(network, checkpoint)}\nWrote {out}"


IMAGENET_TRAIN_EXAMPLES = 1_281_167  # The published runs' dataset: steps per epoch = this // batch size.


def _empty_dir(out_dir: str) -> epath.Path:
  out = epath.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise ConversionError([f"{out} exists and is not empty; choose a new directory."])
  return out


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A pretraining config as main.py's --config reads it: 'path/to/config.py[:arg]' -> get_config(arg).

  Args:
    spec: 'path/to/config.py' or 'path/to/config.py:arg'.

  Returns:
    The module's get_config(arg) (get_config() without arg); raises ConversionError if path is no file.
  """
  path, _, arg = spec.partition(":")
  if not epath.Path(path).is_file():
    raise ConversionError([f"--config {spec}: {path} is not a config file (e.g. configs/vit_s16.py)."])
  module_spec = importlib.util.spec_from_file_location("esvit_jax_convert_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _without_unit_scales(params: dict[str, Any]) -> dict[str, Any]:
  """Heads converted with weight_g, for a config with norm_last_layer=True (g fixed at 1, no parameter)."""
  out = dict(params)
  for part in ("view_head", "region_head"):
    if part in out:
      scale = out[part]["last_layer"]["scale"]
      if not np.all(scale == 1):
        raise ConversionError(
          [
            f"{PREFIXES[part]}last_layer.weight_g is not all ones, but the config has "
            "norm_last_layer=True; use --config.model.norm_last_layer=false."
          ]
        )
      last_layer = {k: v for k, v in out[part]["last_layer"].items() if k != "scale"}
      out[part] = {**out[part], "last_layer": last_layer}
  return out


def write_pretraining_checkpoint(
  checkpoint_path: str,
  out_dir: str,
  config_spec: str,
  *,
  steps_per_epoch: int | None = None,
  image_size: int = 224,
  trust_pickle: bool = False,
) -> str:
  """An official checkpoint.pth -> a pretraining workdir that `main.py` continues; returns a summary.

  Args:
    checkpoint_path: an official EsViT or DINO checkpoint with 'student' and 'teacher'.
    out_dir: the workdir to write (new or empty).
    config_spec: the config main.py will continue with, 'path/to/config.py[:arg]'; its backbone must be
      the checkpoint's, the head sizes are taken from the checkpoint.
    steps_per_epoch: optimizer steps per epoch of the run (default: ImageNet-1K at the config's batch).
    image_size: construction resolution of a Swin (a ViT's is read from its position grid).
    trust_pickle: allow arbitrary pickled objects.

  Returns:
    A summary. The workdir holds config.json and one checkpoint at step epoch * steps_per_epoch with both
    networks, both heads and both centres. The optimizer starts afresh at that step, as in the official
    continued runs; a checkpoint without a region head continues with a new one (as the official V -> V+R
    runs did).
  """
  out = _empty_dir(out_dir)
  converted = read_pretraining_checkpoint(checkpoint_path, image_size=image_size, trust_pickle=trust_pickle)
  config = load_config(config_spec)
  arch = converted.teacher.architecture
  expected = backbones.architecture(backbones.backbone_from_config(config.model))
  if arch != expected:
    raise ConversionError([f"--config {config_spec} builds {expected}, the checkpoint holds {arch}."])
  head = converted.teacher.heads["head"]
  head_overrides = {
    k: head[k] for k in ("out_dim", "hidden_dim", "bottleneck_dim") if config.model[k] != head[k]
  }
  config.model.update(head_overrides)
  student, teacher = converted.student.params, converted.teacher.params
  if config.model.norm_last_layer:
    student, teacher = _without_unit_scales(student), _without_unit_scales(teacher)
  steps_per_epoch = steps_per_epoch or IMAGENET_TRAIN_EXAMPLES // config.batch_size
  step = (converted.epoch or 0) * steps_per_epoch

  mesh = sharding.make_mesh(jax.local_devices()[:1])  # main.py restores it onto any mesh.
  state = train_step.create_train_state(
    config, mesh, jax.random.PRNGKey(config.seed), steps_per_epoch=steps_per_epoch
  )
  place = lambda fresh, value: jax.device_put(value, fresh.sharding)  # noqa: E731
  fresh_region = "region_head" not in converted.teacher.params

  def centre(key):
    return place(state.center, converted.centres[key]) if key in converted.centres else state.center  # noqa: E731

  state = state.replace(
    step=place(state.step, np.int32(step)),
    params={**state.params, **jax.tree.map(place, {k: state.params[k] for k in student}, student)},
    teacher_params={
      **state.teacher_params,
      **jax.tree.map(place, {k: state.teacher_params[k] for k in teacher}, teacher),
    },
    opt_state=optim.restarted_at(state.opt_state, step, config, steps_per_epoch=steps_per_epoch),
    center=centre("center"),
    region_center=centre("center_grid"),
  )
  checkpointer = checkpointing.Checkpointer(out)
  checkpointer.save(
    step,
    state,
    {"input_position": step, "config": config.to_json_best_effort(), "converted_from": str(checkpoint_path)},
    force=True,
  )
  checkpointer.wait()
  checkpointer.close()
  (out / "config.json").write_text(config.to_json_best_effort(indent=2))
  notes = [
    f"Wrote {out}: step {step} = epoch {converted.epoch or 0} x {steps_per_epoch} steps per epoch "
    f"(batch {config.batch_size}); the optimizer restarts there, its schedules at the global step."
  ]
  if fresh_region:
    notes.append("The checkpoint has no region head: training continues with a new head_dense and centre.")
  flags = "".join(f" --config.model.{k}={v}" for k, v in head_overrides.items())
  notes.append(f"Continue with: python main.py --config {config_spec}{flags} --workdir {out}")
  teacher_checkpoint = TorchCheckpoint({}, "teacher", converted.centres, converted.epoch)
  return "\n".join([summary(converted.teacher, teacher_checkpoint), *notes])


def to_torch(export_dir: str, out_path: str) -> str:
  """Writes an export's backbone as an official state dict (.pth) that the official Swin or ViT, built with
  NUM_CLASSES 0, loads with strict=True; returns a summary.

  Args:
    export_dir: an export directory (esvit_jax.export).
    out_path: the .pth file to write.

  Returns:
    One line: how many tensors and parameters were written where.
  """
  torch = _import_torch()
  _, params = export.load_backbone(export_dir)
  state = to_state_dict({"backbone": jax.device_get(params)})
  with epath.Path(out_path).open("wb") as f:
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, f)
  return f"Wrote {len(state)} tensors ({_count(params) / 1e6:.2f}M parameters) to {out_path}"


def main(argv: Sequence[str] | None = None) -> None:
  """The command line of the module doc: converts, then prints the summary.

  Args:
    argv: the arguments after the program name (default: sys.argv[1:]).
  """
  parser = argparse.ArgumentParser(prog="python -m esvit_jax.convert", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  read = commands.add_parser("from-torch", help="official .pth checkpoint -> export directory")
  read.add_argument(
    "checkpoint", help="an official EsViT or DINO checkpoint.pth, or a bare Swin or ViT state dict"
  )
  read.add_argument("out", help="the export directory to write (new or empty)")
  read.add_argument(
    "--key",
    default="teacher",
    choices=("teacher", "student"),
    help="which network of a full checkpoint (default: teacher, as for evaluation)",
  )
  read.add_argument(
    "--image-size",
    type=int,
    default=224,
    help="construction resolution of a Swin (224 for every official config); a ViT's is read "
    "from its position embeddings",
  )
  read.add_argument(
    "--trust-pickle",
    action="store_true",
    help="allow arbitrary pickled objects (torch.load weights_only=False): trusted files only",
  )
  read.add_argument(
    "--full",
    action="store_true",
    help="write a pretraining workdir (student, teacher, both heads, centres, epoch) that "
    "main.py continues, instead of an export of one backbone",
  )
  read.add_argument(
    "--config",
    default=None,
    help="with --full: the config main.py continues with, path/to/config.py[:arg] as for "
    "main.py (e.g. configs/swin_t.py:window=14 or configs/vit_s16.py); its backbone "
    "must be the checkpoint's",
  )
  read.add_argument(
    "--steps-per-epoch",
    type=int,
    default=None,
    help=f"with --full: optimizer steps per epoch of the run (default: ImageNet-1K, "
    f"{IMAGENET_TRAIN_EXAMPLES} // batch size)",
  )
  write = commands.add_parser("to-torch", help="export directory -> official state dict .pth")
  write.add_argument("export", help="an export directory (model.json + params/)")
  write.add_argument("out", help="the .pth file to write")
  args = parser.parse_args(argv)
  if args.command == "from-torch" and args.full:
    if not args.config:
      raise ConversionError(["--full needs --config, the config main.py will continue with."])
    print(
      write_pretraining_checkpoint(
        args.checkpoint,
        args.out,
        args.config,
        steps_per_epoch=args.steps_per_epoch,
        image_size=args.image_size,
        trust_pickle=args.trust_pickle,
      )
    )
  elif args.command == "from-torch":
    print(
      from_torch(
        args.checkpoint, args.out, key=args.key, image_size=args.image_size, trust_pickle=args.trust_pickle
      )
    )
  else:
    print(to_torch(args.export, args.out))


if __name__ == "__main__":
  cli.run(main)
