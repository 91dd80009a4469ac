"""The training loop that pretraining and the linear probe share.

One loop skeleton, so that every trainer gets the same machinery: batches prefetched to the devices, the
host waiting for the devices only on log, evaluation and checkpoint steps; progress and images/s; the
fraction of time spent waiting for input; a checkpoint on preemption (SIGTERM) before exiting; a stop,
naming the step, when the loss stops being finite, without writing that state; periodic evaluations whose
time is not counted as training time. Metrics go to the writer (metrics.jsonl, TensorBoard, the log file);
process 0's console shows one progress line (esvit_jax/console.py), updated on log steps only.
"""

from collections.abc import Callable, Iterator
import dataclasses
import signal
import time
from typing import Any

from absl import logging
from clu import metric_writers, periodic_actions
import jax
from jax.experimental import multihost_utils
import numpy as np

from esvit_jax import checkpointing, console

Metrics = dict[str, Any]


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the run stops without writing a checkpoint of that state."""


def is_due(step: int, every: int, last_step: int) -> bool:
  """Whether a periodic action runs at `step`: every `every` steps (never if 0) and at the last step.

  Args:
    step: the step just completed (1-based).
    every: the period in steps; 0 or less: only at the last step.
    last_step: the run's final step.

  Returns:
    True when the action is due.
  """
  return step == last_step or (every > 0 and step % every == 0)


@dataclasses.dataclass
class Periodic:
  """An evaluation run every `every` steps (and at the last): fn(step, state) -> scalars to log; its
  duration is logged as `<name>_seconds` and not counted as training time. The scalar named `shown` (a %)
  appears on the progress line as '<name> <value>%'."""

  name: str
  every: int
  fn: Callable[[int, Any], Metrics]
  shown: str | None = None


@dataclasses.dataclass
class Loop:
  """What a trainer hands the loop besides its state, step function and batches.

  Attributes:
    total_steps: the run's last step.
    batch_size: global examples per step (for images/s).
    steps_per_epoch: for the logged epoch.
    writer: metric writer (esvit_jax.writers.create_writer).
    checkpointer: where checkpoints go.
    heartbeat: refreshes the workdir lock (checkpointing.workdir_lock).
    log_every: steps between logged metrics.
    ckpt_every: steps between checkpoints.
    evaluations: periodic evaluations.
    on_log: called with (step, fetched metrics) after each log, e.g. the collapse monitor.
    checkpoint_meta: JSON-able metadata saved with the checkpoint of a step.
    profile_steps: > 0: a profiler trace of that many steps (process 0), written to profile_dir.
    profile_dir: where the trace goes.
  """

  total_steps: int
  batch_size: int
  steps_per_epoch: int
  writer: metric_writers.MetricWriter
  checkpointer: checkpointing.Checkpointer
  heartbeat: Callable[[], None]
  log_every: int
  ckpt_every: int
  evaluations: list[Periodic] = dataclasses.field(default_factory=list)
  on_log: Callable[[int, Metrics], None] | None = None
  checkpoint_meta: Callable[[int], dict[str, Any]] = lambda step: {}
  profile_steps: int = 0
  profile_dir: Any = None

  def run(
    self,
    state: Any,
    step_fn: Callable[[Any, Any], tuple[Any, Metrics]],
    batches: Iterator[dict],
    first_step: int,
  ) -> Any:
    """Runs steps first_step + 1 .. total_steps (or until preempted) and returns the last state.

    Args:
      state: the train state after first_step steps.
      step_fn: the jitted step(state, batch) -> (state, metrics); metrics hold a scalar 'loss'.
      batches: device batches; each may hold 'skipped_files', this host's count of undecodable files.
      first_step: the number of steps already done.

    Returns:
      The state after the last step run.

    Raises:
      NonFiniteLossError: the loss became NaN or infinite at a logged or checkpointed step.
    """
    hooks = []
    if self.profile_steps and jax.process_index() == 0:
      hooks.append(
        periodic_actions.Profile(
          logdir=self.profile_dir,
          num_profile_steps=self.profile_steps,
          profile_duration_ms=None,  # Stop after the steps asked for, not after 3 s at least.
          first_profile=first_step + 5,
          every_secs=None,
        )
      )
    preempted = _sigterm_flag()
    last_log = (first_step, time.time())
    paused = 0.0  # Seconds of evaluation since the last log: not training time.
    input_wait = 0.0  # Seconds spent waiting for the next batch since the last log.
    skipped_files = 0
    metrics = {}
    logging.info("Training from step %d to %d.", first_step, self.total_steps)
    progress = console.Progress(self.total_steps, first_step)
    progress.start()
    try:
      for step in range(first_step + 1, self.total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          wait_start = time.time()
          batch = next(batches)
          input_wait += time.time() - wait_start
          skipped_files += int(batch.pop("skipped_files", 0))
          state, metrics = step_fn(state, batch)
        if step == first_step + 1:
          jax.block_until_ready(state)
          self.writer.write_scalars(step, {"first_step_seconds": time.time() - last_log[1]})
          last_log, input_wait = (step, time.time()), 0.0
        for hook in hooks:
          hook(step)
        stop = preempted() if jax.process_count() == 1 else self.checkpointer.reached_preemption(step)

        if is_due(step, self.log_every, self.total_steps):
          metrics = self._finite_or_raise(jax.device_get(metrics), step)
          (previous_step, previous_time), last_log = last_log, (step, time.time())
          seconds, paused = max(last_log[1] - previous_time - paused, 1e-9), 0.0
          input_wait_fraction, input_wait = input_wait / seconds, 0.0
          images_per_sec = (step - previous_step) * self.batch_size / seconds
          all_skipped = int(np.sum(multihost_utils.process_allgather(np.int64(skipped_files))))
          self.writer.write_scalars(
            step,
            {
              **metrics,
              "images_per_sec": images_per_sec,
              "input_wait": input_wait_fraction,
              "epoch": step / self.steps_per_epoch,
              "skipped_files": all_skipped,
            },
          )
          progress.update(
            step,
            loss=float(metrics["loss"]),
            images_per_sec=images_per_sec,
            input_wait=input_wait_fraction,
            seconds_per_step=seconds / (step - previous_step) if step > previous_step else None,
          )
          self.heartbeat()
          if self.on_log:
            self.on_log(step, metrics)

        for evaluation in self.evaluations:
          if is_due(step, evaluation.every, self.total_steps):
            started = time.time()
            scalars = evaluation.fn(step, state)
            seconds = time.time() - started
            paused += seconds
            self.writer.write_scalars(step, {**scalars, f"{evaluation.name}_seconds": seconds})
            if evaluation.shown:
              progress.show(evaluation.name, float(scalars[evaluation.shown]))
            self.heartbeat()

        if is_due(step, self.ckpt_every, self.total_steps) or stop:
          self._finite_or_raise(jax.device_get({"loss": metrics["loss"]}), step)
          self.checkpointer.save(step, state, self.checkpoint_meta(step), force=True)
        if stop:
          logging.warning("Preempted: checkpoint of step %d written, exiting.", step)
          break
    finally:
      progress.end_line()
      self.checkpointer.wait()
      self.writer.flush()
    return state

  def _finite_or_raise(self, metrics: Metrics, step: int) -> Metrics:
    loss = float(np.asarray(metrics["loss"]))
    if not np.isfinite(loss):
      steps = self.checkpointer.all_steps()
      kept = f"the last good checkpoint (step {steps[-1]}) is kept" if steps else "no checkpoint was written"
      raise NonFiniteLossError(
        f"Loss is {loss} at step {step}: stopping without saving this state; {kept}. Lower config.lr, "
        "raise config.warmup_epochs, or use config.compute_dtype='float32'."
      )
    return metrics


def _sigterm_flag() -> Callable[[], bool]:
  """Installs a SIGTERM handler (preemption notice) and returns a function telling if it fired."""
  fired = []
  signal.signal(signal.SIGTERM, lambda *_: fired.append(True))
  return lambda: bool(fired)
