"""The EsViT train state and the jitted, sharded pretraining step (DESIGN.md, "Data flow of one step").

One call of the step: normalise the uint8 crops on device; teacher forward on the 2 globals (EMA params,
no drop path, no gradient); student forward on the globals and the locals (one call per resolution);
view + region loss; gradients; per-tensor clipping and AdamW (last layer frozen in the first epochs);
teacher = EMA of the student; both centres updated with the global-batch mean of the teacher logits,
after the loss. Parameters, optimizer state and losses are float32; activations run in
config.compute_dtype. Nothing leaves the device: the metrics come back as a dict of scalars.
"""
import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from esvit_jax import losses, models, optim, schedules, sharding
from esvit_jax.data.normalize import normalize_images


Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a resume needs; `step` is also the input-stream position."""
  step: jax.Array
  params: Any
  teacher_params: Any
  opt_state: optax.OptState
  center: jax.Array  # [1, K] view centre (official `center`).
  region_center: jax.Array  # [1, K] region centre (official `center_grid`); stays 0 for plain DINO.
  rng: jax.Array  # Raw uint32 key; the step's dropout key is fold_in(rng, step).


def build_model(config: ml_collections.ConfigDict) -> models.EsViT:
  return models.build_esvit(config.model, use_region_head=config.region_loss_weight > 0,
                            dtype=jnp.dtype(config.compute_dtype))


def _crop_groups(config: ml_collections.ConfigDict, batch: Batch) -> list[jax.Array]:
  """Student input: the globals, then the locals when there are any."""
  names = ["globals"] + (["locals"] if config.num_local_crops else [])
  return [normalize_images(batch[name], config.compute_dtype) for name in names]


def _init_fn(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable[[jax.Array], TrainState]:
  model = build_model(config)
  tx = optim.make_optimizer(config, steps_per_epoch=steps_per_epoch)
  size = config.global_crop_size

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    globals_ = jnp.zeros((1, 2, size, size, 3), config.compute_dtype)
    params = model.init({"params": init_rng}, [globals_], train=False)["params"]
    center = jnp.zeros((1, config.model.out_dim), jnp.float32)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, teacher_params=params,
                      opt_state=tx.init(params), center=center, region_center=center, rng=state_rng)

  return init


def abstract_train_state(config: ml_collections.ConfigDict, mesh: Mesh, *, steps_per_epoch: int) -> TrainState:
  """The state as ShapeDtypeStructs with their shardings, nothing allocated: a checkpoint's restore target.

  Shardings follow config.sharding ('data' or 'fsdp'); config.fsdp_min_size_mb (default
  sharding.FSDP_MIN_SIZE_MB) sets the size below which 'fsdp' replicates a tensor.
  """
  shapes = jax.eval_shape(_init_fn(config, steps_per_epoch), jax.random.PRNGKey(0))
  shardings = sharding.infer_shardings(shapes, mesh, config.sharding,
                                       fsdp_min_size_mb=config.get("fsdp_min_size_mb", sharding.FSDP_MIN_SIZE_MB))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh, *, steps_per_epoch: int) -> TrainState:
  """The NamedSharding of every leaf of the train state."""
  return jax.tree.map(lambda s: s.sharding, abstract_train_state(config, mesh, steps_per_epoch=steps_per_epoch))


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh, rng: jax.Array, *,
                       steps_per_epoch: int) -> TrainState:
  """A fresh state created directly in its shardings; the teacher starts as a copy of the student.

  Args:
    config: a pretraining config (configs/common.py).
    mesh: from sharding.make_mesh.
    rng: a raw uint32 key, e.g. jax.random.PRNGKey(config.seed).
    steps_per_epoch: optimizer steps per epoch of the dataset.
  """
  out_shardings = state_shardings(config, mesh, steps_per_epoch=steps_per_epoch)
  return jax.jit(_init_fn(config, steps_per_epoch), out_shardings=out_shardings)(rng)


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh, *,
                    steps_per_epoch: int) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The jitted step(state, batch) -> (state, metrics), with explicit shardings and the state donated.

  `batch` is {'globals': uint8 [B, 2, G, G, 3], 'locals': uint8 [B, N, L, L, 3]}, global arrays split
  over the data axis (sharding.global_batch). The metrics are float32 scalars of this step: loss,
  view_loss, region_loss (with the region loss), lr, wd, momentum, teacher_temp, teacher_entropy (mean
  entropy of the teacher's view distribution: it climbs to log K on collapse to uniform, falls to 0 on
  collapse to one prototype) and grad_norm (global norm of the gradients before clipping).
  """
  model = build_model(config)
  tx = optim.make_optimizer(config, steps_per_epoch=steps_per_epoch)
  schedule = schedules.from_config(config, steps_per_epoch)
  loss_fn = functools.partial(losses.esvit_loss, student_temp=config.student_temp,
                              region_loss_weight=config.region_loss_weight)

  def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    crops = _crop_groups(config, batch)
    teacher_temp = schedule.teacher_temp(state.step)
    teacher_out = model.apply({"params": state.teacher_params}, crops[:1], train=False)[0]
    teacher_out = jax.lax.stop_gradient(teacher_out)

    def student_loss(params):
      student_outs = model.apply({"params": params}, crops, train=True,
                                 rngs={"dropout": jax.random.fold_in(state.rng, state.step)})
      return loss_fn(student_outs, teacher_out, state.center, state.region_center, teacher_temp=teacher_temp)

    (loss, aux), grads = jax.value_and_grad(student_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_rate = schedule.teacher_ema_rate(state.step)  # 1 - momentum.
    teacher_params = optax.incremental_update(params, state.teacher_params, step_size=ema_rate)

    center = losses.update_center(state.center, teacher_out["view_logits"], config.center_momentum)
    region_center = state.region_center
    if config.region_loss_weight:
      region_center = losses.update_center(region_center, teacher_out["region_logits"], config.center_momentum)

    new_state = state.replace(step=state.step + 1, params=params, teacher_params=teacher_params,
                              opt_state=opt_state, center=center, region_center=region_center)
    metrics = {"loss": loss, **aux, "lr": schedule.learning_rate(state.step),
               "wd": schedule.weight_decay(state.step), "momentum": 1 - ema_rate, "teacher_temp": teacher_temp,
               "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  state_sharding = state_shardings(config, mesh, steps_per_epoch=steps_per_epoch)
  return jax.jit(step_fn, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
