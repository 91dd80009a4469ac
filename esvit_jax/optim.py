"""The EsViT optimizer: per-tensor clipping, then torch-style AdamW with scheduled lr and weight decay,
with the heads' last layers frozen for the first epochs (docs/fidelity.md, Schedules and optimizer).

Built from optax pieces:
- `optax.adamw` with callable lr and wd gives update = -lr * (adam + wd * p): torch's decoupled
  `p -= lr * wd * p` coupling, with torch's eps placement and bias correction.
- `optax.partition` splits the `last_layer` params off into their own AdamW, wrapped in
  `optax.transforms.conditionally_mask`: while frozen they get a zero update and their moments and step
  count stay untouched, which is what torch does when their grad is None. Their AdamW therefore counts
  steps from the first unfrozen step, like torch's per-parameter `step`, so its bias correction restarts
  there; its schedules are shifted by the frozen steps to stay on the global step.

The fine-tuning optimizer (MAE / BEiT recipe, `make_finetune_optimizer`): optional global-norm clipping, AdamW
with MAE's warm-up + cosine lr and decay off 1-D tensors, position tables and the CLS token, then every
update scaled by its layer's factor decay ** (L + 1 - layer id) (layer-wise lr decay).
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from esvit_jax import schedules

# torch.optim.AdamW defaults, used by the official code.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
FROZEN_EARLY = "last_layer"  # Any param with this name in its path (both heads) is frozen at first.


def _leaf_name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: ndim > 1 and not a bias (official get_params_groups).

  So relative-position tables and the weight-norm scale (1, K) are decayed; biases and LayerNorm
  params are not.

  Args:
    params: the parameter pytree.

  Returns:
    A pytree of bools of the same structure.
  """
  return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim > 1 and _leaf_name(path) != "bias", params)


def freeze_labels(params: Any) -> Any:
  """'last_layer' for the params frozen during the first epochs, 'trained' for the rest.

  Args:
    params: the parameter pytree.

  Returns:
    A pytree of labels of the same structure, for optax.partition.
  """

  def label(path, _):
    names = _path_names(path)
    return FROZEN_EARLY if FROZEN_EARLY in names else "trained"

  return jax.tree_util.tree_map_with_path(label, params)


def clip_by_tensor_norm(max_norm: float) -> optax.GradientTransformation:
  """Per-tensor clipping, `utils.clip_gradients`: g *= min(1, max_norm / (||g|| + 1e-6)) per param.

  Args:
    max_norm: the largest L2 norm a gradient tensor keeps.

  Returns:
    A stateless gradient transformation.
  """

  def clip(g, _):
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
    return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)

  return optax.stateless_with_tree_map(clip)


def _adamw(
  schedule: schedules.Schedules, step_offset: int, betas: tuple[float, float] = (ADAM_B1, ADAM_B2)
) -> optax.GradientTransformation:
  return optax.adamw(
    learning_rate=lambda count: schedule.learning_rate(count + step_offset),
    b1=betas[0],
    b2=betas[1],
    eps=ADAM_EPS,
    weight_decay=lambda count: schedule.weight_decay(count + step_offset),
    mask=decay_mask,
  )


def make_optimizer(
  config: ml_collections.ConfigDict, *, steps_per_epoch: int
) -> optax.GradientTransformation:
  """Clipping (skipped when config.clip_grad is 0, as in the official `if args.clip_grad`) + AdamW.

  MAE (config.method 'mae') has no frozen layer and its own betas (config.adam_betas).

  Args:
    config: the pretraining config (lr and weight-decay schedule fields, clip_grad,
      freeze_last_layer_epochs or adam_betas).
    steps_per_epoch: optimizer steps in one epoch.

  Returns:
    The optimizer, driven by the global step.
  """
  schedule = schedules.from_config(config, steps_per_epoch)
  if config.get("method") == "mae":
    return _adamw(schedule, 0, tuple(config.adam_betas))
  frozen_steps = config.freeze_last_layer_epochs * steps_per_epoch
  adamw = optax.partition(
    {
      FROZEN_EARLY: optax.transforms.conditionally_mask(
        _adamw(schedule, frozen_steps), lambda count: count >= frozen_steps
      ),
      "trained": _adamw(schedule, 0),
    },
    freeze_labels,
  )
  if not config.clip_grad:
    return adamw
  return optax.chain(clip_by_tensor_norm(config.clip_grad), adamw)


def restarted_at(
  opt_state: Any, step: int, config: ml_collections.ConfigDict, *, steps_per_epoch: int
) -> Any:
  """A fresh optimizer state placed at global `step`: what torch does when a run continues from a
  checkpoint without optimizer state (the official continued runs): zero moments and Adam bias correction
  from its first step, but lr and weight-decay schedules at the global step.

  Args:
    opt_state: a fresh state of make_optimizer(config, steps_per_epoch=steps_per_epoch).
    step: the global step the run continues from.
    config: the pretraining config (freeze_last_layer_epochs; an MAE config has none).
    steps_per_epoch: optimizer steps in one epoch.

  Returns:
    The optimizer state of the same structure, its schedule counts placed at `step`.
  """
  frozen_steps = config.get("freeze_last_layer_epochs", 0) * steps_per_epoch

  def schedule_count(path, leaf):
    if leaf.ndim or not jnp.issubdtype(leaf.dtype, jnp.integer):
      return leaf
    name = jax.tree_util.keystr(path)
    in_frozen_branch = FROZEN_EARLY in name and not name.endswith(".step")  # .step: the freeze counter.
    return jnp.full_like(leaf, max(step - frozen_steps, 0) if in_frozen_branch else step)

  placed = jax.tree_util.tree_map_with_path(schedule_count, opt_state)

  def is_adam(node):
    return isinstance(node, optax.ScaleByAdamState)

  return jax.tree.map(
    lambda s: s._replace(count=jnp.zeros_like(s.count)) if is_adam(s) else s, placed, is_leaf=is_adam
  )


# Names of the tensors that fine-tuning never decays although they have more than one dimension: MAE's
# `no_weight_decay()` (pos_embed, cls_token) and the position tables timm's Swin adds.
FINETUNE_NO_DECAY = frozenset(
  {"pos_embed", "cls_token", "absolute_pos_embed", "relative_position_bias_table"}
)
_EMBEDDING = frozenset({"patch_embed", "pos_embed", "cls_token", "absolute_pos_embed"})  # Layer 0.
_NUMBERED = re.compile(r"(blocks|layers)_(\d+)")


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def _numbered(names: Any, prefix: str) -> list[int]:
  """The sorted indices i of the keys `{prefix}_{i}` among `names`."""
  return sorted(int(m[2]) for m in map(_NUMBERED.fullmatch, names) if m and m[1] == prefix)


def _backbone_block_ids(backbone: Any) -> tuple[dict[tuple[str, ...], int], int]:
  """The layer id of every block-level module of a ViT or Swin backbone, and its number of blocks L.

  ViT: blocks_i -> i + 1. Swin: the blocks counted through the stages (stage s block j has global index b)
  -> b + 1, and a stage's downsample -> the id of its last block (SimMIM's get_swin_layer_id).
  """
  vit_blocks = _numbered(backbone, "blocks")
  if vit_blocks:
    return {(f"blocks_{i}",): i + 1 for i in vit_blocks}, len(vit_blocks)
  if _numbered(backbone, "layers"):
    ids, blocks = {}, 0
    for s in _numbered(backbone, "layers"):
      stage = backbone[f"layers_{s}"]
      for j in _numbered(stage, "blocks"):
        blocks += 1
        ids[(f"layers_{s}", f"blocks_{j}")] = blocks
      ids[(f"layers_{s}", "downsample")] = blocks
    return ids, blocks
  raise ValueError(
    f"Layer-wise lr decay knows ViT (blocks_i) and Swin (layers_s/blocks_j) backbones, not one with the "
    f"parameters {sorted(backbone)}."
  )


def layer_ids(params: Any) -> Any:
  """The layer of every parameter for layer-wise lr decay (MAE's / BEiT's get_layer_id_for_vit).

  0: the patch embedding, CLS token and position embeddings; b + 1: the b-th block (Swin: counted through
  the stages, a stage's patch merging with its last block); L + 1: the final norm and everything outside
  the backbone (fc_norm, head).

  Args:
    params: {'backbone': a ViT or Swin backbone's params, 'head': ..., optionally 'fc_norm': ...}.

  Returns:
    A pytree of ints of the same structure.

  Raises:
    ValueError: the params have no 'backbone', or it is not laid out as a ViT or a Swin.
  """
  if "backbone" not in params:
    raise ValueError(f"Layer-wise lr decay needs the backbone's params under 'backbone': {sorted(params)}.")
  block_ids, depth = _backbone_block_ids(params["backbone"])

  def layer_id(path, _) -> int:
    names = _path_names(path)
    if names[0] != "backbone" or names[1] == "norm":
      return depth + 1
    if names[1] in _EMBEDDING:
      return 0
    module = tuple(names[1:3] if names[1].startswith("layers_") else names[1:2])  # A block or a downsample.
    if module in block_ids:
      return block_ids[module]
    raise ValueError(f"No layer id for the backbone parameter {'/'.join(names[1:])}.")

  return jax.tree_util.tree_map_with_path(layer_id, params)


def num_layers(params: Any) -> int:
  """The number of layer ids, L + 2 (ids 0 .. L + 1) for a backbone of L blocks.

  Args:
    params: as for layer_ids.

  Returns:
    L + 2.
  """
  return _backbone_block_ids(params["backbone"])[1] + 2


def layer_scales(params: Any, decay: float) -> Any:
  """Each parameter's lr factor, decay ** (L + 1 - layer id): 1 for the head, decay ** (L + 1) for the
  patch embedding (MAE's param_groups_lrd `lr_scale`).

  Args:
    params: as for layer_ids.
    decay: the layer decay (1.0: every factor 1).

  Returns:
    A pytree of Python floats of the same structure.
  """
  top = num_layers(params) - 1
  return jax.tree.map(lambda i: decay ** (top - i), layer_ids(params))


def finetune_decay_mask(params: Any) -> Any:
  """True where fine-tuning decays the weights: tensors of more than one dimension (so neither biases nor
  norms) except the position embeddings, relative-position tables and the CLS token (MAE's
  `p.ndim == 1 or name in no_weight_decay` groups, with timm's Swin position tables).

  Args:
    params: the parameter pytree (arrays or shape structs).

  Returns:
    A pytree of bools of the same structure.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, p: len(p.shape) > 1 and _leaf_name(path) not in FINETUNE_NO_DECAY, params
  )


def finetune_learning_rate(config: ml_collections.ConfigDict, *, steps_per_epoch: int) -> schedules.Schedule:
  """MAE's per-iteration fine-tuning lr: from 0 to lr * batch / 256 over the warm-up epochs, then a cosine
  to config.min_lr at the end of config.epochs (before the layer factors).

  Args:
    config: the fine-tuning config (lr, batch_size, min_lr, epochs, warmup_epochs).
    steps_per_epoch: optimizer steps in one epoch.

  Returns:
    The schedule: global step -> float32 lr.
  """
  return schedules.warmup_cosine_schedule(
    schedules.peak_learning_rate(config),
    config.min_lr,
    config.epochs * steps_per_epoch,
    config.warmup_epochs * steps_per_epoch,
  )


def scale_by_layer(scales: Any) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its fixed factor.

  Args:
    scales: a pytree of floats of the params' structure (layer_scales).

  Returns:
    A stateless gradient transformation.
  """

  def scale(updates, _):
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)

  return optax.stateless(scale)


def make_finetune_optimizer(
  config: ml_collections.ConfigDict, *, steps_per_epoch: int, params: Any
) -> optax.GradientTransformation:
  """Global-norm clipping (when config.clip_grad > 0), AdamW, layer-wise lr decay.

  Args:
    config: the fine-tuning config (lr, batch_size, min_lr, epochs, warmup_epochs, weight_decay,
      adam_betas, clip_grad, layer_decay).
    steps_per_epoch: optimizer steps in one epoch.
    params: the fine-tuned params (arrays or shape structs), laid out as for layer_ids.

  Returns:
    The optimizer, driven by the global step (its state's counts).
  """
  b1, b2 = config.adam_betas
  adamw = optax.adamw(
    learning_rate=finetune_learning_rate(config, steps_per_epoch=steps_per_epoch),
    b1=b1,
    b2=b2,
    eps=ADAM_EPS,
    weight_decay=config.weight_decay,
    mask=finetune_decay_mask,
  )
  # torch puts each layer in a param group of lr * scale, and AdamW's decoupled decay is then
  # p -= lr * scale * wd * p: scaling AdamW's whole update (Adam step and decay) by the layer's factor
  # is the same step.
  chain = [adamw, scale_by_layer(layer_scales(params, config.layer_decay))]
  if config.clip_grad:
    # The total norm of all gradients, as torch's clip_grad_norm_ (which adds 1e-6 to the norm: a relative
    # difference of 1e-6 / norm in the factor).
    chain.insert(0, optax.clip_by_global_norm(config.clip_grad))
  return optax.chain(*chain)
