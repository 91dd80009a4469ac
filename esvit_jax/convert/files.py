"""Official .pth files: loading them safely, finding the network inside, and the files we write.

torch is an optional extra, imported only where .pth files are read or written.
"""

import argparse
from collections.abc import Mapping
import dataclasses
import importlib.util
import pickle
from typing import Any

from etils import epath
import ml_collections
import numpy as np

from esvit_jax.convert.layout import ConversionError, import_torch


@dataclasses.dataclass(frozen=True)
class TorchCheckpoint:
  """One network of a .pth file as numpy, with what the official training loop saved around it."""

  state_dict: dict[str, np.ndarray]
  key: str | None  # 'teacher' / 'student' / 'model'; None for a bare state dict.
  centres: dict[str, np.ndarray]  # dino_loss 'center' (view) and 'center_grid' (region), when saved.
  epoch: int | None  # The number of finished epochs.
  others: tuple[
    str, ...
  ] = ()  # The file's other entries ('optimizer', 'start_epoch=400', ...): not converted.


def numpy_array(value: Any) -> np.ndarray:
  """A torch tensor (any float precision) or array -> numpy, floats as float32.

  Args:
    value: a torch tensor or anything np.asarray takes.

  Returns:
    The numpy array.
  """
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
  torch = import_torch()
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


def is_state_dict(obj: Any) -> bool:
  """Whether obj is a non-empty mapping of arrays (tensors or numpy).

  Args:
    obj: anything a checkpoint holds.

  Returns:
    True for a state dict.
  """
  return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _entry(name: str, value: Any) -> str:
  """An entry of a checkpoint for the summary: scalars with their value, anything else by name."""
  if hasattr(value, "item") and np.ndim(value) == 0:
    value = value.item()
  return f"{name}={value}" if isinstance(value, int | float | str) else name


def select_network(checkpoint: Mapping[str, Any], key: str = "teacher") -> TorchCheckpoint:
  """The `key` network of an official checkpoint dict, its 'model' entry when it has no teacher and no
  student (MAE and MAE-Lite), or a bare state dict as it is.

  Args:
    checkpoint: what load_torch_file returned.
    key: 'teacher' or 'student'.

  Returns:
    The network as numpy, with the checkpoint's loss centres, epoch and other entries; raises
    ConversionError if neither a state dict nor a checkpoint with `key` (or 'model').
  """
  if is_state_dict(checkpoint):
    return TorchCheckpoint({k: numpy_array(v) for k, v in checkpoint.items()}, None, {}, None)
  if isinstance(checkpoint, Mapping) and not {"teacher", "student"} & set(checkpoint):
    if is_state_dict(checkpoint.get("model")):
      key = "model"
  if not isinstance(checkpoint, Mapping) or not is_state_dict(checkpoint.get(key)):
    entries = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ConversionError(
      [f"Neither a state dict nor a checkpoint with a {key!r} state dict; found {entries}."]
    )
  centres = {k: numpy_array(v) for k, v in (checkpoint.get("dino_loss") or {}).items()}
  epoch = checkpoint.get("epoch")
  others = tuple(_entry(name, value) for name, value in checkpoint.items() if name != key)
  return TorchCheckpoint(
    {k: numpy_array(v) for k, v in checkpoint[key].items()},
    key,
    centres,
    None if epoch is None else int(epoch),
    others,
  )


def empty_dir(out_dir: str) -> epath.Path:
  """The directory a conversion writes, refused when it exists and holds anything.

  Args:
    out_dir: the directory.

  Returns:
    Its path; raises ConversionError if it is not empty.
  """
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
