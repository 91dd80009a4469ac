"""config.task -> the function that runs it: main.py's only dispatch.

The evaluations run at the matmul precision of config.matmul_precision (default 'highest': full float32,
as the official PyTorch evaluation). Accelerators otherwise default to faster passes (TF32 on recent
GPUs, one bfloat16 pass on TPUs) that perturb cosine similarities enough to reorder near-tied neighbours.
"""

import contextlib
import importlib

import jax
import ml_collections

from esvit_jax import console, errors

TASKS = {
  "pretrain": "esvit_jax.train:train_and_evaluate",
  "knn": "esvit_jax.evaluate.knn:run",
  "linear_probe": "esvit_jax.evaluate.linear:train_and_evaluate",
  "finetune": "esvit_jax.evaluate.finetune:train_and_evaluate",
  "transfer": "esvit_jax.evaluate.transfer:run",
}
EVALUATION_TASKS = ("knn", "linear_probe", "transfer")
TITLES = {
  "pretrain": "Pretraining",
  "knn": "k-NN evaluation",
  "linear_probe": "Linear probe",
  "finetune": "Fine-tuning",
  "transfer": "Transfer",
}
MATMUL_PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16")


def matmul_precision(precision: str) -> contextlib.AbstractContextManager:
  """The context in which every matmul and convolution traced runs at `precision`.

  Args:
    precision: one of MATMUL_PRECISIONS (jax.default_matmul_precision's names).

  Returns:
    The context manager; raises errors.UserError at once for an unknown name.
  """
  if precision not in MATMUL_PRECISIONS:
    raise errors.UserError(
      f"Matmul precision {precision!r} is unknown; use one of {MATMUL_PRECISIONS} ('highest': full float32)."
    )
  return jax.default_matmul_precision(precision)


def run(config: ml_collections.ConfigDict, workdir: str, config_file: str | None = None):
  """Runs config.task, after its headline on the console; evaluations inside config.matmul_precision.

  Args:
    config: the full config; config.task is a key of TASKS.
    workdir: the run's directory.
    config_file: the config file (and argument) it came from, for the headline.

  Returns:
    What the task returns: the final train state (pretrain) or the metrics dict (evaluations).
  """
  if config.get("task") not in TASKS:
    raise errors.UserError(f"config.task={config.get('task')!r} is unknown; use one of {sorted(TASKS)}.")
  module, function = TASKS[config.task].split(":")
  task = getattr(importlib.import_module(module), function)
  console.headline(TITLES[config.task], config_file, workdir)
  if config.task not in EVALUATION_TASKS:
    return task(config, workdir)
  with matmul_precision(config.matmul_precision):
    return task(config, workdir)
