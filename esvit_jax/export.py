"""Pretrained backbones as a self-contained directory: `model.json` (architecture) + `params/` (Orbax).

    model, params = esvit_jax.load_pretrained(path)
    pooled, regions = model.apply({'params': params}, images)  # NHWC float32, ImageNet mean/std normalised

The directory holds the teacher backbone only (the heads are training machinery). It is written at the end
of pretraining, by `python -m esvit_jax.export WORKDIR OUT [--step N]` from any checkpoint, and by the
PyTorch converter; load_pretrained also reads a training workdir directly (its latest checkpoint's teacher).
"""
import argparse
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from esvit_jax import checkpointing
from esvit_jax import sharding as sharding_lib
from esvit_jax import train_step
from esvit_jax.models.swin import SwinTransformer

FORMAT = "esvit_jax.backbone.v1"
ARCHITECTURE_FIELDS = ("embed_dim", "depths", "num_heads", "window_size", "image_size", "patch_size", "mlp_ratio")


def architecture(backbone: SwinTransformer) -> dict[str, Any]:
  """The fields that define a backbone's parameters and computation (not dtype, drop path or remat)."""
  fields = {f: getattr(backbone, f) for f in ARCHITECTURE_FIELDS}
  return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def backbone_from_architecture(arch: dict[str, Any], dtype: Any = jnp.float32) -> SwinTransformer:
  """The evaluation-mode backbone (no drop path) of an exported architecture."""
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items() if k in ARCHITECTURE_FIELDS}
  return SwinTransformer(**fields, drop_path_rate=0.0, dtype=dtype)


def is_export(path: str | os.PathLike) -> bool:
  return (epath.Path(path) / "model.json").exists()


def save_backbone(directory: str | os.PathLike, backbone: SwinTransformer, params: Any, *,
                  source: str = "") -> None:
  """Writes the export directory; a collective call on multi-host runs (every process calls it)."""
  directory = checkpointing.orbax_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "params", params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    meta = {"format": FORMAT, "architecture": architecture(backbone), "source": str(source)}
    (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_backbone(directory: str | os.PathLike, *, dtype: Any = jnp.float32,
                  sharding: jax.sharding.Sharding | None = None) -> tuple[SwinTransformer, Any]:
  """Reads an export directory; parameters are placed with `sharding` (default: the first device)."""
  directory = checkpointing.orbax_path(directory)
  meta_path = directory / "model.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"{directory} is not an exported backbone: {meta_path} is missing.")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path} has format {meta.get('format')!r}; this version reads {FORMAT!r}.")
  model = backbone_from_architecture(meta["architecture"], dtype)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  size = model.image_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
  params = ocp.StandardCheckpointer().restore(directory / "params", target)
  return model, params


def teacher_from_workdir(workdir: str | os.PathLike, *, step: int | None = None, dtype: Any = jnp.float32,
                         sharding: jax.sharding.Sharding | None = None) -> tuple[SwinTransformer, Any]:
  """The teacher backbone of a pretraining checkpoint (the latest unless `step` is given)."""
  workdir = epath.Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  config.sharding = "data"  # Restore replicated, whatever the run used.
  mesh = sharding_lib.make_mesh()
  target = train_step.abstract_train_state(config, mesh, steps_per_epoch=1)
  checkpointer = checkpointing.Checkpointer(workdir)
  steps = checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(f"{workdir} holds no checkpoint to take a teacher from.")
  if step is None:
    state, _ = checkpointer.restore_latest(target)
  elif step in steps:
    state, _ = checkpointer.restore(step, target)
  else:
    raise ValueError(f"{workdir} has no checkpoint of step {step}; it has {steps}.")
  checkpointer.close()
  backbone = train_step.build_model(config).backbone
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = jax.device_put(jax.device_get(state.teacher_params["backbone"]), sharding)
  return backbone_from_architecture(architecture(backbone), dtype), params


def load_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                    sharding: jax.sharding.Sharding | None = None) -> tuple[SwinTransformer, Any]:
  """(model, params) from an export directory or a pretraining workdir, ready for model.apply."""
  path = epath.Path(path)
  if is_export(path):
    return load_backbone(path, dtype=dtype, sharding=sharding)
  if (path / "config.json").exists() and (path / "checkpoints").exists():
    return teacher_from_workdir(path, dtype=dtype, sharding=sharding)
  raise FileNotFoundError(
      f"{path} is neither an exported backbone (with model.json) nor a pretraining workdir (with config.json "
      "and checkpoints/).")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m esvit_jax.export",
      description="Write the teacher backbone of a pretraining checkpoint as an export directory.")
  parser.add_argument("workdir", help="a pretraining workdir")
  parser.add_argument("out", help="the export directory to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  args = parser.parse_args(argv)
  model, params = teacher_from_workdir(args.workdir, step=args.step)
  save_backbone(args.out, model, params, source=f"{args.workdir} step {args.step or 'latest'} (teacher)")
  print(f"Wrote {args.out}: {json.dumps(architecture(model))}")


if __name__ == "__main__":
  main()
