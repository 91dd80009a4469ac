"""Linear probe on frozen features (the paper's protocol; configs/linear_probe.py).

A linear layer (weights N(0, 0.01), bias 0) on the concatenated average-pooled outputs of the frozen teacher
backbone's last n blocks, trained with SGD (momentum 0.9) on random-resized-crop + flip views, lr scaled by
batch / 256 and annealed per epoch with a cosine (torch's CosineAnnealingLR stepped per epoch). Top-1 on
the validation split after every epoch; the best and the last go to results.json. It trains in the loop
pretraining uses (esvit_jax/loop.py): checkpoints, exact resume, a checkpoint on SIGTERM, the stop on a
non-finite loss, progress and metrics work the same way.
"""

from collections.abc import Callable
from typing import Any

from absl import logging
from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from esvit_jax import checkpointing, console, errors, export, loop, models, schedules, sharding, writers
from esvit_jax.data import multicrop, normalize, sources
from esvit_jax.evaluate import results as results_lib


@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  params: Any
  opt_state: optax.OptState


def classifier(num_classes: int) -> nn.Dense:
  """The probe's linear layer, initialised as the paper's (weights N(0, 0.01), bias 0).

  Args:
    num_classes: output size.

  Returns:
    The Dense module (unbound).
  """
  return nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)


def epoch_cosine(peak: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """lr of epoch e = peak * (1 + cos(pi * e / epochs)) / 2, constant within the epoch.

  Args:
    peak: the learning rate of epoch 0.
    epochs: length of the cosine.
    steps_per_epoch: optimizer steps in one epoch.

  Returns:
    The schedule: step -> learning rate.
  """
  return lambda step: peak * 0.5 * (1 + jnp.cos(jnp.pi * (step // steps_per_epoch) / epochs))


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """torch SGD: weight decay added to the gradient before momentum.

  Args:
    config: the probe config (lr, batch_size, weight_decay, momentum, epochs).
    steps_per_epoch: optimizer steps in one epoch, for the per-epoch cosine.

  Returns:
    The optax SGD transformation with its schedule.
  """
  peak = schedules.peak_learning_rate(config)
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(epoch_cosine(peak, config.epochs, steps_per_epoch), momentum=config.momentum),
  )


class Probe:
  """The probe's jitted functions on frozen `features(images) -> [B, D]`, sharded over `mesh`."""

  def __init__(
    self,
    features: Callable[[jax.Array], jax.Array],
    feature_dim: int,
    num_classes: int,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
  ):
    self.head, replicated = classifier(num_classes), sharding.replicated(mesh)

    def init(rng):
      params = self.head.init(rng, jnp.zeros((1, feature_dim)))["params"]
      return ProbeState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def train(state, batch):
      inputs = jax.lax.stop_gradient(features(batch["image"]))

      def loss_fn(params):
        logits = self.head.apply({"params": params}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
      ), {"loss": loss}

    def correct(params, batch):
      predicted = jnp.argmax(self.head.apply({"params": params}, features(batch["image"])), axis=-1)
      return jnp.sum((predicted == batch["label"]) & batch["mask"]), jnp.sum(batch["mask"])

    self.abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
    self.state_sharding = jax.tree.map(lambda _: replicated, self.abstract_state)
    self.init = jax.jit(init, out_shardings=self.state_sharding)
    self.train = jax.jit(
      train,
      in_shardings=(self.state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(self.state_sharding, replicated),
      donate_argnums=0,
    )
    self.correct = jax.jit(correct)
    self.mesh = mesh

  def accuracy(self, params, batches) -> float:
    """Top-1 (%) over host-local batches {'image', 'label', 'mask'} of every host.

    Args:
      params: the classifier's parameters.
      batches: this host's batches; 'mask' is False for padding rows, which are not counted.

    Returns:
      Top-1 accuracy in percent over all hosts' unmasked examples.
    """
    hits, total = results_lib.summed_counts(self.correct, params, batches, self.mesh)
    return 100.0 * float(hits) / float(total)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the probe (or resumes it) and returns the results also written to workdir/results.json.

  Args:
    config: a configs/linear_probe.py config; config.pretrained names an export directory or workdir.
    workdir: the probe's directory (checkpoints, metrics, results.json).

  Returns:
    linear_top1_best / linear_top1_last (%), best_epoch, epochs and feature_dim; only
    {'preempted_at_step': step} when stopped early by a preemption.
  """
  if not config.pretrained:
    raise errors.UserError("Set --config.pretrained to an export directory or a pretraining workdir.")
  workdir = epath.Path(workdir)
  with checkpointing.workdir_lock(workdir) as heartbeat:
    writer = writers.create_writer(workdir)

    #### Frozen backbone, data, classifier ####
    mesh = sharding.make_mesh()
    dtype = jnp.dtype(config.compute_dtype)
    backbone, backbone_params = export.load_pretrained(
      config.pretrained, dtype=dtype, sharding=sharding.replicated(mesh)
    )
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

    avgpool = (True,) if config.avgpool_patchtokens else ()
    if avgpool and not isinstance(backbone, models.VisionTransformer):
      raise errors.UserError(
        "config.avgpool_patchtokens=True needs a ViT backbone (it adds the mean of the "
        "patch tokens to the CLS tokens); set it to False for a Swin."
      )

    def features(images):
      images = normalize.normalize_images(images, dtype)
      return backbone.apply(
        {"params": backbone_params}, images, config.n_last_blocks, *avgpool, method=backbone.last_blocks
      ).astype(jnp.float32)

    size = config.eval_crop_size
    feature_dim = jax.eval_shape(features, jnp.zeros((1, size, size, 3), jnp.uint8)).shape[-1]
    logging.info(
      "Linear probe on %d-d features of the last %d blocks, %d classes, %d steps.",
      feature_dim,
      config.n_last_blocks,
      source.num_classes,
      total_steps,
    )
    console.detail(
      f"a linear layer on {feature_dim}-d features of the last {config.n_last_blocks} blocks of "
      f"{type(backbone).__name__} from {config.pretrained}",
      f"{source.describe()}, {num_images:,} {config.train_split} images: {total_steps:,} steps of batch "
      f"{config.batch_size} ({config.epochs} epochs), top-1 on {config.eval_split} after each epoch",
    )
    probe = Probe(features, feature_dim, source.num_classes, make_optimizer(config, steps_per_epoch), mesh)

    #### Restore ####
    checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_ckpts)
    target = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      probe.abstract_state,
      probe.state_sharding,
    )
    restored = checkpointer.restore_latest(target)
    if restored:
      state, meta = restored
      history = meta["history"]
    else:
      state, history = probe.init(jax.random.PRNGKey(config.seed)), []
    first_step = int(jax.device_get(state.step))

    #### Train in the shared loop, validating after every epoch ####
    dataset = multicrop.train_classification_dataset(
      config,
      config.train_split,
      batch_size=config.batch_size,
      crop_size=config.crop_size,
      start_step=first_step,
      source=source,
    )
    batches = sharding.prefetch_to_device(dataset.as_numpy_iterator(), mesh)

    def validate(step: int, state: ProbeState) -> dict[str, float]:
      ds, _ = multicrop.eval_dataset(
        config, config.eval_split, batch_size=config.eval_batch_size, source=source
      )
      history.append(probe.accuracy(state.params, ds.as_numpy_iterator()))
      return {"val_top1": history[-1], "epoch": step // steps_per_epoch}

    state = loop.Loop(
      total_steps=total_steps,
      batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch,
      writer=writer,
      checkpointer=checkpointer,
      heartbeat=heartbeat,
      log_every=config.log_every_steps,
      ckpt_every=steps_per_epoch,
      evaluations=[loop.Periodic("val", steps_per_epoch, validate, shown="val_top1")],
      checkpoint_meta=lambda step: {"history": list(history)},
    ).run(state, probe.train, batches, first_step)
    checkpointer.close()
    if int(jax.device_get(state.step)) < total_steps:
      logging.warning(
        "Preempted at step %d of %d: run the same command again to resume.",
        int(jax.device_get(state.step)),
        total_steps,
      )
      return {"preempted_at_step": int(jax.device_get(state.step))}

    best = int(np.argmax(history))
    results = {
      "linear_top1_best": history[best],
      "linear_top1_last": history[-1],
      "best_epoch": best + 1,
      "epochs": len(history),
      "feature_dim": feature_dim,
    }
    results_lib.write(workdir, results, config)
    console.say(
      f"Linear probe top-1 on {config.eval_split}: best {results['linear_top1_best']:.2f}% (epoch {best + 1} "
      f"of {len(history)}), last {results['linear_top1_last']:.2f}%."
    )
    return results
