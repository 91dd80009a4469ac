"""results.json of an evaluation: metric name -> value, the config, and the checkpoint it evaluated."""

import json
import os
from typing import Any

from etils import epath
import jax
import ml_collections


def write(workdir: str | os.PathLike, metrics: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """Writes workdir/results.json (process 0); the task prints its own table (esvit_jax.console).

  Args:
    workdir: the evaluation's directory (created if missing).
    metrics: metric name -> value.
    config: the evaluation's config; its `pretrained` field names the checkpoint evaluated.
  """
  if jax.process_index() == 0:
    record = {
      "metrics": metrics,
      "pretrained": str(config.pretrained),
      "config": json.loads(config.to_json_best_effort()),
    }
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
