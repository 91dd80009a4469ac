r"""Fault injection: kill a tiny pretraining run again and again, resume it, and compare with a clean run.

  python benchmarks/faults.py --kills 20            # the full loop (recorded in README.md)
  python benchmarks/faults.py --kills 3 --steps 4   # what tests/test_faults.py runs

Each attempt starts `main.py` on tests/configs/tiny.py and kills it with SIGKILL or SIGTERM at a step drawn
before the run's end (the kills left are spread over the steps left), or, half of the time, as soon as an
asynchronous checkpoint is being written (its temporary directory exists) after training resumed. The run is
restarted from its checkpoints until it completes; its losses and final teacher must then equal those of an
uninterrupted run. A kill lands when it interrupts the run before its end; a run that completes before all
kills landed (a fast machine can outrun the poll) is compared too, and the kills left go to a fresh run.

Prints each kill, a table (kills, resumes, steps lost per kill, corrupt checkpoints: restores that had to
fall back, the divergences) and "kills landed: N of N"; exits with 1 when fewer kills landed than asked or
any divergence exceeds --tolerance.
"""

import argparse
import dataclasses
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from esvit_jax import checkpointing, console, export, writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # main.py and tests/configs/ live here.
CKPT_EVERY = 2


def start(workdir: str, steps: int, env: dict[str, str]) -> subprocess.Popen:
  cmd = [
    sys.executable,
    "main.py",
    "--config",
    "tests/configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.total_steps={steps}",
    f"--config.ckpt_every_steps={CKPT_EVERY}",
  ]
  log = open(f"{workdir}.log", "a")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def loss_records(workdir: str) -> list[dict]:
  return [r for r in writers.read_metrics(workdir) if "loss" in r]


def saved_step(workdir: str) -> int:
  return max(checkpointing.Checkpointer(workdir).all_steps(), default=0)


def saving_now(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")))


@dataclasses.dataclass
class Kill:
  how: str  # The signal, and whether it was aimed at a checkpoint save.
  reached: int  # The last step the killed attempt logged.
  saved: int  # The last checkpoint after it: where the restart resumes.


def kill_by_step(
  proc: subprocess.Popen, workdir: str, total: int, kills_left: int, rng: random.Random, timeout: float
):
  """Kills the attempt at a drawn step before the run's end (or at a checkpoint save after training resumed).

  The step is drawn from the next (steps left) / (kills left) steps, before the last one, so that every
  kill can land before the run ends, even with more kills than steps (a resumed attempt can be killed again
  before its next checkpoint). A SIGTERM stops the run only after the step in flight, so it is aimed at a
  step at least two before the last, and replaced by a SIGKILL where the run has no such step left.
  Returns the Kill, or None when the attempt completed first; raises if it runs past `timeout` seconds.
  """
  deadline = time.time() + timeout
  resumed = saved_step(workdir)
  records_before = len(loss_records(workdir))  # Records of earlier attempts: their steps may lie ahead.
  sig = rng.choice([signal.SIGKILL, signal.SIGTERM]) if resumed + 1 <= total - 2 else signal.SIGKILL
  last = total - 1 if sig == signal.SIGKILL else total - 2
  target = min(resumed + 1 + rng.randrange(max(1, (last - resumed) // kills_left)), last)
  during_save = rng.random() < 0.5

  def reached() -> int:
    return max((r["step"] for r in loss_records(workdir)[records_before:]), default=resumed)

  while proc.poll() is None:
    if reached() >= target or (during_save and resumed < reached() <= last and saving_now(workdir)):
      proc.send_signal(sig)
      proc.wait()
      saved = saved_step(workdir)
      if proc.returncode != -signal.SIGKILL and saved >= total:  # A SIGTERM after the last step is moot.
        return None
      return Kill(f"{sig.name}{' during a checkpoint save' if during_save else ''}", reached(), saved)
    if time.time() > deadline:
      proc.kill()
      raise RuntimeError(f"An attempt ran past {timeout} s; see {workdir}.log")
    time.sleep(0.005)
  return None


def divergence(clean: str, faulty: str) -> tuple[float, float]:
  """(max |loss difference| over the logged steps, max |teacher parameter difference|) of two runs."""
  reference = {r["step"]: r["loss"] for r in loss_records(clean)}
  final = {r["step"]: r["loss"] for r in loss_records(faulty)}  # Last write wins: the resumed attempt's.
  loss = max(abs(final[s] - reference[s]) for s in reference) if final.keys() == reference.keys() else np.inf
  a, b = (jax.device_get(export.load_backbone(os.path.join(d, "export"))[1]) for d in (clean, faulty))
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return loss, max(float(np.max(np.abs(x - y))) for x, y in pairs)


def damaged_restores(workdir: str) -> int:
  """Restores that skipped a damaged checkpoint, from the console capture or WORKDIR/log.txt (both hold
  warnings; the larger count is taken so that neither is counted twice)."""
  counts = [0]
  for path in (f"{workdir}.log", os.path.join(workdir, "log.txt")):
    if os.path.exists(path):
      with open(path, errors="replace") as f:
        counts.append(f.read().count("is damaged"))
  return max(counts)


def run(
  kills: int, steps: int, seed: int, workdir_root: str, timeout: float = 600.0, max_runs: int = 5
) -> dict[str, float]:
  """Lands `kills` kills on runs of `steps` steps and compares every completed run with a clean one.

  Args:
    kills: kills to land.
    steps: length of each run (at least 2: a kill must come before the last step).
    seed: seeds the choice of steps, signals and save-aimed kills.
    workdir_root: holds the clean run, the killed runs and the compilation cache.
    timeout: seconds any one attempt may take.
    max_runs: killed runs to start at most (a run that completes before its kills landed ends one).

  Returns:
    The figures printed by main(); 'kills' is the number that landed.
  """
  if steps < 2:
    raise ValueError("--steps must be at least 2: kills land before the last step.")
  rng = random.Random(seed)
  # Every attempt compiles the same program: a shared compilation cache makes restarts quick.
  env = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(workdir_root, "compile_cache"),
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "2",
  }
  clean = os.path.join(workdir_root, "clean")
  if start(clean, steps, env).wait(timeout) != 0:
    raise RuntimeError(f"The uninterrupted run failed; see {clean}.log")

  landed, attempts, outrun, runs = [], 0, 0, []
  while len(landed) < kills and len(runs) < max_runs:
    faulty = os.path.join(workdir_root, f"faulty_{len(runs)}")
    runs.append(faulty)
    while True:
      attempts += 1
      proc = start(faulty, steps, env)
      kills_left = kills - len(landed)
      kill = kill_by_step(proc, faulty, steps, kills_left, rng, timeout) if kills_left else None
      if kill is None:
        if proc.wait(timeout) != 0:
          raise RuntimeError(f"Attempt {attempts} failed on its own; see {faulty}.log")
        outrun += len(landed) < kills
        break
      landed.append(kill)
      print(
        f"kill {len(landed):2d}: {kill.how:<32} at step {kill.reached:3d}, last checkpoint {kill.saved:3d}, "
        f"lost {kill.reached - kill.saved}",
        flush=True,
      )

  divergences = [divergence(clean, faulty) for faulty in runs]
  lost = [k.reached - k.saved for k in landed]
  return {
    "kills_asked": kills,
    "kills": len(landed),
    "resumes_succeeded": len(landed),  # Each killed attempt was resumed by one that went on to complete.
    "attempts": attempts,
    "runs": len(runs),
    "kills_outrun": outrun,
    "mean_steps_lost_per_kill": float(np.mean(lost)) if lost else 0.0,
    "max_steps_lost_per_kill": max(lost, default=0),
    "corrupt_checkpoints": sum(map(damaged_restores, runs)),
    "max_loss_divergence": max(d[0] for d in divergences),
    "max_teacher_param_divergence": max(d[1] for d in divergences),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--steps", type=int, default=None, help="length of the tiny run; default 4 x kills")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tolerance", type=float, default=1e-6, help="largest loss / parameter divergence")
  parser.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="esvit_faults_")
  os.makedirs(root, exist_ok=True)
  try:
    results = run(args.kills, args.steps or max(2, 4 * args.kills), args.seed, root)
  finally:
    if not args.workdir:
      shutil.rmtree(root, ignore_errors=True)
  print(console.fields_table(results))
  print(f"kills landed: {results['kills']} of {args.kills}")
  diverged = max(results["max_loss_divergence"], results["max_teacher_param_divergence"]) > args.tolerance
  if diverged:
    print(f"FAILED: the killed runs diverged from the uninterrupted one by more than {args.tolerance}")
  if results["corrupt_checkpoints"]:
    print(f"FAILED: {results['corrupt_checkpoints']} restores found a damaged checkpoint")
  sys.exit(1 if results["kills"] < args.kills or diverged or results["corrupt_checkpoints"] else 0)


if __name__ == "__main__":
  main()
