"""The EsViT train state and the jitted, sharded pretraining step.

One call of the step: in device mode (config.augment_on), make the crops from the batch's canvases
(data/device_augment.py), in host mode normalise the uint8 crops the host made; teacher forward on the 2
globals (EMA params, no drop path, no gradient); student forward on the globals and the locals (one call
per resolution); view + region loss; gradients; per-tensor clipping and AdamW (last layer frozen in the
first epochs); teacher = EMA of the student; both centres updated with the global-batch mean of the
teacher logits, after the loss. Parameters, optimizer state and losses are float32; activations run in
config.compute_dtype. Nothing leaves the device: the metrics come back as a dict of scalars.
"""

from collections.abc import Callable, Mapping
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from esvit_jax import collapse, losses, models, optim, schedules, sharding
from esvit_jax.data import device_augment
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
  """The EsViT network of a pretraining config, in its compute dtype, with a region head when it is used.

  Args:
    config: a pretraining config (model, region_loss_weight, compute_dtype).

  Returns:
    The EsViT module.
  """
  return models.build_esvit(
    config.model, use_region_head=config.region_loss_weight > 0, dtype=jnp.dtype(config.compute_dtype)
  )


def _crop_groups(
  config: ml_collections.ConfigDict, batch: Batch, step: jax.Array, mesh: Mesh
) -> list[jax.Array]:
  """Student input, normalised in the compute dtype: the globals, then the locals when there are any.

  In device mode the crops of the example at global-batch row i are drawn from (config.seed, its stream
  position step * batch_size + i), as the host pipeline seeds them: the same crops for any number of
  devices and hosts, and after a resume.
  """
  names = ["globals"] + (["locals"] if config.num_local_crops else [])
  dtype = jnp.dtype(config.compute_dtype)
  if config.augment_on == "device":
    positions = step * config.batch_size + jnp.arange(config.batch_size, dtype=jnp.int32)
    positions = jax.lax.with_sharding_constraint(positions, sharding.batch_sharding(mesh))
    views = device_augment.multicrop(batch["canvas"], batch["image_size"], positions, config, dtype)
    return [jax.lax.with_sharding_constraint(views[name], sharding.batch_sharding(mesh)) for name in names]
  return [normalize_images(batch[name], dtype) for name in names]


class Pretraining:
  """The model, optimizer, schedules and state shardings of a pretraining run, each built once.

  Everything that needs them (the state's creation, its restore target, the step, the k-NN monitor's
  feature function, export) reads them from here.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *, steps_per_epoch: int):
    """Builds the pieces of a run.

    Args:
      config: a pretraining config (configs/common.py).
      mesh: from sharding.make_mesh.
      steps_per_epoch: optimizer steps per epoch of the dataset.
    """
    self.config, self.mesh = config, mesh
    self.model = build_model(config)
    self.backbone = self.model.backbone  # What the k-NN monitor and the export run (train=False).
    self.tx = optim.make_optimizer(config, steps_per_epoch=steps_per_epoch)
    self.schedule = schedules.from_config(config, steps_per_epoch)
    # config.sharding is 'data' or 'fsdp'; under 'fsdp' tensors below fsdp_min_size_mb stay replicated.
    self.state_sharding, self.abstract_state = sharding.sharded_abstract_state(
      jax.eval_shape(self._init, jax.random.PRNGKey(0)),
      mesh,
      config.sharding,
      fsdp_min_size_mb=config.get("fsdp_min_size_mb", sharding.FSDP_MIN_SIZE_MB),
    )

  def backbone_params(self, state: TrainState) -> Any:
    """The teacher's backbone params: what the k-NN monitor evaluates and the export holds.

    Args:
      state: a train state.

    Returns:
      The backbone params of the teacher.
    """
    return state.teacher_params["backbone"]

  def _init(self, rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    size = self.config.global_crop_size
    globals_ = jnp.zeros((1, 2, size, size, 3), self.config.compute_dtype)
    params = self.model.init({"params": init_rng}, [globals_], train=False)["params"]
    center = jnp.zeros((1, self.config.model.out_dim), jnp.float32)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      teacher_params=params,
      opt_state=self.tx.init(params),
      center=center,
      region_center=center,
      rng=state_rng,
    )

  def create_state(self, rng: jax.Array) -> TrainState:
    """A fresh state created directly in its shardings; the teacher starts as a copy of the student.

    Args:
      rng: a raw uint32 key, e.g. jax.random.PRNGKey(config.seed).

    Returns:
      The state at step 0.
    """
    return jax.jit(self._init, out_shardings=self.state_sharding)(rng)

  def train_step(self) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The jitted step(state, batch) -> (state, metrics), with explicit shardings and the state donated.

    `batch` holds global arrays split over the data axis (sharding.global_batch), as
    multicrop.pretrain_dataset makes them: in device mode {'canvas': uint8 [B, S, S, 3], 'image_size':
    int32 [B, 2]}, in host mode {'globals': uint8 [B, 2, G, G, 3], 'locals': uint8 [B, N, L, L, 3]}.
    The metrics are float32 scalars of this step: loss, view_loss, region_loss (with the region loss), lr,
    wd, momentum, teacher_temp, teacher_entropy (mean entropy of the teacher's view distribution: it
    climbs to log K on collapse to uniform), teacher_batch_entropy (entropy of the batch's mean view
    distribution: it falls to 0 on collapse to one prototype), grad_norm (global norm of the gradients
    before clipping) and teacher_embedding_std (collapse.embedding_std of the teacher's pooled features:
    near 0 on collapse).

    Returns:
      The jitted step function.
    """
    config, model, tx, schedule, mesh = self.config, self.model, self.tx, self.schedule, self.mesh
    loss_fn = functools.partial(
      losses.esvit_loss, student_temp=config.student_temp, region_loss_weight=config.region_loss_weight
    )

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
      crops = _crop_groups(config, batch, state.step, mesh)
      teacher_temp = schedule.teacher_temp(state.step)
      teacher_out = model.apply({"params": state.teacher_params}, crops[:1], train=False)[0]
      teacher_out = jax.lax.stop_gradient(teacher_out)

      def student_loss(params):
        student_outs = model.apply(
          {"params": params}, crops, train=True, rngs={"dropout": jax.random.fold_in(state.rng, state.step)}
        )
        return loss_fn(
          student_outs, teacher_out, state.center, state.region_center, teacher_temp=teacher_temp
        )

      (loss, aux), grads = jax.value_and_grad(student_loss, has_aux=True)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema_rate = schedule.teacher_ema_rate(state.step)  # 1 - momentum.
      teacher_params = optax.incremental_update(params, state.teacher_params, step_size=ema_rate)

      center = losses.update_center(state.center, teacher_out["view_logits"], config.center_momentum)
      region_center = state.region_center
      if config.region_loss_weight:
        region_center = losses.update_center(
          region_center, teacher_out["region_logits"], config.center_momentum
        )

      new_state = state.replace(
        step=state.step + 1,
        params=params,
        teacher_params=teacher_params,
        opt_state=opt_state,
        center=center,
        region_center=region_center,
      )
      metrics = {
        "loss": loss,
        **aux,
        "lr": schedule.learning_rate(state.step),
        "wd": schedule.weight_decay(state.step),
        "momentum": 1 - ema_rate,
        "teacher_temp": teacher_temp,
        "grad_norm": optax.tree.norm(grads),
        "teacher_embedding_std": collapse.embedding_std(teacher_out["region_features"].mean(axis=2)),
      }
      return new_state, metrics

    return jax.jit(
      step_fn,
      in_shardings=(self.state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(self.state_sharding, sharding.replicated(mesh)),
      donate_argnums=0,
    )


# One-call conveniences over Pretraining, for code that needs a single piece (tests, tools, benchmarks).


def abstract_train_state(
  config: ml_collections.ConfigDict, mesh: Mesh, *, steps_per_epoch: int
) -> TrainState:
  """The state as ShapeDtypeStructs with their shardings, nothing allocated: a checkpoint's restore target.

  Args:
    config: a pretraining config (configs/common.py).
    mesh: from sharding.make_mesh.
    steps_per_epoch: optimizer steps per epoch of the dataset.

  Returns:
    The abstract TrainState.
  """
  return Pretraining(config, mesh, steps_per_epoch=steps_per_epoch).abstract_state


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh, *, steps_per_epoch: int) -> TrainState:
  """The NamedSharding of every leaf of the train state.

  Args:
    config: a pretraining config (configs/common.py).
    mesh: from sharding.make_mesh.
    steps_per_epoch: optimizer steps per epoch of the dataset.

  Returns:
    A TrainState of NamedShardings.
  """
  return Pretraining(config, mesh, steps_per_epoch=steps_per_epoch).state_sharding


def create_train_state(
  config: ml_collections.ConfigDict, mesh: Mesh, rng: jax.Array, *, steps_per_epoch: int
) -> TrainState:
  """A fresh sharded state (Pretraining.create_state).

  Args:
    config: a pretraining config (configs/common.py).
    mesh: from sharding.make_mesh.
    rng: a raw uint32 key, e.g. jax.random.PRNGKey(config.seed).
    steps_per_epoch: optimizer steps per epoch of the dataset.

  Returns:
    The state at step 0.
  """
  return Pretraining(config, mesh, steps_per_epoch=steps_per_epoch).create_state(rng)


def make_train_step(
  config: ml_collections.ConfigDict, mesh: Mesh, *, steps_per_epoch: int
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The jitted pretraining step (Pretraining.train_step).

  Args:
    config: a pretraining config (configs/common.py).
    mesh: from sharding.make_mesh.
    steps_per_epoch: optimizer steps per epoch of the dataset.

  Returns:
    The jitted step(state, batch) -> (state, metrics).
  """
  return Pretraining(config, mesh, steps_per_epoch=steps_per_epoch).train_step()
