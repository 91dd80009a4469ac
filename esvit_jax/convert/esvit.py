"""EsViT and DINO checkpoints (Swin or ViT, teacher and student, DINO heads, loss centres) <-> an export or
a pretraining workdir, and an export -> the official backbone's state dict.

Conversion is driven by our own parameter tree: the architecture is read from the tensor shapes, the
module is built, and every one of its parameters is looked up under its official name. So a missing key,
a mis-shaped tensor or a leftover key can never slip through: all of them are collected into one report
and nothing is written. Buffers (`relative_position_index`) are recomputed and compared, never copied.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esvit_jax import checkpointing, export, optim, sharding, train_step
from esvit_jax.convert.architecture import infer_architecture, infer_head
from esvit_jax.convert.files import TorchCheckpoint, empty_dir, load_config, load_torch_file, select_network
from esvit_jax.convert.layout import (
  PREFIXES,
  ConversionError,
  check_index_buffers,
  count_params,
  import_torch,
  module_shapes,
  read_params,
  strip_wrappers,
  to_state_dict,
  torch_key,
)
from esvit_jax.models import backbones
from esvit_jax.models.heads import DINOHead


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


def convert_state_dict(
  state_dict: Mapping[str, Any],
  *,
  image_size: int = 224,
  with_heads: bool = True,
  num_heads: int | None = None,
) -> TorchNetwork:
  """An official (student or teacher) state dict -> our parameters; raises ConversionError on any problem.

  With `with_heads`, head.* and head_dense.* become 'view_head' / 'region_head' (DINOHead layout with
  g kept as `scale`, i.e. norm_last_layer=False, the layout of all released runs); otherwise they are only
  counted, as an export holds the backbone alone.

  Args:
    state_dict: official key -> array (torch tensors or numpy), possibly wrapped (strip_wrappers).
    image_size: the construction resolution of a Swin (a ViT's is read from its position grid).
    with_heads: convert the heads too.
    num_heads: a ViT's heads, when known (default: the official head width 64 of EsViT and DINO).

  Returns:
    The TorchNetwork, its params as float32 numpy trees.
  """
  state_dict = strip_wrappers(state_dict)
  arch = infer_architecture(state_dict, image_size, num_heads)
  backbone = backbones.from_architecture(arch)
  problems: list[str] = []
  params = {}
  sample = jnp.zeros((1, backbone.image_size, backbone.image_size, 3))
  params["backbone"], expected = read_params(module_shapes(backbone, sample), state_dict, torch_key, problems)
  buffers = check_index_buffers(state_dict, expected, problems)
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
      shapes = module_shapes(head, jnp.zeros((1, backbone.num_features)))
      params[part], head_expected = read_params(
        shapes, state_dict, lambda path, prefix=prefix: prefix + torch_key(path), problems
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
  if student.key != "student":
    what = "a bare state dict" if student.key is None else f"a checkpoint with a {student.key!r} entry (MAE)"
    raise ConversionError(
      [
        f"{path} is {what}, not an EsViT or DINO pretraining checkpoint with student and teacher; "
        "an MAE continues with an MAE --config (e.g. configs/mae_tiny.py); without --full any converts to an "
        "export."
      ]
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
    f"Converted {what}{epoch}: {shape}, {count_params(network.params['backbone']) / 1e6:.2f}M backbone "
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


def export_network(
  checkpoint: TorchCheckpoint,
  out: epath.Path,
  source: str,
  *,
  image_size: int = 224,
  num_heads: int | None = None,
) -> str:
  """Writes the backbone of an EsViT or DINO network as an export directory (esvit_jax.export).

  Args:
    checkpoint: the network, as select_network found it.
    out: the export directory to write (new or empty).
    source: where the weights came from, recorded in the export.
    image_size: the construction resolution of a Swin.
    num_heads: a ViT's heads, when known (default: the official head width 64).

  Returns:
    summary()'s text and the directory written.
  """
  network = convert_state_dict(
    checkpoint.state_dict, image_size=image_size, with_heads=False, num_heads=num_heads
  )
  backbone = backbones.from_architecture(network.architecture)
  export.save_backbone(out, backbone, jax.device_put(network.params["backbone"]), source=source)
  return f"{summary(network, checkpoint)}\nWrote {out}"


IMAGENET_TRAIN_EXAMPLES = 1_281_167  # The published runs' dataset: steps per epoch = this // batch size.


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


def save_workdir(
  out: epath.Path, step: int, state: Any, config: ml_collections.ConfigDict, source: Any
) -> None:
  """Writes a converted train state as a pretraining workdir main.py continues: its checkpoint at `step`
  (the input position too) and config.json.

  Args:
    out: the workdir.
    step: the state's step.
    state: the train state of config's method.
    config: the pretraining config.
    source: the file it was converted from (recorded with the checkpoint).
  """
  checkpointer = checkpointing.Checkpointer(out)
  meta = {"input_position": step, "config": config.to_json_best_effort(), "converted_from": str(source)}
  checkpointer.save(step, state, meta, force=True)
  checkpointer.wait()
  checkpointer.close()
  (out / "config.json").write_text(config.to_json_best_effort(indent=2))


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
  out = empty_dir(out_dir)
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
  save_workdir(out, step, state, config, checkpoint_path)
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
  torch = import_torch()
  _, params = export.load_backbone(export_dir)
  state = to_state_dict({"backbone": jax.device_get(params)})
  with epath.Path(out_path).open("wb") as f:
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, f)
  return f"Wrote {len(state)} tensors ({count_params(params) / 1e6:.2f}M parameters) to {out_path}"
