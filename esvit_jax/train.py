"""Pretraining (EsViT or MAE): `train_and_evaluate(config, workdir)`, what main.py runs on every host.

Phases, in order: workdir lock and writers, mesh, data, model and optimizer (created sharded), restore,
the k-NN monitor, then the steps in the loop every trainer shares (esvit_jax/loop.py). A resumed run
continues exactly: the state holds the step, and the step is the input stream's position.
"""

import time
from typing import Any

from absl import logging
from clu import parameter_overview
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esvit_jax import (
  checkpointing,
  collapse,
  console,
  errors,
  export,
  loop,
  mae_step,
  models,
  plot,
  schedules,
  sharding,
  tasks,
  train_step,
  writers,
)
from esvit_jax.data import constants, device_augment, multicrop, sources
from esvit_jax.evaluate import knn
from esvit_jax.models import mae

METHODS = ("esvit", "mae")


def _check_crop_size(config: ml_collections.ConfigDict, name: str, patch: int) -> None:
  size = config[name]
  if size < patch or size % patch:
    raise errors.UserError(
      f"config.{name}={size} must be a positive multiple of the patch size {patch} "
      f"(e.g. {max(patch, size - size % patch)})."
    )


def _validate_esvit(config: ml_collections.ConfigDict, patch: int) -> None:
  for name in ("global_crop_size", "local_crop_size"):
    _check_crop_size(config, name, patch)
  low, high = config.blur_sigma
  if not 0.0 < low <= high <= constants.BLUR_SIGMA[1]:
    raise errors.UserError(
      f"config.blur_sigma={tuple(config.blur_sigma)} must satisfy 0 < low <= high <= "
      f"{constants.BLUR_SIGMA[1]} (the blur kernel's taps cover 3 sigma up to that)."
    )
  if not 0.0 <= config.region_loss_weight <= 1.0:
    raise errors.UserError(f"config.region_loss_weight={config.region_loss_weight} must lie in [0, 1].")
  if config.augment_on not in multicrop.AUGMENT_ON:
    raise errors.UserError(
      f"config.augment_on={config.augment_on!r}; use 'device' (crops made in the train "
      "step, the default) or 'host' (crops made by the input pipeline)."
    )
  largest_crop = max(config.global_crop_size, config.local_crop_size if config.num_local_crops else 0)
  if config.augment_on == "device" and config.canvas_size < largest_crop:
    raise errors.UserError(
      f"config.canvas_size={config.canvas_size} is smaller than the {largest_crop} px "
      f"crops; use at least {largest_crop} (512 keeps ImageNet's images whole)."
    )


def _validate_mae(config: ml_collections.ConfigDict, patch: int) -> None:
  _check_crop_size(config, "crop_size", patch)
  if config.augment_on != "device":
    raise errors.UserError(
      f"config.augment_on={config.augment_on!r}: MAE makes its crops in the train step; use 'device'."
    )
  if config.interpolation not in device_augment.MAE_INTERPOLATIONS:
    raise errors.UserError(
      f"config.interpolation={config.interpolation!r}; use one of {device_augment.MAE_INTERPOLATIONS}."
    )
  num_patches = (config.crop_size // patch) ** 2
  if not 0 < mae.num_kept(num_patches, config.mask_ratio) < num_patches:
    raise errors.UserError(
      f"config.mask_ratio={config.mask_ratio} leaves no patch visible or none masked of {num_patches}."
    )
  if config.distill.enabled and not config.distill.teacher:
    raise errors.UserError(
      "Distillation needs its teacher: --config.distill.teacher=PATH, an MAE ViT-Base export (python -m "
      "esvit_jax.convert from-torch ...) or a pretraining workdir."
    )
  depth = models.backbone_from_config(config.model).depth
  if config.distill.enabled and not all(1 <= b <= depth for b in config.distill.blocks):
    raise errors.UserError(f"config.distill.blocks={tuple(config.distill.blocks)}: blocks are 1 to {depth}.")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start-up, before any compilation, with what to change.

  Args:
    config: a pretraining config; raises errors.UserError naming the first bad field.
  """
  if config.method not in METHODS:
    raise errors.UserError(f"config.method={config.method!r} is unknown; use one of {METHODS}.")
  if config.model.backbone not in models.VARIANTS:
    raise errors.UserError(
      f"config.model.backbone={config.model.backbone!r} is unknown; use one of {sorted(models.VARIANTS)}."
    )
  devices, processes = jax.device_count(), jax.process_count()
  if config.batch_size % devices or config.batch_size % processes:
    raise errors.UserError(
      f"config.batch_size={config.batch_size} must be divisible by the {devices} "
      f"devices and {processes} processes; use a multiple of {np.lcm(devices, processes)}."
    )
  patch = models.backbone_from_config(config.model).patch_size  # The variant's unless the config sets it.
  _check_crop_size(config, "eval_crop_size", patch)
  (_validate_mae if config.method == "mae" else _validate_esvit)(config, patch)
  if config.sharding not in sharding.STRATEGIES:
    raise errors.UserError(f"config.sharding={config.sharding!r}; use one of {sharding.STRATEGIES}.")
  tasks.matmul_precision(config.knn_matmul_precision)  # Raises on an unknown name.
  if config.knn_features not in knn.FEATURES:
    raise errors.UserError(f"config.knn_features={config.knn_features!r}; use one of {knn.FEATURES}.")


def build_pretraining(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, steps_per_epoch: int
) -> train_step.Pretraining | mae_step.MaePretraining:
  """The method's model, optimizer, schedules and shardings (config.method), its teacher loaded for D-MAE.

  Args:
    config: a pretraining config.
    mesh: from sharding.make_mesh.
    steps_per_epoch: optimizer steps per epoch of the dataset.

  Returns:
    train_step.Pretraining (EsViT) or mae_step.MaePretraining.
  """
  if config.method == "esvit":
    return train_step.Pretraining(config, mesh, steps_per_epoch=steps_per_epoch)
  teacher = None
  if config.distill.enabled:
    dtype = jnp.dtype(config.compute_dtype)
    teacher = export.load_pretrained(config.distill.teacher, dtype=dtype, sharding=sharding.replicated(mesh))
    if (
      not isinstance(teacher[0], models.VisionTransformer)
      or teacher[0].num_heads != config.distill.teacher_heads
    ):
      raise errors.UserError(
        f"{config.distill.teacher} is not a ViT with config.distill.teacher_heads="
        f"{config.distill.teacher_heads} heads: {models.backbones.architecture(teacher[0])}."
      )
  return mae_step.MaePretraining(config, mesh, steps_per_epoch=steps_per_epoch, teacher=teacher)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Pretrains (or resumes pretraining) in workdir; returns the final train state.

  Args:
    config: a pretraining config (configs/common.py).
    workdir: the run's directory (checkpoints, metrics, config.json); a run there resumes.

  Returns:
    The train state (train_step.TrainState or mae_step.MaeTrainState) where the run stopped (the last
    step, or earlier after a preemption).
  """
  validate_config(config)
  workdir = epath.Path(workdir)
  with checkpointing.workdir_lock(workdir) as heartbeat:
    #### Writers ####
    writer = writers.create_writer(workdir)
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    #### Mesh and data ####
    mesh = sharding.make_mesh()
    monitored = (config.eval_split,) if config.eval_every_steps else ()  # The k-NN monitor needs labels.
    source = sources.get_source(
      config.dataset,
      data_dir=config.data_dir,
      manual_dir=config.manual_dir,
      download=config.download,
      splits=(config.train_split, *monitored),
      labels=bool(monitored),
    )
    num_images = source.num_examples(config.train_split)
    steps_per_epoch = multicrop.steps_per_epoch(config, num_images)
    total_steps = schedules.total_steps(config, steps_per_epoch)
    logging.info(
      "%s: %d steps per epoch of %d images, %d steps in all.",
      source.describe(),
      steps_per_epoch,
      config.batch_size,
      total_steps,
    )

    #### Model, optimizer, schedules and shardings, built once; the state created sharded or restored ####
    pretraining = build_pretraining(config, mesh, steps_per_epoch)
    checkpointer = checkpointing.Checkpointer(
      workdir, keep=config.keep_ckpts, keep_every=config.keep_every_steps
    )
    restored = checkpointer.restore_latest(pretraining.abstract_state)
    if restored:
      state, meta = restored
      logging.info("Resumed from step %d of %s.", meta["step"], checkpointer.directory)
    else:
      state = pretraining.create_state(jax.random.PRNGKey(config.seed))
      parameter_overview.log_parameter_overview(
        state.params, include_stats=False, jax_logging_process=0, msg="Student parameters"
      )
    first_step = int(jax.device_get(state.step))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(pretraining.abstract_state.params))
    console.detail(
      f"{config.model.backbone} with its {'heads' if config.method == 'esvit' else 'decoder'}, "
      f"{num_params:,} parameters; {source.describe()}, "
      f"{num_images:,} {config.train_split} images",
      f"{total_steps:,} steps of batch {config.batch_size} ({total_steps / steps_per_epoch:.3g} epochs)"
      + (f", resuming after step {first_step:,}" if first_step else ""),
    )

    #### Input, prefetched to the devices ####
    dataset = multicrop.pretrain_dataset(config, start_step=first_step, source=source)
    batches = sharding.prefetch_to_device(dataset.as_numpy_iterator(), mesh, size=2)

    #### k-NN monitor on a held-out split ####
    dtype = jnp.dtype(config.compute_dtype)
    features = jax.jit(
      lambda state, images: knn.pooled_features(
        pretraining.backbone, pretraining.backbone_params(state), images, dtype, config.knn_features
      )
    )

    def knn_monitor(step: int, state: Any) -> dict[str, float]:
      """The k-NN accuracy of the backbone (EsViT's teacher, MAE's encoder) on the held-out split."""
      with tasks.matmul_precision(config.knn_matmul_precision):  # As the k-NN task (configs/knn.py).
        return knn.evaluate_split_pair(
          lambda images: features(state, images),
          config,
          mesh,
          source=source,
          ks=(config.knn_k,),
          temperature=config.knn_temperature,
          max_train=config.knn_train_examples,
          max_test=config.knn_eval_examples,
        )

    evaluations = (
      [loop.Periodic("knn", config.eval_every_steps, knn_monitor, shown=f"knn_top1_k{config.knn_k}")]
      if config.eval_every_steps
      else []
    )
    if evaluations and first_step == 0:
      started = time.time()
      writer.write_scalars(0, {**knn_monitor(0, state), "knn_seconds": time.time() - started})

    #### Train loop ####
    on_log = None
    if config.method == "esvit":
      collapse_monitor = collapse.CollapseMonitor(config.model.out_dim, patience=config.collapse_patience)

      def on_log(step: int, metrics: dict[str, Any]) -> None:
        if (warning := collapse_monitor.update(step, metrics)) and jax.process_index() == 0:
          logging.warning(warning)

    state = loop.Loop(
      total_steps=total_steps,
      batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch,
      writer=writer,
      checkpointer=checkpointer,
      heartbeat=heartbeat,
      log_every=config.log_every_steps,
      ckpt_every=config.ckpt_every_steps,
      evaluations=evaluations,
      on_log=on_log,
      checkpoint_meta=lambda step: {"input_position": step, "config": config.to_json_best_effort()},
      profile_steps=config.profile_steps,
      profile_dir=workdir,
    ).run(state, pretraining.train_step(), batches, first_step)

    #### Export the backbone (EsViT's teacher, MAE's encoder) ####
    if int(jax.device_get(state.step)) == total_steps:
      export.save_backbone(
        workdir / "export",
        pretraining.backbone,
        pretraining.backbone_params(state),
        source=f"{workdir} step {total_steps} ({'teacher' if config.method == 'esvit' else 'encoder'})",
      )
    checkpointer.close()
    if jax.process_index() == 0:
      curves = plot.save_curves(workdir)
      logging.info("Learning curves: %s", curves)
      if int(jax.device_get(state.step)) == total_steps:
        exported = "teacher backbone" if config.method == "esvit" else "encoder"
        console.say(f"Pretraining done: {exported} in {workdir / 'export'}, learning curves in {curves}.")
    return state
