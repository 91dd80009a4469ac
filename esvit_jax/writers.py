"""Metric writers: clu's log lines (WORKDIR/log.txt, esvit_jax/console.py) and TensorBoard events, plus
metrics.jsonl in the workdir.

metrics.jsonl holds one JSON object per write ({"step": s, name: value, ...}): easy to read by people,
scripts and tests, and appended to across restarts (a resumed run continues the same file).
"""

from collections.abc import Mapping
import json
import os
from typing import Any

from clu import metric_writers
from etils import epath
import jax
import numpy as np


class JsonlWriter(metric_writers.MetricWriter):
  """Appends scalars (and hyper-parameters) to a JSON-lines file; other summaries are not kept.

  Its public methods implement clu's metric_writers.MetricWriter interface and are documented there.

  Args:
    path: the JSON-lines file, created on the first write and appended to afterwards.
  """

  def __init__(self, path: str | os.PathLike):
    self._path = epath.Path(path)

  def _append(self, record: Mapping[str, Any]) -> None:
    with self._path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._append({"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._append(
      {"hparams": {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}}
    )

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str | os.PathLike) -> metric_writers.MetricWriter:
  """Process 0 writes TensorBoard events and metrics.jsonl; every process writes a line per write to its log.

  Args:
    workdir: the run's directory, where the events and metrics.jsonl go.

  Returns:
    The writer to give every metric of the run.
  """
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter(
    [
      metric_writers.create_default_writer(workdir, asynchronous=True),
      JsonlWriter(epath.Path(workdir) / "metrics.jsonl"),
    ]
  )


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The scalar records of metrics.jsonl, in the order they were written.

  Args:
    workdir: the run's directory.

  Returns:
    One {"step": s, name: value, ...} dict per write (hyper-parameter records left out); [] without a file.
  """
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [r for r in map(json.loads, path.read_text().splitlines()) if "step" in r]
