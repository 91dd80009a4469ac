"""Fine-tuning: the whole pretrained backbone and a new linear head trained on labels (configs/finetune.py).

The recipe is timm's and MAE's: AdamW with layer-wise lr decay, warm-up then a per-step cosine, drop path,
and every augmentation made in the jitted step from the decoded image (the host only decodes):
RandomResizedCrop and flip (device_augment), RandAugment on the uint8 pixels (randaugment), normalisation,
random erasing (erasing), then mixup or CutMix of the batch with smoothed targets (mixup); the loss is the
cross-entropy with those soft targets. Top-1 and top-5 on the validation split after every epoch, of the
weights and of their EMA when config.ema_decay > 0. It trains in the shared loop (esvit_jax/loop.py):
checkpoints, exact resume, preemption, the stop on a non-finite loss, progress, input_wait, curves.png.
"""

from collections.abc import Callable
import math
from typing import Any

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from esvit_jax import checkpointing, console, errors, export, loop, optim, plot, sharding, writers
from esvit_jax.data import device_augment, erasing, mixup, multicrop, normalize, randaugment, sources
from esvit_jax.evaluate import results as results_lib
from esvit_jax.models import classifier as classifier_lib

Batch = dict[str, jax.Array]
INITS = ("pretrained", "random")
# Folded into the seed's key: the random streams of each augmentation, apart from the crops' and each other's.
RANDAUGMENT_STREAM, ERASING_STREAM, MIX_STREAM = 0x72616E64, 0x65726173, 0x6D697875


@flax.struct.dataclass
class FinetuneState:
  step: jax.Array
  params: Any
  ema_params: Any  # The EMA of params (config.ema_decay > 0), else an empty dict.
  opt_state: optax.OptState
  rng: jax.Array


def eval_resize(config: ml_collections.ConfigDict) -> int:
  """The side images are resized to before the centre crop: floor(eval_crop_size / eval_crop_ratio), as timm.

  Args:
    config: eval_crop_size and eval_crop_ratio.

  Returns:
    256 for 224 and 0.875.
  """
  return math.floor(config.eval_crop_size / config.eval_crop_ratio)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises errors.UserError naming the first field a fine-tuning config gets wrong.

  Args:
    config: a configs/finetune.py config.
  """
  if not config.pretrained:
    raise errors.UserError(
      "Set --config.pretrained to an export directory, a pretraining workdir or a converted checkpoint "
      "(with --config.init=random its architecture is used, freshly initialised)."
    )
  if config.init not in INITS:
    raise errors.UserError(f"config.init={config.init!r}; use one of {INITS}.")
  if config.ema_decay and not 0 < config.ema_decay < 1:
    raise errors.UserError(f"config.ema_decay={config.ema_decay}; use 0 (no EMA) or a value in (0, 1).")
  if config.randaugment:
    randaugment.parse_policy(config.randaugment)


class Finetuning:
  """The classifier, optimizer and state shardings of a run, and its jitted train and evaluation steps."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    backbone: flax.linen.Module,
    num_classes: int,
    steps_per_epoch: int,
  ):
    """Builds the pieces of a run.

    Args:
      config: a fine-tuning config.
      mesh: from sharding.make_mesh.
      backbone: the evaluation-mode backbone (export.load_pretrained); drop path and dtype come from config.
      num_classes: the head's outputs.
      steps_per_epoch: optimizer steps per epoch.
    """
    self.config, self.mesh, self.num_classes = config, mesh, num_classes
    dtype = jnp.dtype(config.compute_dtype)
    self.model = classifier_lib.Classifier(
      backbone.clone(drop_path_rate=config.drop_path_rate, dtype=dtype),
      num_classes,
      config.pooling,
      config.head_init_std,
    )
    self.eval_model = self.model.clone(backbone=backbone.clone(dtype=dtype))
    self.policy = randaugment.parse_policy(config.randaugment) if config.randaugment else None
    param_shapes = jax.eval_shape(self._params, jax.random.PRNGKey(0), None)
    self.tx = optim.make_finetune_optimizer(config, steps_per_epoch=steps_per_epoch, params=param_shapes)
    self.learning_rate = optim.finetune_learning_rate(config, steps_per_epoch=steps_per_epoch)
    self.state_sharding, self.abstract_state = sharding.sharded_abstract_state(
      jax.eval_shape(self._init, jax.random.PRNGKey(0), None), mesh, config.sharding
    )
    self.hits = jax.jit(self._hits)

  def _params(self, rng: jax.Array, backbone_params: Any) -> Any:
    size = self.config.crop_size
    params = self.model.init({"params": rng}, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
    if backbone_params is None:
      return params
    return {**params, "backbone": _restricted(backbone_params, params["backbone"])}

  def _init(self, rng: jax.Array, backbone_params: Any) -> FinetuneState:
    init_rng, state_rng = jax.random.split(rng)
    params = self._params(init_rng, backbone_params)
    return FinetuneState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params) if self.config.ema_decay else {},
      opt_state=self.tx.init(params),
      rng=state_rng,
    )

  def create_state(self, rng: jax.Array, backbone_params: Any | None) -> FinetuneState:
    """A fresh state created directly in its shardings.

    Args:
      rng: a raw uint32 key, e.g. jax.random.PRNGKey(config.seed).
      backbone_params: the pretrained backbone's params (None: the backbone freshly initialised).

    Returns:
      The state at step 0.
    """
    return jax.jit(self._init, out_shardings=self.state_sharding)(rng, backbone_params)

  def inputs(self, batch: Batch, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The step's augmented images and soft targets; the randomness of each image is keyed by (config.seed,
    its position in the stream), the batch's mixing by (config.seed, step).

    Args:
      batch: {'canvas': uint8 [B, S, S, 3], 'image_size': int32 [B, 2], 'label': int32 [B]}.
      step: the global step.

    Returns:
      (normalised images [B, crop, crop, 3] in the compute dtype, float32 targets [B, num_classes]).
    """
    config, batch_sharding = self.config, sharding.batch_sharding(self.mesh)
    positions = step * config.batch_size + jnp.arange(config.batch_size, dtype=jnp.int32)
    positions = jax.lax.with_sharding_constraint(positions, batch_sharding)
    base = jax.random.key(config.seed)

    def stream(name: int, indices: jax.Array) -> jax.Array:
      """The keys of `indices` in the random stream `name`."""
      return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(base, name), indices)

    pixels = device_augment.random_resized_crops(batch["canvas"], batch["image_size"], positions, config)
    if self.policy:
      pixels = randaugment.rand_augment(stream(RANDAUGMENT_STREAM, positions), pixels, self.policy)
    images = normalize.normalize_images(pixels, jnp.float32)
    if config.reprob:
      keys = stream(ERASING_STREAM, positions)
      images = jax.vmap(erasing.erase_image, (0, 0, None))(keys, images, config.reprob)
    images, targets = mixup.mix_batch(
      stream(MIX_STREAM, step[None])[0],
      images,
      batch["label"],
      num_classes=self.num_classes,
      mixup_alpha=config.mixup_alpha,
      cutmix_alpha=config.cutmix_alpha,
      switch_prob=config.mixup_switch_prob,
      prob=config.mixup_prob,
      smoothing=config.label_smoothing,
    )
    images = jax.lax.with_sharding_constraint(images.astype(config.compute_dtype), batch_sharding)
    return images, targets

  def train_step(self) -> Callable[[FinetuneState, Batch], tuple[FinetuneState, dict[str, jax.Array]]]:
    """The jitted step(state, batch) -> (state, metrics: loss, lr, grad_norm), the state donated.

    Returns:
      The jitted function.
    """
    config, model, tx = self.config, self.model, self.tx

    def step_fn(state: FinetuneState, batch: Batch):
      images, targets = self.inputs(batch, state.step)
      rng = jax.random.fold_in(state.rng, state.step)

      def loss_fn(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy(logits, targets).mean()

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema = (
        optax.incremental_update(params, state.ema_params, 1 - config.ema_decay)
        if config.ema_decay
        else state.ema_params
      )
      metrics = {"loss": loss, "lr": self.learning_rate(state.step), "grad_norm": optax.tree.norm(grads)}
      return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

    return jax.jit(
      step_fn,
      in_shardings=(self.state_sharding, sharding.batch_sharding(self.mesh)),
      out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
      donate_argnums=0,
    )

  def accuracy(self, params: Any, batches) -> dict[str, float]:
    """Top-1 and top-5 (%) over host-local batches {'image', 'label', 'mask'} of every host.

    Args:
      params: the classifier's parameters.
      batches: this host's evaluation batches; 'mask' is False on padding rows, which are not counted.

    Returns:
      {'top1', 'top5'}.
    """
    top1, top5, total = results_lib.summed_counts(self.hits, params, batches, self.mesh)
    return {"top1": 100.0 * float(top1) / float(total), "top5": 100.0 * float(top5) / float(total)}

  def _hits(self, params: Any, batch: Batch) -> jax.Array:
    """int32 [3]: the batch's top-1 hits, top-5 hits and counted examples."""
    images = normalize.normalize_images(batch["image"], jnp.dtype(self.config.compute_dtype))
    logits = self.eval_model.apply({"params": params}, images)
    ranked = jax.lax.top_k(logits, min(5, self.num_classes))[1]
    correct = (ranked == batch["label"][:, None]) & batch["mask"][:, None]
    return jnp.stack([jnp.sum(correct[:, 0]), jnp.sum(correct), jnp.sum(batch["mask"])])


def _restricted(pretrained: Any, like: Any) -> Any:
  """`pretrained`'s entries at the paths of `like` (the pretrained final norm is left out of a 'mean_patch'
  classifier), each checked for its shape."""
  flat = flax.traverse_util.flatten_dict(pretrained)
  wanted = flax.traverse_util.flatten_dict(like)
  missing = [k for k in wanted if k not in flat]
  if missing or any(flat[k].shape != wanted[k].shape for k in wanted):
    raise errors.UserError(
      f"The pretrained backbone's parameters do not fit the classifier's (missing: {missing[:3]})."
    )
  return flax.traverse_util.unflatten_dict({k: flat[k] for k in wanted})


def _summary(history: list[dict[str, float]], prefix: str = "") -> dict[str, Any]:
  """Best (by top-1) and last top-1 / top-5 of the per-epoch history, for results.json."""
  top1 = [h[f"{prefix}top1"] for h in history]
  best = int(np.argmax(top1))
  return {
    f"{prefix}top1_best": top1[best],
    f"{prefix}top5_at_best": history[best][f"{prefix}top5"],
    f"{prefix}best_epoch": best + 1,
    f"{prefix}top1_last": top1[-1],
    f"{prefix}top5_last": history[-1][f"{prefix}top5"],
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes (or resumes fine-tuning) in workdir; returns the results also written to results.json.

  Args:
    config: a configs/finetune.py config; config.pretrained names an export, a pretraining workdir or a
      converted checkpoint.
    workdir: the run's directory (checkpoints, metrics, results.json, export/).

  Returns:
    top1_best, top5_at_best, best_epoch, top1_last, top5_last (and ema_* with an EMA), epochs; only
    {'preempted_at_step': step} when stopped early by a preemption.
  """
  validate_config(config)
  workdir = epath.Path(workdir)
  with checkpointing.workdir_lock(workdir) as heartbeat:
    writer = writers.create_writer(workdir)

    #### Data, backbone, classifier ####
    mesh = sharding.make_mesh()
    source = sources.get_source(
      config.dataset,
      data_dir=config.data_dir,
      manual_dir=config.manual_dir,
      splits=(config.train_split, config.eval_split),
      labels=True,
    )
    num_images = source.num_examples(config.train_split)
    steps_per_epoch = multicrop.steps_per_epoch(config, num_images)
    total_steps = config.epochs * steps_per_epoch
    backbone, backbone_params = export.load_pretrained(config.pretrained, sharding=sharding.replicated(mesh))
    finetuning = Finetuning(config, mesh, backbone, source.num_classes, steps_per_epoch)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(finetuning.abstract_state.params))
    start = "pretrained" if config.init == "pretrained" else "freshly initialised, as"
    console.detail(
      f"{type(backbone).__name__} {start} {config.pretrained}, {config.pooling} pooling, a "
      f"{source.num_classes}-class head, {num_params:,} parameters all trained: {total_steps:,} steps of "
      f"batch {config.batch_size} ({config.epochs} epochs) on {source.describe()}, {num_images:,} "
      f"{config.train_split} images; top-1 on {config.eval_split} after each epoch",
    )

    #### Restore or start ####
    checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_ckpts)
    restored = checkpointer.restore_latest(finetuning.abstract_state)
    if restored:
      state, meta = restored
      history = meta["history"]
    else:
      pretrained = backbone_params if config.init == "pretrained" else None
      state, history = finetuning.create_state(jax.random.PRNGKey(config.seed), pretrained), []
    del backbone_params
    first_step = int(jax.device_get(state.step))

    #### Train in the shared loop, validating after every epoch ####
    dataset = multicrop.labelled_canvases(config, config.train_split, start_step=first_step, source=source)
    batches = sharding.prefetch_to_device(dataset.as_numpy_iterator(), mesh)
    eval_config = ml_collections.ConfigDict({**config.to_dict(), "eval_resize": eval_resize(config)})

    def validate(step: int, state: FinetuneState) -> dict[str, float]:
      scores = {}
      for prefix, params in (("", state.params), ("ema_", state.ema_params)):
        if params:
          ds, _ = multicrop.eval_dataset(
            eval_config, config.eval_split, batch_size=config.eval_batch_size, source=source
          )
          scores.update(
            {prefix + k: v for k, v in finetuning.accuracy(params, ds.as_numpy_iterator()).items()}
          )
      history.append(scores)
      return {**scores, "epoch": step // steps_per_epoch}

    state = loop.Loop(
      total_steps=total_steps,
      batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch,
      writer=writer,
      checkpointer=checkpointer,
      heartbeat=heartbeat,
      log_every=config.log_every_steps,
      ckpt_every=steps_per_epoch,
      evaluations=[loop.Periodic("val", steps_per_epoch, validate, shown="top1")],
      checkpoint_meta=lambda step: {"history": list(history)},
    ).run(state, finetuning.train_step(), batches, first_step)
    checkpointer.close()
    stopped_at = int(jax.device_get(state.step))
    if stopped_at < total_steps:
      logging.warning(
        "Preempted at step %d of %d: run the same command again to resume.", stopped_at, total_steps
      )
      return {"preempted_at_step": stopped_at}

    #### Results and the fine-tuned classifier ####
    results = {**_summary(history), "epochs": len(history)}
    exports = [("export", state.params, "weights")]
    if config.ema_decay:
      results.update(_summary(history, "ema_"))
      exports.append(("export_ema", state.ema_params, f"EMA {config.ema_decay} of the weights"))
    for name, params, what in exports:
      export.save_backbone(
        workdir / name,
        finetuning.eval_model.backbone,
        params,
        source=f"{workdir} step {total_steps}: fine-tuned {what}, init {config.init} ({config.pretrained})",
        classifier=finetuning.eval_model,
      )
    results_lib.write(workdir, results, config)
    if jax.process_index() == 0:
      plot.save_curves(workdir)
    console.say(
      f"Fine-tuning top-1 on {config.eval_split}: best {results['top1_best']:.2f}% (epoch "
      f"{results['best_epoch']} of {len(history)}), last {results['top1_last']:.2f}% (top-5 "
      f"{results['top5_last']:.2f}%)"
      + (f"; EMA best {results['ema_top1_best']:.2f}%" if config.ema_decay else "")
      + f". Classifier in {workdir / 'export'}."
    )
    return results
