r"""Fault injection: kill a tiny pretraining run again and again, resume it, and compare with a clean run.

  python benchmarks/faults.py --kills 20            # the full loop (recorded in README.md)
  python benchmarks/faults.py --kills 3 --steps 12  # what tests/test_faults.py runs

Each attempt starts `main.py` on tests/configs/tiny.py in one workdir and kills it with SIGKILL or SIGTERM
at a random moment: at a random time after training started, or right when an asynchronous checkpoint is
being written (its temporary directory exists). The run is restarted until it completes. Then its losses
and final teacher must equal those of an uninterrupted run. Prints kills, resumes, steps lost per kill,
corrupt checkpoints (restores that had to fall back) and the divergence.
"""

import argparse
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

from esvit_jax import checkpointing, export, writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # main.py and tests/configs/ live here.


def start(workdir: str, steps: int, env: dict[str, str]) -> subprocess.Popen:
  cmd = [
    sys.executable,
    "main.py",
    "--config",
    "tests/configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.total_steps={steps}",
    "--config.ckpt_every_steps=2",
  ]
  log = open(f"{workdir}.log", "a")
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def logged_steps(workdir: str) -> int:
  return max((r["step"] for r in writers.read_metrics(workdir) if "loss" in r), default=0)


def saving_now(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")))


def kill_at_random_moment(
  proc: subprocess.Popen, workdir: str, rng: random.Random, timeout: float
) -> str | None:
  """Waits for a random moment of training, then kills; None if the run finished first."""
  first = logged_steps(workdir)
  deadline = time.time() + timeout
  while logged_steps(workdir) <= first:  # Training (not start-up) has begun.
    if proc.poll() is not None or time.time() > deadline:
      return None
    time.sleep(0.05)
  during_save = rng.random() < 0.5
  wait_until = time.time() + rng.uniform(0.0, 3.0)
  while proc.poll() is None and time.time() < deadline:
    if saving_now(workdir) if during_save else time.time() >= wait_until:
      sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
      proc.send_signal(sig)
      proc.wait()
      return f"{sig.name}{' during a checkpoint save' if during_save else ''}"
    time.sleep(0.005)
  return None


def run(kills: int, steps: int, seed: int, workdir_root: str, timeout: float = 600.0) -> dict[str, float]:
  rng = random.Random(seed)
  # Every attempt compiles the same program: a shared compilation cache makes restarts quick.
  env = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(workdir_root, "compile_cache"),
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "2",
  }
  clean, faulty = os.path.join(workdir_root, "clean"), os.path.join(workdir_root, "faulty")
  if start(clean, steps, env).wait(timeout) != 0:
    raise RuntimeError(f"The uninterrupted run failed; see {clean}.log")

  done, lost, resumes, attempts = 0, [], 0, 0
  while True:
    attempts += 1
    proc = start(faulty, steps, env)
    how = kill_at_random_moment(proc, faulty, rng, timeout) if done < kills else None
    if how is None:
      if proc.wait(timeout) != 0:
        raise RuntimeError(f"Attempt {attempts} failed on its own; see {faulty}.log")
      break
    done += 1
    reached = logged_steps(faulty)
    saved = max(checkpointing.Checkpointer(faulty).all_steps(), default=0)
    lost.append(reached - saved)
    resumes += 1
    print(
      f"kill {done:2d}: {how:<32} at step {reached:3d}, last checkpoint {saved:3d}, lost {reached - saved}"
    )

  log = open(f"{faulty}.log").read()
  corrupt = log.count("is damaged")
  reference = {r["step"]: r["loss"] for r in writers.read_metrics(clean) if "loss" in r}
  final = {r["step"]: r["loss"] for r in writers.read_metrics(faulty) if "loss" in r}  # Last write wins.
  loss_divergence = (
    max(abs(final[s] - reference[s]) for s in reference) if final.keys() == reference.keys() else np.inf
  )
  a, b = (jax.device_get(export.load_backbone(os.path.join(d, "export"))[1]) for d in (clean, faulty))
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  param_divergence = max(float(np.max(np.abs(x - y))) for x, y in pairs)
  return {
    "kills": done,
    "resumes_succeeded": resumes,
    "attempts": attempts,
    "mean_steps_lost_per_kill": float(np.mean(lost)) if lost else 0.0,
    "max_steps_lost_per_kill": max(lost, default=0),
    "corrupt_checkpoints": corrupt,
    "max_loss_divergence": loss_divergence,
    "max_teacher_param_divergence": param_divergence,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help="length of the tiny run; default 4 x kills, so that every kill lands before the end",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="esvit_faults_")
  os.makedirs(root, exist_ok=True)
  try:
    results = run(args.kills, args.steps or 4 * args.kills, args.seed, root)
  finally:
    if not args.workdir:
      shutil.rmtree(root, ignore_errors=True)
  print(writers.fields_table(results))


if __name__ == "__main__":
  main()
