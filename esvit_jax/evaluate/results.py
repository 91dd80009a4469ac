"""What evaluations report: counts summed over a split, and results.json (metric name -> value, the config,
and the checkpoint it evaluated)."""

from collections.abc import Callable, Iterable
import json
import os
from typing import Any

from etils import epath
import jax
import ml_collections
import numpy as np

from esvit_jax import sharding


def summed_counts(
  count: Callable[[Any, dict], jax.Array], params: Any, batches: Iterable[dict], mesh: jax.sharding.Mesh
) -> np.ndarray:
  """count(params, batch) summed over host-local batches of every host, read back once after the last.

  Args:
    count: a jitted function of (params, device batch) -> int array of counts (hits, totals, ...).
    params: its first argument.
    batches: this host's batches (numpy), prefetched to the devices; 'skipped_files' is dropped.
    mesh: the mesh the batches are split over.

  Returns:
    The summed counts, a numpy array shaped like one count's.
  """
  counts = []  # Summed on the host once, after the last batch: no sync per batch.
  for batch in sharding.prefetch_to_device(iter(batches), mesh):
    batch.pop("skipped_files", None)
    counts.append(count(params, batch))
  return np.sum(jax.device_get(counts), axis=0)


def write(
  workdir: str | os.PathLike, metrics: dict[str, Any], config: ml_collections.ConfigDict, **sections: Any
) -> None:
  """Writes workdir/results.json (process 0); the task prints its own table (esvit_jax.console).

  Args:
    workdir: the evaluation's directory (created if missing).
    metrics: metric name -> value.
    config: the evaluation's config; its `pretrained` field names the checkpoint evaluated.
    **sections: more entries of the record (JSON-serialisable), e.g. per-dataset details.
  """
  if jax.process_index() == 0:
    record = {
      "metrics": metrics,
      "pretrained": str(config.pretrained),
      "config": json.loads(config.to_json_best_effort()),
      **sections,
    }
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
