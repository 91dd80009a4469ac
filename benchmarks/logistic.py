r"""Speed of the transfer protocol's classifier: the whole C search, ours (jitted L-BFGS) beside scikit-learn.

  python benchmarks/logistic.py                                    # 50,000 x 768, 100 classes, both searches
  python benchmarks/logistic.py --sklearn=fits --cs=0.01,1         # scikit-learn on these C only: per fit
  python benchmarks/logistic.py --num_examples=2000 --dim=32 --classes=5 --sklearn=none   # seconds

The features are synthetic and float32, shaped like a backbone's: class means plus noise whose scales decay
along the dimensions (a power law, as real features' spectra do), rotated and offset, so that weakly
regularised fits take hundreds of L-BFGS iterations as real ones do. The last --val_fraction of the
examples is the validation split. The search (esvit_jax.evaluate.logistic.search: 7 fits, then up to 8)
scores top-1 on it; the refit at the chosen C uses every example. Ours runs jitted on JAX's default device
(compiled before timing: one program per shape); scikit-learn's LogisticRegression(C, max_iter) runs on
the host's cores. With --sklearn=fits, both fit only the C values of --cs on every example, for a ratio
per fit when the whole searches would take too long.

Prints a table (fits, iterations, seconds, ratio) and writes the figures with the machine, the date and
the package versions to <out_dir>/logistic-<device kind>-<date>.json.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from esvit_jax import console
from esvit_jax.evaluate import logistic

PACKAGES = ("jax", "jaxlib", "optax", "scikit-learn", "scipy", "numpy")


def synthetic_features(
  num_examples: int, dim: int, classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Overlapping classes in a backbone-like feature space: float32 [N, D] and int32 labels [N].

  Args:
    num_examples: N.
    dim: D.
    classes: the number of classes, drawn uniformly.
    seed: of every draw.

  Returns:
    The features and the labels.
  """
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, num_examples).astype(np.int32)
  means = 0.15 * rng.standard_normal((classes, dim), dtype=np.float32)
  scales = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
  rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
  offset = rng.standard_normal(dim).astype(np.float32)
  noise = rng.standard_normal((num_examples, dim), dtype=np.float32)
  return ((means[labels] + noise) * scales) @ rotation + offset, labels


def _accuracy(labels: np.ndarray, predicted) -> float:
  return logistic.score("accuracy", labels, np.asarray(predicted), int(labels.max()) + 1)


class Ours:
  """The jitted fit on JAX's default device, compiled before anything is timed."""

  def __init__(self, classes: int, max_iter: int):
    self.classes, self.max_iter = classes, max_iter

  def prepare(self, x: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """The arrays on the device, once for every fit; compiles the fit for their shapes."""
    x, labels = jax.device_put(x), jax.device_put(labels)
    self.fit(x, labels, 1.0, max_iter=0)  # max_iter is traced: the same program, no iteration.
    return x, labels

  def fit(self, x: jax.Array, labels: jax.Array, c: float, max_iter: int | None = None) -> dict:
    """One fit at C: its seconds, iterations and classifier."""
    start = time.perf_counter()
    fitted = logistic.fit(
      x,
      labels,
      jnp.ones(labels.shape, x.dtype),
      c,
      num_classes=self.classes,
      max_iter=self.max_iter if max_iter is None else max_iter,
    )
    iterations = int(fitted.iterations)  # Waits for the fit.
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "iterations": iterations, "predict": lambda v: logistic.predict(fitted, v)}


class Sklearn:
  """scikit-learn's LogisticRegression(C, max_iter), lbfgs, tol 1e-4: the protocol's classifier."""

  def __init__(self, classes: int, max_iter: int):
    del classes
    self.max_iter = max_iter

  def prepare(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x, labels

  def fit(self, x: np.ndarray, labels: np.ndarray, c: float) -> dict:
    """One fit at C: its seconds, iterations and classifier."""
    from sklearn import linear_model  # pylint: disable=g-import-not-at-top  # Absent on accelerator hosts.

    start = time.perf_counter()
    model = linear_model.LogisticRegression(C=c, max_iter=self.max_iter).fit(x, labels)
    return {
      "seconds": time.perf_counter() - start,
      "iterations": int(model.n_iter_[0]),
      "predict": model.predict,
    }


def run_search(solver, x: np.ndarray, labels: np.ndarray, val_fraction: float) -> dict:
  """The whole protocol on one solver: the search on train scored on val, then the refit on both.

  Args:
    solver: Ours or Sklearn.
    x: features [N, D].
    labels: int labels [N].
    val_fraction: the share of the examples, at the end, that is the validation split.

  Returns:
    The chosen C, the fits (C, iterations, seconds, val top-1), the refit and the total seconds, and apart
    the seconds spent preparing (moving the features to the device and compiling, for ours).
  """
  split = len(x) - int(round(val_fraction * len(x)))
  start = time.perf_counter()
  train, val, whole = (
    solver.prepare(*part) for part in ((x[:split], labels[:split]), (x[split:], labels[split:]), (x, labels))
  )
  prepare_s = time.perf_counter() - start
  fits = []

  def score(index: int) -> float:
    fitted = solver.fit(*train, float(logistic.GRID[index]))
    fits.append(
      {
        "c": float(logistic.GRID[index]),
        "iterations": fitted["iterations"],
        "seconds": fitted["seconds"],
        "val_top1": _accuracy(labels[split:], fitted["predict"](val[0])),
      }
    )
    return fits[-1]["val_top1"]

  start = time.perf_counter()
  best, _ = logistic.search(score)
  refit = solver.fit(*whole, float(logistic.GRID[best]))
  return {
    "best_c": float(logistic.GRID[best]),
    "fits": fits,
    "refit": {"iterations": refit["iterations"], "seconds": refit["seconds"]},
    "seconds": time.perf_counter() - start,
    "prepare_s": prepare_s,
  }


def run_fits(solver, x: np.ndarray, labels: np.ndarray, cs: list[float]) -> list[dict]:
  """Single fits on all the examples at each C (preparing excluded): iterations and seconds."""
  x, labels = solver.prepare(x, labels)
  rows = []
  for c in cs:
    fitted = solver.fit(x, labels, c)
    rows.append({"c": c, "iterations": fitted["iterations"], "seconds": fitted["seconds"]})
  return rows


def search_row(name: str, result: dict) -> list:
  """A table row of a whole search: the chosen C, the fits with the refit, their iterations, seconds."""
  fits = result["fits"]
  iterations = sum(f["iterations"] for f in fits) + result["refit"]["iterations"]
  return [
    name,
    "search + refit",
    f"{result['best_c']:.3g}",
    len(fits) + 1,
    iterations,
    f"{result['seconds']:.3g}",
  ]


def fit_row(name: str, result: dict) -> list:
  """A table row of one fit."""
  return [name, "fit", f"{result['c']:g}", 1, result["iterations"], f"{result['seconds']:.3g}"]


def versions() -> dict[str, str]:
  """Installed versions of the packages measured (those installed)."""
  found = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_examples", type=int, default=50_000)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--max_iter", type=int, default=1000)
  parser.add_argument("--val_fraction", type=float, default=0.2)
  parser.add_argument(
    "--sklearn",
    choices=("search", "fits", "none"),
    default="search",
    help="scikit-learn's whole search, its fits at --cs only, or nothing.",
  )
  parser.add_argument("--cs", default="0.01,1", help="The C values of --sklearn=fits, comma-separated.")
  parser.add_argument("--out_dir", default="benchmarks/results")
  args = parser.parse_args()

  device = jax.devices()[0]
  print(
    f"{device.device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores, jax {jax.__version__}; "
    f"{args.num_examples:,} x {args.dim} float32, {args.classes} classes, max_iter {args.max_iter}",
    flush=True,
  )
  x, labels = synthetic_features(args.num_examples, args.dim, args.classes)
  ours, sklearn = Ours(args.classes, args.max_iter), Sklearn(args.classes, args.max_iter)
  report, rows = {}, []
  if args.sklearn == "fits":
    cs = [float(c) for c in args.cs.split(",")]
    report["ours_fits"], report["sklearn_fits"] = (
      run_fits(ours, x, labels, cs),
      run_fits(sklearn, x, labels, cs),
    )
    for mine, theirs in zip(report["ours_fits"], report["sklearn_fits"], strict=True):
      rows.append(fit_row("ours", mine))
      rows.append(fit_row("sklearn", theirs) + [f"{theirs['seconds'] / mine['seconds']:.2f}"])
  else:
    report["ours_search"] = run_search(ours, x, labels, args.val_fraction)
    rows.append(search_row("ours", report["ours_search"]))
  if args.sklearn == "search":
    report["sklearn_search"] = run_search(sklearn, x, labels, args.val_fraction)
    rows.append(search_row("sklearn", report["sklearn_search"]))
    rows[-1].append(f"{report['sklearn_search']['seconds'] / report['ours_search']['seconds']:.2f}")
  header = ["solver", "run", "C", "fits", "iterations", "seconds", "ratio sklearn / ours"]
  print(console.markdown_table(header, [row + [""] * (len(header) - len(row)) for row in rows]))

  now = datetime.datetime.now(datetime.UTC)
  kind = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
  path = os.path.join(args.out_dir, f"logistic-{kind}-{now:%Y-%m-%d}.json")
  os.makedirs(args.out_dir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(
      {
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "host_cpu_cores": os.cpu_count(),
        "date": now.isoformat(timespec="seconds"),
        "versions": versions(),
        "args": vars(args),
        **report,
      },
      f,
      indent=2,
    )
  print(f"\nWrote {path}")


if __name__ == "__main__":
  main()
