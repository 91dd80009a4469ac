"""config.task -> the function that runs it: main.py's only dispatch."""
import importlib

import ml_collections

TASKS = {
    "pretrain": "esvit_jax.train:train_and_evaluate",
    "knn": "esvit_jax.evaluate.knn:run",
    "linear_probe": "esvit_jax.evaluate.linear:train_and_evaluate",
}


def run(config: ml_collections.ConfigDict, workdir: str):
  if config.get("task") not in TASKS:
    raise ValueError(f"config.task={config.get('task')!r} is unknown; use one of {sorted(TASKS)}.")
  module, function = TASKS[config.task].split(":")
  return getattr(importlib.import_module(module), function)(config, workdir)
