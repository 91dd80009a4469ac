"""Names and layouts shared by every converter: our parameter path <-> the official key, array layouts
both ways, wrapper prefixes, and reading a parameter tree out of a state dict with every problem recorded.

Layouts (ours <- torch): Dense kernel [in, out] = Linear weight.T; Conv kernel [kh, kw, in, out] =
weight.permute(2, 3, 1, 0); LayerNorm scale = weight; the weight-normed prototypes keep (g, v):
kernel [256, K] = weight_v.T and scale [1, K] = weight_g.T, so training can continue from them.
"""

from collections.abc import Callable, Mapping, Sequence
import math
import re
from typing import Any

from flax import traverse_util
import jax
import numpy as np

from esvit_jax import errors
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


class ConversionError(errors.UserError):
  """A checkpoint that cannot be converted exactly; the message lists every problem found."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__("\n  ".join(["Cannot convert the checkpoint:", *self.problems]))


class TorchMissingError(errors.UserError, ImportError):
  """torch is needed (to read or write a .pth file) and is not installed."""


def import_torch():
  """torch, imported only where a .pth file is read or written (it is an optional extra).

  Returns:
    The torch module; raises TorchMissingError if it is not installed.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise TorchMissingError(TORCH_HINT) from e
  return torch


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
    if indexed := re.fullmatch(r"(layers|blocks|decoder_blocks)_(\d+)", name):
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


def strip_wrappers(
  state_dict: Mapping[str, Any], prefixes: tuple[str, ...] = WRAPPER_PREFIXES
) -> dict[str, Any]:
  """Drops wrapper prefixes (any number, in any order) and renames torch>=2.1 weight-norm parametrizations.

  Args:
    state_dict: an official state dict, possibly wrapped.
    prefixes: the wrappers' prefixes (default: 'module.' and 'backbone.', EsViT's and DINO's).

  Returns:
    The same values under the bare module's keys.
  """
  stripped = {}
  for key, value in state_dict.items():
    while key.startswith(prefixes):
      key = key.split(".", 1)[1]
    key = key.replace(".parametrizations.weight.original0", ".weight_g")
    key = key.replace(".parametrizations.weight.original1", ".weight_v")
    stripped[key] = value
  return stripped


def read_params(
  shapes: Mapping[str, Any],
  state_dict: Mapping[str, Any],
  key_of: Callable[[tuple[str, ...]], str],
  problems: list[str],
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
  """Every parameter of a tree read from state_dict[key_of(path)]; appends what is wrong to `problems`.

  Args:
    shapes: our param tree of anything with .shape (e.g. jax.eval_shape of an init).
    state_dict: official key -> array, prefix-stripped.
    key_of: our flattened path -> its official key.
    problems: the report, appended to.

  Returns:
    The param tree (float32 numpy, our layout; missing or mis-shaped leaves left out) and the official
    shape expected under each key.
  """
  params, expected = {}, {}
  for path, shape in traverse_util.flatten_dict(shapes).items():
    key = key_of(path)
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


def module_shapes(module, sample: jax.Array) -> dict[str, Any]:
  """The param tree of `module` as shapes, without computing anything.

  Args:
    module: a flax module.
    sample: an input of the right shape.

  Returns:
    jax.eval_shape of its init's 'params'.
  """
  return jax.eval_shape(module.init, jax.random.key(0), sample)["params"]


def check_index_buffers(
  state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], problems: list[str]
) -> set[str]:
  """Compares every relative_position_index buffer with the index of its block's window.

  Args:
    state_dict: official key -> array, prefix-stripped.
    expected: the official shape under each key read (read_params).
    problems: the report, appended to.

  Returns:
    The buffer keys checked.
  """
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


def count_params(tree: Any) -> int:
  """The number of values in a tree of arrays.

  Args:
    tree: a pytree of arrays.

  Returns:
    The sum of their sizes.
  """
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
