"""Official MAE and MAE-Lite checkpoints <-> ours: the encoder as an export, and the whole masked
autoencoder (encoder, decoder, mask token) as the param tree of esvit_jax.models.mae both ways.

What an official file holds: a dict whose 'model' entry is the state dict (MAE-Lite adds start_epoch,
optimizer, scheduler, scaler and best-accuracy entries; MAE adds optimizer, epoch, scaler and args), its
keys under 'module.model.' (MAE-Lite's DistributedDataParallel around its wrapper), 'module.', 'model.' or
nothing. The encoder has timm's ViT names (cls_token, pos_embed, patch_embed.proj, blocks.N, norm), the
decoder mask_token, decoder_embed, decoder_pos_embed, decoder_blocks.N, decoder_norm and decoder_pred.
D-MAE-Lite files also hold the frozen teacher (tch_model.*) and the head-mix adapter (attn_adapter.*),
which are listed and skipped. Both position tables are fixed 2-D sin-cos tables in MAE: ours recomputes
them, so they are compared with the file's, never copied into the MAE tree.

The number of heads is not in the shapes (192 wide is 3 heads for DeiT-Tiny, 12 for MAE-Tiny): it comes
from the config the user names or from the model name the checkpoint stores, and nothing is guessed.
"""

from collections.abc import Mapping
import dataclasses
import re
from typing import Any

from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esvit_jax import export, mae_step, optim, sharding
from esvit_jax.convert.architecture import infer_vit_architecture
from esvit_jax.convert.esvit import IMAGENET_TRAIN_EXAMPLES, save_workdir
from esvit_jax.convert.files import TorchCheckpoint, empty_dir, load_config, load_torch_file, select_network
from esvit_jax.convert.layout import (
  ConversionError,
  count_params,
  read_params,
  strip_wrappers,
  torch_key,
  torch_layout,
)
from esvit_jax.models import backbones, mae, vit

MAE_PREFIXES = ("module.", "model.")  # DistributedDataParallel; MAE-Lite's wrapper holds the MAE as .model.
# Parts of D-MAE-Lite files that are not the MAE: key prefix -> what it is.
SKIPPED = {"tch_model.": "the distillation teacher", "attn_adapter.": "the head-mix adapter"}
DECODER_KEYS = re.compile(r"mask_token|decoder_(embed|pos_embed|blocks|norm|pred)\b.*")
FIXED_TABLES = ("pos_embed", "decoder_pos_embed")
TABLE_TOLERANCE = 1e-6  # Both are the float64 formula rounded to float32.
# The sizes of the official model names (mae_vit_base_patch16, MAE-Lite's mae_vit_tiny_patch16, ...):
# size -> (embed_dim, heads). MAE-Lite gives Tiny and Small 12 heads.
NAMED_SIZES = {
  "tiny": (192, 12),
  "small": (384, 12),
  "base": (768, 12),
  "large": (1024, 16),
  "huge": (1280, 16),
}


def is_mae(checkpoint: TorchCheckpoint) -> bool:
  """Whether a network read from a .pth file is an MAE: its file's 'model' entry, or decoder keys.

  Args:
    checkpoint: what select_network returned.

  Returns:
    True for an MAE or MAE-Lite checkpoint.
  """
  keys = strip_wrappers(checkpoint.state_dict, MAE_PREFIXES)
  return checkpoint.key == "model" or any(DECODER_KEYS.fullmatch(k) for k in keys)


def encoder_width(state_dict: Mapping[str, Any], prefixes: tuple[str, ...] = MAE_PREFIXES) -> int:
  """The width of a ViT state dict, its keys and shapes checked as a ViT's.

  Args:
    state_dict: official key -> array.
    prefixes: the wrapper prefixes to drop.

  Returns:
    embed_dim; raises ConversionError if the state dict is not a ViT's.
  """
  return infer_vit_architecture(strip_wrappers(state_dict, prefixes), num_heads=1)["embed_dim"]


def named_model(checkpoint: Mapping[str, Any]) -> str | None:
  """The model name a checkpoint stores about itself: args.model (MAE), args.encoder_arch or encoder_arch.

  Args:
    checkpoint: what load_torch_file returned.

  Returns:
    The name, e.g. 'mae_vit_tiny_patch16', or None.
  """
  if not isinstance(checkpoint, Mapping):
    return None
  args = checkpoint.get("args")
  args = vars(args) if hasattr(args, "__dict__") else args if isinstance(args, Mapping) else {}
  for name in (args.get("model"), args.get("encoder_arch"), checkpoint.get("encoder_arch")):
    if isinstance(name, str):
      return name
  return None


def config_heads(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The width and heads of the ViT a config builds (config.model.num_heads, or its variant's default).

  Args:
    config: a pretraining config.

  Returns:
    (embed_dim, num_heads); raises ConversionError if its backbone is no ViT.
  """
  backbone = backbones.backbone_from_config(config.model)
  if not isinstance(backbone, vit.VisionTransformer):
    raise ConversionError([f"--config builds a {type(backbone).__name__}, not a ViT."])
  return backbone.embed_dim, backbone.num_heads


def resolve_num_heads(
  embed_dim: int, *, config: tuple[str, int, int] | None = None, name: str | None = None
) -> tuple[int, str]:
  """The heads of a ViT whose source does not use the head width 64: from the config, or from the model
  name the checkpoint stores; refused when neither says or they disagree.

  Args:
    embed_dim: the checkpoint's width.
    config: (the --config argument, its embed_dim, its heads), when given.
    name: the checkpoint's own model name (named_model), when it has one.

  Returns:
    (num_heads, where it came from, for the summary); raises ConversionError when it cannot be known.
  """
  problems, choices = [], []
  if config is not None:
    spec, width, heads = config
    if width != embed_dim:
      problems.append(f"--config {spec} builds a ViT {width} wide, the checkpoint's is {embed_dim} wide.")
    choices.append((heads, f"from --config {spec}"))
  if name is not None and (size := re.search(r"vit_(tiny|small|base|large|huge)", name)):
    width, heads = NAMED_SIZES[size[1]]
    if width != embed_dim:
      problems.append(
        f"The checkpoint names its model {name} ({width} wide), its weights are {embed_dim} wide."
      )
    choices.append((heads, f"from the checkpoint's model name {name}"))
  if len({heads for heads, _ in choices}) > 1:
    problems.append("The heads disagree: " + "; ".join(f"{h} {where}" for h, where in choices) + ".")
  if not choices:
    problems.append(
      f"The number of heads of this {embed_dim}-wide encoder cannot be read from the shapes (192 wide is "
      "3 heads for DeiT-Tiny, 12 for MAE-Tiny) and the checkpoint does not name its model: pass --config "
      "with the config it was trained with, e.g. --config configs/mae_tiny.py."
    )
  if problems:
    raise ConversionError(problems)
  return choices[0]


@dataclasses.dataclass(frozen=True)
class MaeNetwork:
  """A converted MAE.

  architecture: the encoder's VisionTransformer fields (the `architecture` of an export).
  decoder: the decoder's width and depth, read from the shapes (its heads are not in them).
  params: the param tree of esvit_jax.models.mae.MaskedAutoencoder (the encoder without pos_embed).
  pos_embed: the file's encoder position table [1, 1 + g^2, C], for an export of the encoder.
  skipped: the skipped key prefixes (SKIPPED) -> how many tensors each had.
  """

  architecture: dict[str, Any]
  decoder: dict[str, int]
  params: dict[str, Any]
  pos_embed: np.ndarray
  skipped: dict[str, int]


def mae_key(path: tuple[str, ...]) -> str:
  """Our MAE parameter path -> its official key (('encoder', 'blocks_0', ...): 'blocks.0....').

  Args:
    path: a flattened path of the MAE param tree.

  Returns:
    The official key.
  """
  return torch_key(path[1:] if path[0] == "encoder" else path)


def _decoder_fields(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """The decoder's width and depth from its shapes; raises ConversionError when it has none."""
  embed = state_dict.get("decoder_embed.weight")
  if embed is None or len(embed.shape) != 2:
    raise ConversionError(["Not an MAE decoder: no decoder_embed.weight [D, C]."])
  depth = len({m[1] for k in state_dict if (m := re.match(r"decoder_blocks\.(\d+)\.", k))})
  return {"embed_dim": int(embed.shape[0]), "depth": depth}


def mae_param_shapes(architecture: Mapping[str, Any], decoder: Mapping[str, int]) -> dict[str, Any]:
  """The param tree of our MAE as shapes: the encoder with a fixed position table, then the decoder.

  Args:
    architecture: the encoder's VisionTransformer fields.
    decoder: the decoder's embed_dim and depth.

  Returns:
    Path -> jax.ShapeDtypeStruct tree.
  """
  encoder = vit.VisionTransformer(
    **{k: v for k, v in architecture.items() if k != "family"}, drop_path_rate=0.0, fixed_pos_embed=True
  )
  model = mae.MaskedAutoencoder(encoder, decoder["embed_dim"], decoder["depth"], decoder_heads=1)
  size, patch = architecture["image_size"], architecture["patch_size"]
  ids_shuffle = jnp.arange((size // patch) ** 2)[None]
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)), ids_shuffle)["params"]


def _check_table(state_dict: Mapping[str, Any], key: str, grid: int, problems: list[str]) -> None:
  """Compares a file's fixed position table with our sin-cos table of its width and grid."""
  value = state_dict.get(key)
  if value is None or len(value.shape) != 3 or value.shape[:2] != (1, 1 + grid * grid):
    problems.append(
      f"{key} {None if value is None else tuple(value.shape)}: expected (1, {1 + grid * grid}, D)"
    )
    return
  error = np.max(np.abs(np.asarray(value) - vit.sincos_pos_embed(value.shape[2], grid)[None]))
  if error > TABLE_TOLERANCE:
    problems.append(
      f"{key} differs from MAE's fixed 2-D sin-cos table by up to {error:.3g}; ours keeps the table fixed."
    )


def mae_params_from_state_dict(state_dict: Mapping[str, Any], num_heads: int) -> MaeNetwork:
  """An official MAE or MAE-Lite state dict -> the MAE param tree; raises ConversionError on any problem.

  The distillation teacher and head-mix adapter are counted and skipped; every other key must be a
  parameter of the MAE or one of its two fixed tables, which must equal ours.

  Args:
    state_dict: the file's 'model' entry (torch tensors or numpy), with or without wrapper prefixes.
    num_heads: the encoder's heads (resolve_num_heads).

  Returns:
    The MaeNetwork, its params as float32 numpy trees.
  """
  state_dict = strip_wrappers(state_dict, MAE_PREFIXES)
  skipped = {p: sum(k.startswith(p) for k in state_dict) for p in SKIPPED}
  state_dict = {k: v for k, v in state_dict.items() if not k.startswith(tuple(SKIPPED))}
  architecture = infer_vit_architecture(state_dict, num_heads)
  decoder = _decoder_fields(state_dict)
  problems: list[str] = []
  params, expected = read_params(mae_param_shapes(architecture, decoder), state_dict, mae_key, problems)
  grid = architecture["image_size"] // architecture["patch_size"]
  for key in FIXED_TABLES:
    _check_table(state_dict, key, grid, problems)
  used = set(expected) | set(FIXED_TABLES)
  problems += [f"unexpected key {k} {tuple(np.shape(v))}" for k, v in state_dict.items() if k not in used]
  if problems:
    raise ConversionError(problems)
  pos_embed = np.asarray(state_dict["pos_embed"], np.float32)
  return MaeNetwork(architecture, decoder, params, pos_embed, {p: n for p, n in skipped.items() if n})


def mae_state_dict(params: Mapping[str, Any], image_size: int = 224) -> dict[str, np.ndarray]:
  """The MAE param tree -> the official MAE state dict, with both fixed sin-cos tables.

  Args:
    params: the param tree of esvit_jax.models.mae.MaskedAutoencoder.
    image_size: the construction resolution (the tables' grid is image_size / patch).

  Returns:
    Official key -> numpy array in torch layout, what the official MAE loads with strict=True.
  """
  state = {
    mae_key(path): np.array(torch_layout(path, np.asarray(value)), order="C")  # A writable copy.
    for path, value in traverse_util.flatten_dict(params).items()
  }
  grid = image_size // state["patch_embed.proj.weight"].shape[2]
  for key, width in (
    ("pos_embed", state["cls_token"].shape[2]),
    ("decoder_pos_embed", state["mask_token"].shape[2]),
  ):
    state[key] = vit.sincos_pos_embed(width, grid)[None]
  return state


def encoder_export_params(network: MaeNetwork) -> dict[str, Any]:
  """The encoder as a plain ViT export's params: the MAE's encoder with the file's position table.

  Args:
    network: a converted MAE.

  Returns:
    The VisionTransformer param tree.
  """
  return {**network.params["encoder"], "pos_embed": network.pos_embed}


def summary(
  network: MaeNetwork, checkpoint: TorchCheckpoint, heads_from: str, *, decoder_heads: str | None = None
) -> str:
  """What was converted from an MAE file and what was skipped, for the user to check.

  Args:
    network: the converted MAE.
    checkpoint: the network as read from the file (its key and the file's other entries).
    heads_from: where the number of heads came from.
    decoder_heads: the decoder's heads and where they came from, when the decoder was converted too
      (a pretraining workdir); None for an export, which holds the encoder alone.

  Returns:
    A few lines of text.
  """
  arch, decoder = network.architecture, network.decoder
  what = f"the {checkpoint.key} entry" if checkpoint.key else "a bare state dict"
  decoder_params = {k: v for k, v in network.params.items() if k != "encoder"}
  decoder_part = (
    f"the decoder (mask_token, decoder_*: {len(traverse_util.flatten_dict(decoder_params))} tensors, "
    f"{count_params(decoder_params) / 1e6:.2f}M parameters, width {decoder['embed_dim']}, {decoder['depth']} "
    "blocks"
  )
  lines = [
    f"Converted the MAE encoder of {what}: ViT/{arch['patch_size']} (embed_dim {arch['embed_dim']}, depth "
    f"{arch['depth']}, heads {arch['num_heads']} {heads_from}, position grid for {arch['image_size']} px), "
    f"{count_params(network.params['encoder']) / 1e6:.2f}M parameters.",
    f"Skipped {decoder_part}): an export holds the encoder."
    if decoder_heads is None
    else f"Converted {decoder_part}, heads {decoder_heads}).",
  ]
  if decoder_heads is not None:
    lines.append(
      "Checked pos_embed and decoder_pos_embed against MAE's fixed sin-cos tables (recomputed, not stored)."
    )
  lines += [f"Skipped {p}* ({n} tensors): {SKIPPED[p]}." for p, n in network.skipped.items()]
  if checkpoint.others:
    lines.append(f"Skipped the file's other entries: {', '.join(checkpoint.others)}.")
  return "\n".join(lines)


def export_encoder(
  checkpoint: TorchCheckpoint,
  out: epath.Path,
  source: str,
  *,
  num_heads: int,
  heads_from: str,
) -> str:
  """Writes the encoder of an MAE checkpoint as an export directory (a plain ViT, esvit_jax.export).

  Args:
    checkpoint: the MAE network, as select_network found it.
    out: the export directory to write (new or empty).
    source: where the weights came from, recorded in the export.
    num_heads: the encoder's heads (resolve_num_heads).
    heads_from: where they came from, for the summary.

  Returns:
    summary()'s text and the directory written.
  """
  network = mae_params_from_state_dict(checkpoint.state_dict, num_heads)
  backbone = backbones.from_architecture(network.architecture)
  export.save_backbone(out, backbone, jax.device_put(encoder_export_params(network)), source=source)
  return f"{summary(network, checkpoint, heads_from)}\nWrote {out}"


def finished_epochs(checkpoint: Any) -> int | None:
  """The epochs an MAE file had finished: MAE-Lite saves start_epoch (the next 0-based epoch, so the count),
  MAE saves epoch (the 0-based epoch just finished, so one less than the count).

  Args:
    checkpoint: what load_torch_file returned.

  Returns:
    The number of finished epochs, or None when the file records none (a bare or released state dict).
  """
  if not isinstance(checkpoint, Mapping):
    return None
  if "start_epoch" in checkpoint:
    return int(checkpoint["start_epoch"])
  if "epoch" in checkpoint:
    return int(checkpoint["epoch"]) + 1
  return None


def _check_config_builds(network: MaeNetwork, config: ml_collections.ConfigDict, config_spec: str) -> None:
  """Refuses a config whose encoder or decoder is not the file's (the decoder's heads are the config's)."""
  problems = []
  expected = backbones.architecture(backbones.backbone_from_config(config.model))
  if expected != network.architecture:
    problems.append(
      f"--config {config_spec} builds the encoder {expected}, the checkpoint holds {network.architecture}."
    )
  decoder = {"embed_dim": config.model.decoder_dim, "depth": config.model.decoder_depth}
  if decoder != network.decoder:
    problems.append(
      f"--config {config_spec} builds a decoder {decoder['embed_dim']} wide with {decoder['depth']} blocks, "
      f"the checkpoint's is {network.decoder['embed_dim']} wide with {network.decoder['depth']}: set "
      "--config.model.decoder_dim and --config.model.decoder_depth (and decoder_heads) to the file's."
    )
  if problems:
    raise ConversionError(problems)


def write_pretraining_workdir(
  checkpoint_path: str,
  out_dir: str,
  config_spec: str,
  *,
  steps_per_epoch: int | None = None,
  trust_pickle: bool = False,
) -> str:
  """An MAE or MAE-Lite .pth file -> a pretraining workdir that `main.py` continues; returns a summary.

  Args:
    checkpoint_path: an MAE or MAE-Lite checkpoint (its 'model' entry) or a bare MAE state dict, decoder
      included.
    out_dir: the workdir to write (new or empty).
    config_spec: the MAE config main.py will continue with, 'path/to/config.py[:arg]'; its encoder and
      decoder must be the file's, and it gives the decoder's heads.
    steps_per_epoch: optimizer steps per epoch of the run (default: ImageNet-1K at the config's batch).
    trust_pickle: allow arbitrary pickled objects.

  Returns:
    A summary. The workdir holds config.json and one checkpoint at step epochs * steps_per_epoch with the
    encoder, decoder and mask token. The file's optimizer state is torch's and is not converted: AdamW
    starts afresh there (zero moments, bias correction from the continued run's first step), as torch does
    when a run continues without optimizer state, its lr and weight-decay schedules at the global step.
  """
  out = empty_dir(out_dir)
  raw = load_torch_file(checkpoint_path, trust_pickle=trust_pickle)
  checkpoint = select_network(raw)
  if not is_mae(checkpoint):
    raise ConversionError(
      [
        f"{checkpoint_path} holds no MAE (no 'model' entry, no decoder keys), but --config {config_spec} "
        "is an MAE config."
      ]
    )
  config = load_config(config_spec)
  heads, heads_from = resolve_num_heads(
    encoder_width(checkpoint.state_dict),
    config=(config_spec, *config_heads(config)),
    name=named_model(raw),
  )
  network = mae_params_from_state_dict(checkpoint.state_dict, heads)
  _check_config_builds(network, config, config_spec)
  steps_per_epoch = steps_per_epoch or IMAGENET_TRAIN_EXAMPLES // config.batch_size
  epochs = finished_epochs(raw)
  step = (epochs or 0) * steps_per_epoch

  mesh = sharding.make_mesh(jax.local_devices()[:1])  # main.py restores it onto any mesh.
  pretraining = mae_step.MaePretraining(config, mesh, steps_per_epoch=steps_per_epoch)
  state = pretraining.create_state(jax.random.PRNGKey(config.seed))
  place = lambda fresh, value: jax.device_put(np.asarray(value, fresh.dtype), fresh.sharding)  # noqa: E731
  converted = jax.tree.map(place, {k: state.params[k] for k in network.params}, network.params)
  state = state.replace(
    step=place(state.step, step),
    params={**state.params, **converted},
    opt_state=optim.restarted_at(state.opt_state, step, config, steps_per_epoch=steps_per_epoch),
  )
  save_workdir(out, step, state, config, checkpoint_path)

  at = (
    f"step {step} = epoch {epochs} x {steps_per_epoch} steps per epoch (batch {config.batch_size})"
    if epochs is not None
    else "step 0 (the file records no epoch)"
  )
  notes = [
    f"Wrote {out}: {at}.",
    "The file's optimizer state is torch's and is not converted: AdamW restarts there (zero moments), its lr "
    "and weight-decay schedules at the global step.",
  ]
  if fresh := sorted(set(state.params) - set(network.params)):
    notes.append(f"Not in the file, started afresh: {', '.join(fresh)}.")
  notes.append(f"Continue with: python main.py --config {config_spec} --workdir {out}")
  decoder_heads = f"{config.model.decoder_heads} from --config {config_spec}"
  return "\n".join([summary(network, checkpoint, heads_from, decoder_heads=decoder_heads), *notes])
