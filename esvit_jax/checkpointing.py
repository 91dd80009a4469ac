"""Orbax checkpoints of the whole train state: asynchronous saves, exact resume, damage fallback, locking.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `state` is the train state pytree (step, student,
teacher, optimizer, centres, RNG); `meta` is JSON (step, the input-stream position, the config). Orbax
writes each step to a temporary directory and renames it when complete, so a kill at any moment leaves
either the previous checkpoints or a complete new one; an unfinished step is never listed.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from esvit_jax import errors


def orbax_path(path: str | os.PathLike) -> epath.Path:
  """Orbax writes only to absolute paths: a relative local path (`--workdir runs/x`) is made absolute.

  Args:
    path: a local path or a remote URL (gs://...), which is kept as it is.

  Returns:
    The absolute path.
  """
  path = epath.Path(path)
  return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(path))


class CheckpointError(RuntimeError):
  """No usable checkpoint where checkpoints exist: refuse to start from scratch silently."""


class WorkdirInUseError(errors.UserError, RuntimeError):
  """Another run holds the workdir: the user started two runs on one --workdir."""


class Checkpointer:
  """Saves and restores the train state in WORKDIR/checkpoints; a collective on multi-host runs."""

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    keep: int = 3,
    keep_every: int | None = None,
    asynchronous: bool = True,
  ):
    self.directory = orbax_path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      keep_period=keep_every or None,
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=asynchronous,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def all_steps(self) -> list[int]:
    """The steps of the complete checkpoints on disk.

    Returns:
      The steps in increasing order.
    """
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Starts an asynchronous save; returns whether one was started.

    Args:
      step: the train step the state belongs to (the checkpoint's name).
      state: the train state pytree.
      meta: JSON-serialisable facts about the run (input-stream position, config); the step is added.
      force: save even where the manager's save policy would skip this step.

    Returns:
      Whether a save was started.
    """
    meta = {**meta, "step": int(step)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores one step into `target` (abstract arrays carrying the shardings of the current mesh).

    Args:
      step: the checkpoint to read.
      target: the train state's structure as jax.ShapeDtypeStruct leaves with their shardings.

    Returns:
      The restored state (laid out as `target`) and the meta dict saved with it.
    """
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored.state, restored.meta

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that restores; damaged newer ones are skipped with a warning.

    Returns None only when the workdir has no checkpoint at all; raises CheckpointError when
    checkpoints exist but none can be read, so a run never restarts from scratch by accident.

    Args:
      target: the train state's structure as jax.ShapeDtypeStruct leaves with their shardings.

    Returns:
      (state, meta) of the newest readable checkpoint, or None when there is none.
    """
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except  # Any read failure means damage.
        logging.warning(
          "Checkpoint %s/%d is damaged (%s: %s); falling back to the previous one.",
          self.directory,
          step,
          type(e).__name__,
          str(e)[:500],
        )
        failures.append(step)
        continue
      if failures:
        logging.warning("Resuming from step %d; damaged checkpoints skipped: %s.", step, failures)
      return state, meta
    if steps:
      raise CheckpointError(
        f"Checkpoints exist in {self.directory} (steps {steps}) but none could be restored. Refusing to "
        "start from scratch: move or delete that directory to start a new run, or repair it."
      )
    return None

  def reached_preemption(self, step: int) -> bool:
    """True when every process agrees to stop at this step after a preemption notice (multi-host).

    Args:
      step: the step the loop has just finished.

    Returns:
      Whether to save and stop now.
    """
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until the asynchronous saves in flight are complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self.manager.close()


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, *, stale_after_s: float = 900.0):
  """Holds exclusive ownership of a workdir for the duration of a run (process 0 only takes it).

  Local paths use an OS lock (released by the kernel even on SIGKILL). Remote paths (gs://...) have no
  locks, so they use an owner file with a heartbeat: a fresh owner file of another run is an error.
  Yields a heartbeat function for the loop to call now and then (a no-op where the OS lock suffices).

  Args:
    workdir: the run's directory (created if missing).
    stale_after_s: seconds after its last heartbeat that a remote owner file no longer counts.

  Yields:
    The heartbeat function (no arguments); raises WorkdirInUseError on entry when another run holds it.
  """
  if jax.process_index() != 0:
    yield lambda: None
    return
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
  if "://" not in os.fspath(workdir):
    with open(workdir / ".lock", "a+") as f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        f.seek(0)
        raise WorkdirInUseError(
          f"Another run is using workdir {workdir} "
          f"(lock held by {f.read().strip() or 'an unknown process'}). "
          "Use another --workdir, or stop the other run first."
        ) from None
      f.truncate(0)
      f.write(json.dumps(owner))
      f.flush()
      yield lambda: None
    return
  owner_file = workdir / "OWNER"
  if owner_file.exists():
    previous = json.loads(owner_file.read_text())
    age = time.time() - previous.get("heartbeat", 0)
    if age < stale_after_s:
      raise WorkdirInUseError(
        f"Another run is using workdir {workdir} ({previous}, heartbeat {age:.0f}s ago). Use another "
        f"--workdir, stop the other run, or wait {stale_after_s:.0f}s after it died."
      )

  def heartbeat():
    return owner_file.write_text(json.dumps({**owner, "heartbeat": time.time()}))

  heartbeat()
  yield heartbeat
  owner_file.unlink(missing_ok=True)
