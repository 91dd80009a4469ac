"""results.json of an evaluation: metric name -> value, the config, and the checkpoint it evaluated."""
import json
import os
from typing import Any

import jax
import ml_collections
from etils import epath


def write(workdir: str | os.PathLike, metrics: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """Writes workdir/results.json (process 0) and prints the metrics as a short table (every process)."""
  if jax.process_index() == 0:
    record = {"metrics": metrics, "pretrained": str(config.pretrained), "config": json.loads(config.to_json_best_effort())}
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
  width = max(map(len, metrics))
  print(f"\n{'metric':<{width}}  value\n{'-' * width}  -------")
  for name, value in metrics.items():
    print(f"{name:<{width}}  {value:.2f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
