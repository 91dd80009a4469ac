"""Pretrained backbones as a self-contained directory: `model.json` (architecture) + `params/` (Orbax).

    model, params = esvit_jax.load_pretrained(path)
    pooled, regions = model.apply({'params': params}, images)  # NHWC float32, ImageNet mean/std normalised

The directory holds the teacher backbone only (the heads are training machinery), or after fine-tuning the
classifier (backbone, pooling and head: `load_pretrained(path, classifier=True)` gives its logits). It is
written at the end of pretraining and of fine-tuning, by `python -m esvit_jax.export WORKDIR OUT
[--step N]` from any pretraining checkpoint, and by the PyTorch converter; load_pretrained also reads a
pretraining workdir directly (its latest checkpoint's teacher).
"""

import argparse
import json
import os
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from esvit_jax import checkpointing, cli
from esvit_jax.errors import NotFoundError, UserError
from esvit_jax.models import backbones, mae
from esvit_jax.models import classifier as classifier_lib

FORMAT = "esvit_jax.backbone.v1"


def is_export(path: str | os.PathLike) -> bool:
  """Whether `path` is an export directory (it holds model.json).

  Args:
    path: any directory.

  Returns:
    True for an export directory.
  """
  return (epath.Path(path) / "model.json").exists()


def save_backbone(
  directory: str | os.PathLike,
  backbone: nn.Module,
  params: Any,
  *,
  source: str = "",
  classifier: classifier_lib.Classifier | None = None,
) -> None:
  """Writes the export directory; a collective call on multi-host runs (every process calls it).

  Args:
    directory: the export directory (created if missing; params/ is overwritten).
    backbone: the backbone module, whose architecture goes to model.json.
    params: its parameters, or with `classifier` the classifier's ({'backbone', 'head', ...}).
    source: where the weights came from, recorded in model.json.
    classifier: a fine-tuned classifier around `backbone`: its head and pooling are saved too.
  """
  directory = checkpointing.orbax_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "params", params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    meta = {"format": FORMAT, "architecture": backbones.architecture(backbone), "source": str(source)}
    if classifier is not None:
      meta["classifier"] = {"num_classes": classifier.num_classes, "pooling": classifier.pooling}
    (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_backbone(
  directory: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  sharding: jax.sharding.Sharding | None = None,
  classifier: bool = False,
) -> tuple[nn.Module, Any]:
  """Reads an export directory; parameters are placed with `sharding` (default: the first device).

  Args:
    directory: the export directory.
    dtype: compute dtype of the returned module.
    sharding: where the parameters go.
    classifier: return the fine-tuned classifier (backbone, pooling and head) of an export that has one.

  Returns:
    The evaluation-mode backbone and its parameters, or with `classifier` the Classifier and its.
  """
  directory = checkpointing.orbax_path(directory)
  meta_path = directory / "model.json"
  if not meta_path.exists():
    raise NotFoundError(f"{directory} is not an exported backbone: {meta_path} is missing.")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != FORMAT:
    raise UserError(f"{meta_path} has format {meta.get('format')!r}; this version reads {FORMAT!r}.")
  model = backbones.from_architecture(meta["architecture"], dtype)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  head = meta.get("classifier")
  if classifier and head is None:
    raise UserError(f"{directory} holds a backbone without a classifier head (it was not fine-tuned).")
  if head is None:
    return model, ocp.StandardCheckpointer().restore(directory / "params", _abstract_params(model, sharding))
  network = classifier_lib.Classifier(model, head["num_classes"], head["pooling"])
  params = ocp.StandardCheckpointer().restore(directory / "params", _abstract_params(network, sharding))
  if classifier:
    return network, params
  if "fc_norm" in params:
    raise UserError(
      f"{directory} is a classifier that pools the mean patch token through its own norm (fc_norm) and has "
      "no final norm: load it with classifier=True."
    )
  return model, params["backbone"]


def _abstract_params(model: nn.Module, sharding: jax.sharding.Sharding) -> Any:
  backbone = model.backbone if isinstance(model, classifier_lib.Classifier) else model
  size = backbone.image_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def teacher_from_workdir(
  workdir: str | os.PathLike,
  *,
  step: int | None = None,
  dtype: Any = jnp.float32,
  sharding: jax.sharding.Sharding | None = None,
) -> tuple[nn.Module, Any]:
  """The backbone of a pretraining checkpoint (the latest unless `step` is given): EsViT's teacher, or MAE's
  encoder with its sin-cos position table as `pos_embed`.

  Only that backbone is read from the checkpoint (an Orbax partial restore): no optimizer, train
  state or heads are built, so loading needs the model code alone.

  Args:
    workdir: a pretraining workdir (config.json and checkpoints/).
    step: the checkpoint to read (None: the latest).
    dtype: compute dtype of the returned module.
    sharding: where the parameters go (default: the first device).

  Returns:
    The evaluation-mode backbone and the teacher's backbone parameters.
  """
  workdir = epath.Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise NotFoundError(
      f"{workdir} is not a pretraining workdir: {config_path} is missing (main.py "
      "writes it with the checkpoints in the --workdir of a pretraining run)."
    )
  if not (workdir / "checkpoints").exists():  # Checked first: the Checkpointer would create the directory.
    raise NotFoundError(
      f"{workdir} holds no checkpoint to take a teacher from: {workdir / 'checkpoints'} is missing."
    )
  config = json.loads(config_path.read_text())
  checkpointer = checkpointing.Checkpointer(workdir)
  steps = checkpointer.all_steps()
  checkpointer.close()
  if not steps:
    raise NotFoundError(f"{workdir} holds no checkpoint to take a teacher from.")
  if step is not None and step not in steps:
    raise UserError(f"{workdir} has no checkpoint of step {step}; it has {steps}.")
  student = backbones.backbone_from_config(config["model"])
  model = backbones.from_architecture(backbones.architecture(student), dtype)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = _abstract_params(model, sharding)
  is_mae = config.get("method") == "mae"
  # EsViT: the teacher's backbone; MAE: the encoder, whose fixed position table is not in the checkpoint.
  path = ("params", "encoder") if is_mae else ("teacher_params", "backbone")
  target = {path[0]: {path[1]: {k: v for k, v in params.items() if not (is_mae and k == "pos_embed")}}}
  state_dir = checkpointer.directory / str(steps[-1] if step is None else step) / "state"
  restored = ocp.PyTreeCheckpointer().restore(
    state_dir,
    args=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    ),
  )
  restored = restored[path[0]][path[1]]
  if is_mae:
    grid_size = model.image_size // model.patch_size
    restored = jax.device_put(mae.encoder_export_params(restored, model.embed_dim, grid_size), sharding)
  return model, restored


def load_pretrained(
  path: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  sharding: jax.sharding.Sharding | None = None,
  classifier: bool = False,
) -> tuple[nn.Module, Any]:
  """(model, params) from an export directory or a pretraining workdir, ready for model.apply.

  Args:
    path: an export directory (model.json + params/) or a pretraining workdir (its latest checkpoint's
      teacher backbone, read alone).
    dtype: compute dtype of the returned module.
    sharding: where the parameters go (default: the first device).
    classifier: the fine-tuned classifier of a fine-tuning export (`model.apply` gives its logits).

  Returns:
    The evaluation-mode backbone (SwinTransformer or VisionTransformer) and its parameters, or with
    `classifier` the Classifier and its.
  """
  path = epath.Path(path)
  if is_export(path):
    return load_backbone(path, dtype=dtype, sharding=sharding, classifier=classifier)
  if classifier:
    raise UserError(f"{path} is not a fine-tuning export: a classifier is read from one (with model.json).")
  if (path / "config.json").exists() and (path / "checkpoints").exists():
    return teacher_from_workdir(path, dtype=dtype, sharding=sharding)
  raise NotFoundError(
    f"{path} is neither an exported backbone (with model.json) nor a pretraining workdir (with config.json "
    "and checkpoints/)."
  )


def main(argv: list[str] | None = None) -> None:
  """`python -m esvit_jax.export WORKDIR OUT [--step N]`: exports a checkpoint's teacher backbone.

  Args:
    argv: the command-line arguments (None: sys.argv[1:]).
  """
  parser = argparse.ArgumentParser(
    prog="python -m esvit_jax.export",
    description="Write the teacher backbone of a pretraining checkpoint as an export directory.",
  )
  parser.add_argument("workdir", help="a pretraining workdir")
  parser.add_argument("out", help="the export directory to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  args = parser.parse_args(argv)
  model, params = teacher_from_workdir(args.workdir, step=args.step)
  save_backbone(args.out, model, params, source=f"{args.workdir} step {args.step or 'latest'} (teacher)")
  print(f"Wrote {args.out}: {json.dumps(backbones.architecture(model))}")


if __name__ == "__main__":
  cli.run(main)
