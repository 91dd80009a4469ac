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
"""

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
    names = [str(getattr(k, "key", k)) for k in path]
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
