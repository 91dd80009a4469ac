"""The MAE (and D-MAE) train state and the jitted, sharded pretraining step.

One call of the step: per image, one random resized crop and flip made from its canvas
(device_augment.mae_crops) and one patch ranking (models.mae.random_ids_shuffle), both keyed by the image's
position in the global input stream; the masked autoencoder on the crops; the reconstruction loss on the
masked patches; with distillation, the frozen teacher's attention logits on the same visible patches and
the attention loss; gradients; AdamW with the scheduled lr. The fixed sin-cos position tables are constants
of the computation, so they are never in `params`: no gradient, no weight decay, not in checkpoints.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from esvit_jax import losses, optim, schedules, sharding
from esvit_jax.data import device_augment
from esvit_jax.models import backbones, mae, vit

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
MASK_STREAM = 0x6D61736B  # Folded into the seed's key: the masks' random stream, apart from the crops'.


@flax.struct.dataclass
class MaeTrainState:
  """Everything a resume needs; `step` is also the input-stream position."""

  step: jax.Array
  params: Any
  opt_state: optax.OptState
  rng: jax.Array  # Raw uint32 key; the step's dropout key is fold_in(rng, step).


def build_model(config: ml_collections.ConfigDict) -> mae.MaskedAutoencoder:
  """The masked autoencoder of an MAE config: the config.model ViT with MAE's init and fixed positions.

  Args:
    config: an MAE pretraining config (model, mask_ratio, compute_dtype, distill).

  Returns:
    The MaskedAutoencoder module, in the compute dtype.
  """
  dtype = jnp.dtype(config.compute_dtype)
  encoder = backbones.backbone_from_config(config.model, dtype).clone(
    weight_init="xavier", fixed_pos_embed=True
  )
  return mae.MaskedAutoencoder(
    encoder,
    decoder_dim=config.model.decoder_dim,
    decoder_depth=config.model.decoder_depth,
    decoder_heads=config.model.decoder_heads,
    mask_ratio=config.mask_ratio,
    distill_blocks=tuple(config.distill.blocks) if config.distill.enabled else (),
    teacher_heads=config.distill.teacher_heads,
    dtype=dtype,
  )


def _block_logits(intermediates: Any, block: int) -> jax.Array:
  """The sown pre-softmax attention logits of the 1-based `block` of a ViT's intermediates."""
  return intermediates[f"blocks_{block - 1}"]["attn"]["attention_logits"][0]


class MaePretraining:
  """The model, optimizer, schedules and state shardings of an MAE run, each built once.

  The interface train.py uses for every method: abstract_state, create_state, train_step, and backbone /
  backbone_params (the evaluation-mode encoder and its params, for the k-NN monitor and the export).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    steps_per_epoch: int,
    teacher: tuple[vit.VisionTransformer, Any] | None = None,
  ):
    """Builds the pieces of a run.

    Args:
      config: an MAE pretraining config (configs/mae_tiny.py).
      mesh: from sharding.make_mesh.
      steps_per_epoch: optimizer steps per epoch of the dataset.
      teacher: with distillation, the frozen teacher backbone and its params (export.load_pretrained).
    """
    self.config, self.mesh = config, mesh
    self.model = build_model(config)
    self.tx = optim.make_optimizer(config, steps_per_epoch=steps_per_epoch)
    self.schedule = schedules.from_config(config, steps_per_epoch)
    encoder = self.model.encoder
    self.grid_size = config.crop_size // encoder.patch_size
    self.backbone = backbones.from_architecture(backbones.architecture(encoder), encoder.dtype)
    self.teacher = teacher
    # config.sharding is 'data' or 'fsdp'; under 'fsdp' tensors below fsdp_min_size_mb stay replicated.
    self.state_sharding, self.abstract_state = sharding.sharded_abstract_state(
      jax.eval_shape(self._init, jax.random.PRNGKey(0)),
      mesh,
      config.sharding,
      fsdp_min_size_mb=config.get("fsdp_min_size_mb", sharding.FSDP_MIN_SIZE_MB),
    )

  def backbone_params(self, state: MaeTrainState) -> Any:
    """The encoder's params as self.backbone's (what the k-NN monitor and the export read).

    Args:
      state: a train state.

    Returns:
      The VisionTransformer params.
    """
    encoder = self.model.encoder
    grid_size = encoder.image_size // encoder.patch_size
    return mae.encoder_export_params(state.params["encoder"], encoder.embed_dim, grid_size)

  def _init(self, rng: jax.Array) -> MaeTrainState:
    init_rng, state_rng = jax.random.split(rng)
    size = self.config.crop_size
    images = jnp.zeros((1, size, size, 3), self.config.compute_dtype)
    ids = jnp.arange(self.grid_size**2, dtype=jnp.int32)[None]
    params = self.model.init({"params": init_rng}, images, ids, train=False)["params"]
    return MaeTrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), rng=state_rng
    )

  def create_state(self, rng: jax.Array) -> MaeTrainState:
    """A fresh state created directly in its shardings.

    Args:
      rng: a raw uint32 key, e.g. jax.random.PRNGKey(config.seed).

    Returns:
      The state at step 0.
    """
    return jax.jit(self._init, out_shardings=self.state_sharding)(rng)

  def inputs(self, batch: Batch, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The step's crops and patch rankings, each drawn from (config.seed, the image's stream position).

    Args:
      batch: {'canvas': uint8 [B, S, S, 3], 'image_size': int32 [B, 2]}.
      step: the global step (the batch's place in the stream).

    Returns:
      (normalised crops [B, size, size, 3] in the compute dtype, int32 [B, N] patch rankings).
    """
    config, mesh = self.config, self.mesh
    positions = step * config.batch_size + jnp.arange(config.batch_size, dtype=jnp.int32)
    positions = jax.lax.with_sharding_constraint(positions, sharding.batch_sharding(mesh))
    dtype = jnp.dtype(config.compute_dtype)
    crops = device_augment.mae_crops(batch["canvas"], batch["image_size"], positions, config, dtype)
    crops = jax.lax.with_sharding_constraint(crops, sharding.batch_sharding(mesh))
    mask_key = jax.random.fold_in(jax.random.key(config.seed), MASK_STREAM)
    return crops, mae.random_ids_shuffle(mask_key, positions, self.grid_size**2)

  def loss_fn(
    self, params: Any, images: jax.Array, ids_shuffle: jax.Array, teacher_params: Any, rng: jax.Array
  ) -> tuple[jax.Array, Metrics]:
    """The reconstruction loss, plus the weighted attention loss with distillation.

    Args:
      params: the MaskedAutoencoder params.
      images: normalised crops [B, H, W, 3].
      ids_shuffle: int32 [B, N] patch rankings.
      teacher_params: the frozen teacher's params (None without distillation).
      rng: the dropout key.

    Returns:
      (loss, {'reconstruction_loss', and with distillation 'distill_loss'}).
    """
    config, model = self.config, self.model
    distill = bool(model.distill_blocks)
    (pred, mask), variables = model.apply(
      {"params": params},
      images,
      ids_shuffle,
      train=True,
      rngs={"dropout": rng},
      mutable=["intermediates"] if distill else [],
    )
    reconstruction = losses.reconstruction_loss(
      pred, images, mask, model.encoder.patch_size, norm_pix=config.norm_pix_loss
    )
    aux = {"reconstruction_loss": reconstruction}
    if not distill:
      return reconstruction, aux
    teacher_model, _ = self.teacher
    keep = ids_shuffle[:, : mae.num_kept(ids_shuffle.shape[1], config.mask_ratio)]
    _, teacher_vars = teacher_model.apply(
      {"params": teacher_params}, images, keep=keep, mutable=["intermediates"]
    )
    student = variables["intermediates"]["encoder"]
    distill_loss = sum(
      losses.attention_distillation_loss(
        _block_logits(student, b),
        _block_logits(teacher_vars["intermediates"], b),
        params[mae.head_mix_name(b)],
      )
      for b in model.distill_blocks
    ) / len(model.distill_blocks)
    aux["distill_loss"] = distill_loss
    return reconstruction + config.distill.weight * distill_loss, aux

  def train_step(self) -> Callable[[MaeTrainState, Batch], tuple[MaeTrainState, Metrics]]:
    """The jitted step(state, batch) -> (state, metrics), with explicit shardings and the state donated.

    `batch` holds global arrays split over the data axis: {'canvas': uint8 [B, S, S, 3], 'image_size':
    int32 [B, 2]}. The metrics are float32 scalars: loss, reconstruction_loss, distill_loss (with
    distillation), lr, wd and grad_norm.

    Returns:
      The step function (the teacher's params, when there is one, are passed to the jitted step); its
      `lower(state, batch)` is the jitted step's, for ahead-of-time compilation and XLA's cost analysis.
    """
    schedule, mesh, tx = self.schedule, self.mesh, self.tx

    def step_fn(state: MaeTrainState, batch: Batch, teacher_params: Any) -> tuple[MaeTrainState, Metrics]:
      images, ids_shuffle = self.inputs(batch, state.step)
      rng = jax.random.fold_in(state.rng, state.step)
      grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
      (loss, aux), grads = grad_fn(state.params, images, ids_shuffle, teacher_params, rng)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {
        "loss": loss,
        **aux,
        "lr": schedule.learning_rate(state.step),
        "wd": schedule.weight_decay(state.step),
        "grad_norm": optax.tree.norm(grads),
      }
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    teacher_params = self.teacher[1] if self.teacher else None
    jitted = jax.jit(
      step_fn,
      in_shardings=(self.state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(self.state_sharding, sharding.replicated(mesh)),
      donate_argnums=0,
    )
    step = lambda state, batch: jitted(state, batch, teacher_params)  # noqa: E731
    step.lower = lambda state, batch: jitted.lower(state, batch, teacher_params)  # AOT, as a jax.jit's.
    return step
