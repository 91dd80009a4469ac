"""EsViT pretraining: `train_and_evaluate(config, workdir)`, the loop that main.py runs on every host.

Phases, in order: workdir lock and writers, mesh, data, model and optimizer (created sharded), restore,
then the steps. The step runs with batches prefetched to the devices; the host waits for the devices only
on log, checkpoint and evaluation steps. A resumed run continues exactly: the state holds the step, and
the step is the input stream's position.
"""
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from clu import periodic_actions
from etils import epath

from esvit_jax import checkpointing
from esvit_jax import export
from esvit_jax import models
from esvit_jax import sharding
from esvit_jax import train_step
from esvit_jax import writers
from esvit_jax.data import constants
from esvit_jax.data import multicrop
from esvit_jax.data import sources
from esvit_jax.evaluate import knn


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stops without writing a checkpoint of that state."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start-up, before any compilation, with what to change."""
  if config.model.backbone not in models.VARIANTS:
    raise ValueError(f"config.model.backbone={config.model.backbone!r} is unknown; "
                     f"use one of {sorted(models.VARIANTS)}.")
  devices, processes = jax.device_count(), jax.process_count()
  if config.batch_size % devices or config.batch_size % processes:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the {devices} devices "
                     f"and {processes} processes; use a multiple of {np.lcm(devices, processes)}.")
  patch = config.model.get("patch_size", 4)
  for name in ("global_crop_size", "local_crop_size", "eval_crop_size"):
    size = config[name]
    if size < patch or size % patch:
      raise ValueError(f"config.{name}={size} must be a positive multiple of the patch size {patch} "
                       f"(e.g. {max(patch, size - size % patch)}).")
  low, high = config.blur_sigma
  if not 0.0 < low <= high <= constants.BLUR_SIGMA[1]:
    raise ValueError(f"config.blur_sigma={tuple(config.blur_sigma)} must satisfy 0 < low <= high <= "
                     f"{constants.BLUR_SIGMA[1]} (the blur kernel's taps cover 3 sigma up to that).")
  if not 0.0 <= config.region_loss_weight <= 1.0:
    raise ValueError(f"config.region_loss_weight={config.region_loss_weight} must lie in [0, 1].")
  if config.sharding not in sharding.STRATEGIES:
    raise ValueError(f"config.sharding={config.sharding!r}; use one of {sharding.STRATEGIES}.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_step.TrainState:
  """Pretrains (or resumes pretraining) in workdir; returns the final train state."""
  validate_config(config)
  workdir = epath.Path(workdir)
  with checkpointing.workdir_lock(workdir) as heartbeat:
    #### Writers ####
    writer = writers.create_writer(workdir)
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    #### Mesh and data ####
    mesh = sharding.make_mesh()
    source = sources.get_source(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir,
                                download=config.download)
    steps_per_epoch = multicrop.steps_per_epoch(config, source.num_examples(config.train_split))
    total_steps = config.total_steps or config.epochs * steps_per_epoch
    logging.info("%s: %d steps per epoch of %d images, %d steps in all.", source.describe(),
                 steps_per_epoch, config.batch_size, total_steps)

    #### Model and optimizer, created sharded; restore ####
    step_fn = train_step.make_train_step(config, mesh, steps_per_epoch=steps_per_epoch)
    checkpointer = checkpointing.Checkpointer(workdir, keep=config.keep_ckpts, keep_every=config.keep_every_steps)
    restored = checkpointer.restore_latest(
        train_step.abstract_train_state(config, mesh, steps_per_epoch=steps_per_epoch))
    if restored:
      state, meta = restored
      logging.info("Resumed from step %d of %s.", meta["step"], checkpointer.directory)
    else:
      state = train_step.create_train_state(config, mesh, jax.random.PRNGKey(config.seed),
                                            steps_per_epoch=steps_per_epoch)
      parameter_overview.log_parameter_overview(state.params, include_stats=False,
                                                jax_logging_process=0, msg="Student parameters")
    first_step = int(jax.device_get(state.step))

    #### Input, prefetched to the devices ####
    dataset = multicrop.pretrain_dataset(config, start_step=first_step, source=source)
    batches = sharding.prefetch_to_device(dataset.as_numpy_iterator(), mesh, size=2)

    #### k-NN monitor on a held-out split ####
    model = train_step.build_model(config)
    dtype = jnp.dtype(config.compute_dtype)
    features = jax.jit(lambda params, images: knn.pooled_features(model.backbone, params["backbone"], images, dtype))

    def knn_monitor(step: int) -> float:
      """Logs the teacher's k-NN accuracy; returns the seconds it took."""
      t = time.time()
      results = knn.evaluate_split_pair(
          lambda images: features(state.teacher_params, images), config, mesh, source=source,
          ks=(config.knn_k,), temperature=config.knn_temperature,
          max_train=config.knn_train_examples, max_test=config.knn_eval_examples)
      seconds = time.time() - t
      writer.write_scalars(step, {**results, "knn_seconds": seconds})
      return seconds

    if config.eval_every_steps and first_step == 0:
      knn_monitor(0)

    #### Train loop ####
    hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)]
    if config.profile_steps and jax.process_index() == 0:
      hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                            first_profile=first_step + 5, every_secs=None))
    preempted = _sigterm_flag()
    last_log = (first_step, time.time())
    paused = 0.0  # Seconds of evaluation since the last log: not training throughput.
    skipped_files = 0
    logging.info("Training from step %d to %d.", first_step, total_steps)
    try:
      for step in range(first_step + 1, total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch = next(batches)
          skipped_files += int(batch.pop("skipped_files"))
          state, metrics = step_fn(state, batch)
        if step == first_step + 1:
          jax.block_until_ready(state)
          writer.write_scalars(step, {"first_step_seconds": time.time() - last_log[1]})
          last_log = (step, time.time())
        for hook in hooks:
          hook(step)
        stop = preempted() if jax.process_count() == 1 else checkpointer.reached_preemption(step)
        is_last = step == total_steps

        if step % config.log_every_steps == 0 or is_last:
          metrics = _finite_or_raise(jax.device_get(metrics), step, checkpointer)
          (previous_step, previous_time), last_log = last_log, (step, time.time())
          seconds, paused = max(last_log[1] - previous_time - paused, 1e-9), 0.0
          images_per_sec = (step - previous_step) * config.batch_size / seconds
          all_skipped = int(np.sum(multihost_utils.process_allgather(np.int64(skipped_files))))
          writer.write_scalars(step, {**metrics, "images_per_sec": images_per_sec,
                                      "epoch": step / steps_per_epoch, "skipped_files": all_skipped})
          heartbeat()

        if config.eval_every_steps and (step % config.eval_every_steps == 0 or is_last):
          paused += knn_monitor(step)

        if step % config.ckpt_every_steps == 0 or is_last or stop:
          _finite_or_raise(jax.device_get({"loss": metrics["loss"]}), step, checkpointer)
          checkpointer.save(step, state, {"input_position": step, "config": config.to_json_best_effort()},
                            force=True)
        if stop:
          logging.warning("Preempted: checkpoint of step %d written, exiting.", step)
          break
    finally:
      checkpointer.wait()
      writer.flush()

    #### Export the teacher backbone ####
    if int(jax.device_get(state.step)) == total_steps:
      export.save_backbone(workdir / "export", model.backbone, state.teacher_params["backbone"],
                           source=f"{workdir} step {total_steps} (teacher)")
    checkpointer.close()
    return state


def _finite_or_raise(metrics: dict[str, Any], step: int, checkpointer: checkpointing.Checkpointer) -> dict:
  loss = float(np.asarray(metrics["loss"]))
  if not np.isfinite(loss):
    steps = checkpointer.all_steps()
    kept = f"the last good checkpoint (step {steps[-1]}) is kept" if steps else "no checkpoint was written"
    raise NonFiniteLossError(
        f"Loss is {loss} at step {step}: stopping without saving this state; {kept}. Lower config.lr, "
        "raise config.warmup_epochs, or use config.compute_dtype='float32'.")
  return metrics


def _sigterm_flag():
  """Installs a SIGTERM handler (preemption notice) and returns a function telling if it fired."""
  fired = []
  signal.signal(signal.SIGTERM, lambda *_: fired.append(True))
  return lambda: bool(fired)
