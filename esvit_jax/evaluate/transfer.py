"""Transfer to downstream datasets: logistic regression on frozen features, C searched (configs/transfer.py).

Datasets are done one after the other:
  1. the features of its splits, extracted once by the sharded backbone and kept in DIR/features;
  2. the validation split, given or carved from train (a seeded fifth of each class);
  3. logistic.search over C, each fit on train scored on validation with the dataset's metric;
  4. the refit on train + validation at the chosen C, scored on test.
Each dataset's result goes to DIR/datasets/<name>.json as soon as it is done, so a run stopped between
datasets (or failing on one) loses nothing, and the same command continues with the rest. Every dataset is
opened before anything is extracted: one that is not prepared stops the run at once, naming the command
that prepares it. The regression runs on the accelerator, its rows sharded on the mesh's data axis.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import json
import re
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from matplotlib import figure as figure_lib
from matplotlib.backends import backend_agg
import ml_collections
import numpy as np

from esvit_jax import console, errors, export, sharding
from esvit_jax.data import multicrop, sources
from esvit_jax.evaluate import knn, logistic
from esvit_jax.evaluate import results as results_lib

FEATURES_DIR = "features"
DATASETS_DIR = "datasets"
COMPARISON_CHART = "comparison.png"
PROGRESS_SECONDS = 60  # A long extraction says how far it is at most this often.


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A downstream dataset as the run reads it: the source, its three splits and the metric.

  Attributes:
    name: as given in config.datasets.
    source: the opened dataset.
    train: the training split.
    val: the validation split, or None when it is carved from train.
    test: the split scored at the end.
    metric: one of logistic.METRICS.
    search_per_class: the search fits on at most this many training examples per class (0: all).
  """

  name: str
  source: sources.Source
  train: str
  val: str | None
  test: str
  metric: str
  search_per_class: int = 0

  @property
  def key(self) -> str:
    """The dataset's file name in the workdir.

    Returns:
      Its name with every run of characters other than letters, digits, '.' and '-' as one '_'.
    """
    return re.sub(r"[^A-Za-z0-9.-]+", "_", self.name).strip("_")


def _entry(config: ml_collections.ConfigDict, name: str, source: sources.Source) -> dict[str, Any]:
  """The splits and metric of a dataset: its catalog entry, else train / validation (if any) / test."""
  if name in config.catalog:
    return dict(config.catalog[name])
  val = next((s for s in ("validation", "val") if s in source.splits()), None)
  return dict(train="train", val=val, test="test", metric="accuracy", search_per_class=0)


def open_datasets(config: ml_collections.ConfigDict) -> list[Dataset]:
  """Opens every dataset of config.datasets, checking splits, labels and metric before any work.

  Args:
    config: a configs/transfer.py config.

  Returns:
    The datasets, in the order given. Raises errors.NotFoundError for a dataset that is not prepared
    (naming the command that prepares it) and errors.UserError for a bad name, split or metric.
  """
  names = [n.strip() for n in config.datasets.split(",") if n.strip()]
  if not names:
    raise errors.UserError("config.datasets is empty: name TFDS datasets or folder:/path, comma-separated.")
  if len(set(names)) < len(names):
    raise errors.UserError(f"config.datasets={config.datasets!r} names a dataset twice.")
  datasets = []
  for name in names:
    source = sources.get_source(name, data_dir=config.data_dir, manual_dir=config.manual_dir, labels=True)
    entry = _entry(config, name, source)
    if entry["metric"] not in logistic.METRICS:
      raise errors.UserError(f"The metric of {name} is {entry['metric']!r}; use one of {logistic.METRICS}.")
    for split in (entry["train"], entry["val"], entry["test"]):
      if split is not None:
        source.resolve_split(split)
    datasets.append(Dataset(name=name, source=source, **entry))
  keys = [d.key for d in datasets]
  if len(set(keys)) < len(keys):
    raise errors.UserError(f"config.datasets={config.datasets!r}: two datasets would share a file name.")
  return datasets


def carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits train into train and validation, class by class: ceil(fraction * n_c) of class c, at random.

  Args:
    labels: the training labels [N].
    fraction: the share of each class that becomes validation.
    seed: the seed of the choice.

  Returns:
    (train indices, validation indices), each sorted, disjoint, together all of [0, N).
  """
  rng = np.random.default_rng(seed)
  val = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    val.append(rng.permutation(members)[: int(np.ceil(fraction * len(members)))])
  val = np.sort(np.concatenate(val))
  return np.setdiff1d(np.arange(len(labels)), val), val


def per_class_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
  """At most `limit` examples of each class, chosen at random.

  Args:
    labels: the labels [N].
    limit: examples kept per class.
    seed: the seed of the choice.

  Returns:
    The sorted indices kept.
  """
  rng = np.random.default_rng(seed)
  return np.sort(
    np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:limit] for c in np.unique(labels)])
  )


def _gather(x: jax.Array) -> np.ndarray:
  """The whole of a global array, on every host."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def extract_split(
  forward: Callable[[jax.Array], jax.Array],
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  split: str,
  mesh: jax.sharding.Mesh,
) -> tuple[np.ndarray, np.ndarray]:
  """The features and labels of a whole split, in the split's order, on every host.

  Args:
    forward: uint8 images [B, C, C, 3] (global, sharded) -> features [B, D].
    config: the transfer config (eval_resize, eval_crop_size, eval_batch_size, seed).
    dataset: the dataset.
    split: one of its splits.
    mesh: the mesh the batches are sharded over.

  Returns:
    (features float32 [N, D], labels int32 [N]); files that could not be decoded are left out.
  """
  ds, num_batches = multicrop.eval_dataset(
    config, split, batch_size=config.eval_batch_size, source=dataset.source
  )
  start, _ = dataset.source.host_bounds(split, sources.HostShard.current())

  def indexed(batches):  # The split index of each row, so that the hosts' rows go back in split order.
    offset, began, shown = start, time.perf_counter(), time.perf_counter()
    for done, batch in enumerate(batches):
      rows = len(batch["label"])
      yield {**batch, "index": np.arange(offset, offset + rows, dtype=np.int32)}
      offset += rows
      if time.perf_counter() - shown > PROGRESS_SECONDS:
        shown = time.perf_counter()
        rate = (done + 1) / (shown - began)
        console.detail(
          f"{dataset.name} {split}: batch {done + 1:,} of {num_batches:,}, "
          f"{console.duration((num_batches - done - 1) / rate)} left"
        )

  features, labels, mask, index = (
    _gather(x)
    for x in knn.extract_features(
      forward, indexed(ds.as_numpy_iterator()), mesh, keys=("label", "mask", "index")
    )
  )
  mask = mask.reshape(-1)
  order = np.argsort(index.reshape(-1)[mask], kind="stable")
  return features.reshape(-1, features.shape[-1])[mask][order], labels.reshape(-1)[mask][order]


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  return json.loads(path.read_text()) if path.exists() else None


def _write_atomically(path: epath.Path, write: Callable[[Any], None]) -> None:
  """Writes through a temporary file renamed at the end (process 0), so a stop never leaves half a file."""
  if jax.process_index() != 0:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.parent / f"{path.name}.partial"
  with partial.open("wb") as f:
    write(f)
  partial.replace(path)


def split_features(
  forward: Callable[[jax.Array], jax.Array],
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  split: str,
  mesh: jax.sharding.Mesh,
  workdir: epath.Path,
  signature: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray, float]:
  """extract_split, or its copy in workdir/features/<dataset>/<split>.npz if made with the same signature.

  Args:
    forward: the feature function, as for extract_split.
    config: the transfer config.
    dataset: the dataset.
    split: one of its splits.
    mesh: the mesh the batches are sharded over.
    workdir: the run's directory.
    signature: what the features depend on (backbone, feature, transform); a copy of another is replaced.

  Returns:
    (features, labels, seconds spent extracting: 0 when read back).
  """
  path = workdir / FEATURES_DIR / dataset.key / f"{split}.npz"
  if path.exists():
    with path.open("rb") as f:
      saved = np.load(f)
      if json.loads(str(saved["signature"])) == dict(signature):
        return saved["features"], saved["labels"], 0.0
    logging.info("%s was made for another backbone or transform: extracting again.", path)
  num = dataset.source.num_examples(split)
  console.detail(f"{dataset.name}: extracting the features of {num:,} {split} images")
  start = time.perf_counter()
  features, labels = extract_split(forward, config, dataset, split, mesh)
  seconds = time.perf_counter() - start
  logging.info(
    "%s %s: %d features of %d dimensions in %.1f s.", dataset.name, split, *features.shape, seconds
  )
  _write_atomically(
    path,
    lambda f: np.savez(f, features=features, labels=labels, signature=np.array(json.dumps(dict(signature)))),
  )
  return features, labels, seconds


@dataclasses.dataclass(frozen=True)
class Rows:
  """Examples on the devices: features, labels and weights (0 on padding rows), sharded on the data axis."""

  x: jax.Array
  labels: jax.Array
  weights: jax.Array
  count: int


class Regression:
  """logistic.fit and logistic.predict on rows sharded over the mesh's data axis (padded to fill it)."""

  def __init__(self, mesh: jax.sharding.Mesh, num_classes: int, max_iter: int, tol: float):
    self.mesh, self.num_classes, self.max_iter, self.tol = mesh, num_classes, max_iter, tol

  def _sharded(self, x: np.ndarray) -> jax.Array:
    pad = -len(x) % self.mesh.shape[sharding.DATA_AXIS]
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    spec = P(sharding.DATA_AXIS, *[None] * (x.ndim - 1))
    return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda index: x[index])

  def rows(self, x: np.ndarray, labels: np.ndarray) -> Rows:
    """Puts examples on the devices once, for any number of fits or predictions.

    Args:
      x: features [N, D].
      labels: int [N].

    Returns:
      The sharded rows, padded to a multiple of the data axis with rows of weight 0.
    """
    weights = np.ones(len(x), np.float32)
    return Rows(self._sharded(x), self._sharded(labels), self._sharded(weights), len(x))

  def fit(self, rows: Rows, c: float) -> logistic.Fit:
    """The regression of the rows' labels on their features at inverse strength c.

    Args:
      rows: the training rows.
      c: scikit-learn's C.

    Returns:
      The fitted regression (replicated).
    """
    return logistic.fit(
      rows.x,
      rows.labels,
      rows.weights,
      np.float32(c),
      num_classes=self.num_classes,
      max_iter=self.max_iter,
      tol=self.tol,
    )

  def score(self, fitted: logistic.Fit, rows: Rows, labels: np.ndarray, metric: str) -> float:
    """The metric of the fitted regression's predictions for the rows.

    Args:
      fitted: a regression of fit.
      rows: the rows scored.
      labels: their labels, on the host.
      metric: one of logistic.METRICS.

    Returns:
      The score, in %.
    """
    predicted = _gather(logistic.predict(fitted, rows.x))[: rows.count]
    return logistic.score(metric, labels, predicted, self.num_classes)


def evaluate_dataset(
  dataset: Dataset,
  split_data: Callable[[str], tuple[np.ndarray, np.ndarray, float]],
  regression: Regression,
  config: ml_collections.ConfigDict,
) -> dict[str, Any]:
  """The protocol on one dataset: validation split, search over C, refit on train + validation, test.

  Args:
    dataset: the dataset.
    split_data: split -> (features, labels, seconds spent extracting).
    regression: the solver, for dataset.source.num_classes classes.
    config: the transfer config (val_fraction, seed).

  Returns:
    The dataset's record: metric, c, val and test scores, the search's points, sizes, seconds.
  """
  x_train, y_train, extract_seconds = split_data(dataset.train)
  x_test, y_test, seconds = split_data(dataset.test)
  extract_seconds += seconds
  if dataset.val is None:
    train_rows, val_rows = carve(y_train, config.val_fraction, config.seed)
    (x_train, x_val), (y_train, y_val) = (
      (x_train[train_rows], x_train[val_rows]),
      (y_train[train_rows], y_train[val_rows]),
    )
    val_from = f"carved from {dataset.train}: ceil({config.val_fraction} x each class), seed {config.seed}"
  else:
    x_val, y_val, seconds = split_data(dataset.val)
    extract_seconds += seconds
    val_from = dataset.val
  search_rows = np.arange(len(y_train))
  if dataset.search_per_class:
    search_rows = per_class_subset(y_train, dataset.search_per_class, config.seed)

  start = time.perf_counter()
  search_train = regression.rows(x_train[search_rows], y_train[search_rows])
  val = regression.rows(x_val, y_val)

  def score(index: int) -> float:
    value = regression.score(regression.fit(search_train, logistic.GRID[index]), val, y_val, dataset.metric)
    logging.info(
      "%s: C=%.3g, validation %s %.3f%%.", dataset.name, logistic.GRID[index], dataset.metric, value
    )
    return value

  best, curve = logistic.search(score)
  final = regression.fit(
    regression.rows(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])), logistic.GRID[best]
  )
  test = regression.score(final, regression.rows(x_test, y_test), y_test, dataset.metric)
  iterations, converged = jax.device_get((final.iterations, final.converged))
  return {
    "dataset": dataset.name,
    "metric": dataset.metric,
    "c": float(logistic.GRID[best]),
    "val": curve[best],
    "test": test,
    "val_curve": [[float(logistic.GRID[i]), s] for i, s in curve.items()],
    "validation_split": val_from,
    "num_train": len(y_train),
    "num_search_train": len(search_rows),
    "num_val": len(y_val),
    "num_test": len(y_test),
    "num_classes": regression.num_classes,
    "feature_dim": int(x_train.shape[1]),
    "iterations": int(iterations),
    "converged": bool(converged),
    "extract_seconds": extract_seconds,
    "fit_seconds": time.perf_counter() - start,
  }


def results_table(details: Sequence[Mapping[str, Any]]) -> str:
  """The per-dataset results as a console table.

  Args:
    details: the datasets' records (evaluate_dataset).

  Returns:
    The table: dataset, metric, chosen C, validation and test scores, seconds.
  """
  rows = [
    [
      d["dataset"],
      d["metric"],
      f"{d['c']:.3g}",
      f"{d['val']:.2f}%",
      f"{d['test']:.2f}%",
      console.duration(d["extract_seconds"] + d["fit_seconds"]),
    ]
    for d in details
  ]
  return console.table(["dataset", "metric", "C", "validation", "test", "time"], rows)


def compare(details: Sequence[Mapping[str, Any]], other: str | epath.Path) -> dict[str, Any]:
  """This run's test scores beside another transfer run's, on the datasets both have with one metric.

  Args:
    details: this run's dataset records.
    other: the other run's workdir (or its results.json).

  Returns:
    {'other', 'other_pretrained', 'datasets': [{dataset, metric, ours, theirs}], 'better', 'of'}.
  """
  path = epath.Path(other)
  path = path if path.name == "results.json" else path / "results.json"
  record = _read_json(path)
  if record is None or "details" not in record:
    raise errors.NotFoundError(f"config.compare={other}: {path} is not the results.json of a transfer run.")
  theirs = {d["dataset"]: d for d in record["details"]}
  rows = [
    {
      "dataset": d["dataset"],
      "metric": d["metric"],
      "ours": d["test"],
      "theirs": theirs[d["dataset"]]["test"],
    }
    for d in details
    if d["dataset"] in theirs and theirs[d["dataset"]]["metric"] == d["metric"]
  ]
  if not rows:
    raise errors.UserError(
      f"config.compare={other}: it shares no dataset (with the same metric) with this run."
    )
  return {
    "other": str(other),
    "other_pretrained": record.get("pretrained"),
    "datasets": rows,
    "better": sum(r["ours"] > r["theirs"] for r in rows),
    "of": len(rows),
  }


def comparison_chart(comparison: Mapping[str, Any], ours: str, theirs: str) -> figure_lib.Figure:
  """Grouped bars: each dataset's test score of both backbones.

  Args:
    comparison: what compare returns.
    ours: this backbone's legend label.
    theirs: the other's.

  Returns:
    The matplotlib figure.
  """
  rows = comparison["datasets"]
  fig = figure_lib.Figure(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.6), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  positions = np.arange(len(rows))
  for shift, key, label in ((-0.2, "ours", ours), (0.2, "theirs", theirs)):
    ax.bar(positions + shift, [r[key] for r in rows], width=0.4, label=label)
  ax.set_xticks(positions, [r["dataset"] for r in rows], rotation=30, ha="right")
  ax.set_ylabel("test score (%)")
  ax.set_title(f"better on {comparison['better']} of {comparison['of']} datasets")
  ax.legend(fontsize="small")
  ax.grid(axis="y", alpha=0.3)
  return fig


def comparison_table(comparison: Mapping[str, Any]) -> str:
  """The comparison as console text: one row per dataset and the count of datasets where this run is better.

  Args:
    comparison: what compare returns.

  Returns:
    The text.
  """
  rows = [
    [r["dataset"], r["metric"], f"{r['ours']:.2f}%", f"{r['theirs']:.2f}%", f"{r['ours'] - r['theirs']:+.2f}"]
    for r in comparison["datasets"]
  ]
  return (
    f"Against {comparison['other']}: better on {comparison['better']} of {comparison['of']} datasets.\n"
    + console.table(["dataset", "metric", "this", "other", "difference"], rows)
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """configs/transfer.py: the protocol on every dataset of config.datasets; writes workdir/results.json.

  Args:
    config: a configs/transfer.py config; config.pretrained names an export, workdir or converted checkpoint.
    workdir: where features, each dataset's result, results.json and comparison.png go.

  Returns:
    The test score of each dataset ('<dataset>_<metric>', in %) and their mean ('mean').
  """
  if not config.pretrained:
    raise errors.UserError("Set --config.pretrained to an export directory or a pretraining workdir.")
  datasets = open_datasets(config)
  if config.features not in knn.FEATURES:
    raise errors.UserError(f"config.features={config.features!r}; use one of {knn.FEATURES}.")
  workdir = epath.Path(workdir)
  mesh = sharding.make_mesh()
  dtype = np.dtype(config.compute_dtype)
  backbone, params = export.load_pretrained(
    config.pretrained, dtype=dtype, sharding=sharding.replicated(mesh)
  )
  forward = jax.jit(lambda images: knn.frozen_features(backbone, params, images, dtype, config.features))
  feature_signature = {
    k: config[k] for k in ("pretrained", "features", "eval_resize", "eval_crop_size", "compute_dtype")
  }
  console.detail(
    f"{type(backbone).__name__} from {config.pretrained}: logistic regression on its {config.features} "
    f"features; {console.plural(len(datasets), 'dataset')}: {', '.join(d.name for d in datasets)}"
  )

  details = []
  for dataset in datasets:
    signature = {
      **feature_signature,
      **{k: config[k] for k in ("val_fraction", "seed", "max_iter", "tol")},
      "splits": [dataset.train, dataset.val, dataset.test, dataset.metric, dataset.search_per_class],
    }
    path = workdir / DATASETS_DIR / f"{dataset.key}.json"
    done = _read_json(path)
    if done is not None and done.get("signature") == signature:
      console.detail(
        f"{dataset.name}: done before ({path}), {done['result']['metric']} {done['result']['test']:.2f}%"
      )
      details.append(done["result"])
      continue
    regression = Regression(mesh, dataset.source.num_classes, config.max_iter, config.tol)
    result = evaluate_dataset(
      dataset,
      lambda split, d=dataset: split_features(forward, config, d, split, mesh, workdir, feature_signature),
      regression,
      config,
    )
    record = json.dumps({"signature": signature, "result": result}, indent=2)
    _write_atomically(path, lambda f, r=record: f.write(r.encode()))
    console.detail(
      f"{dataset.name}: C={result['c']:.3g}, {result['metric']} {result['val']:.2f}% on validation, "
      f"{result['test']:.2f}% on {dataset.test}"
    )
    details.append(result)

  metrics = {f"{d['dataset']}_{d['metric']}": d["test"] for d in details}
  metrics["mean"] = float(np.mean([d["test"] for d in details]))
  sections: dict[str, Any] = {"details": details}
  text = [
    f"Transfer (logistic regression on frozen features), mean {metrics['mean']:.2f}%:",
    results_table(details),
  ]
  if config.compare:
    comparison = compare(details, config.compare)
    sections["comparison"] = comparison
    text.append(comparison_table(comparison))
    chart = comparison_chart(comparison, str(config.pretrained), str(comparison["other_pretrained"]))
    _write_atomically(workdir / COMPARISON_CHART, lambda f: chart.savefig(f, format="png", dpi=100))
  results_lib.write(workdir, metrics, config, **sections)
  console.say(*text)
  return metrics
