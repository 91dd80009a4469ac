r"""Learning curves of a pretraining or fine-tuning run: WORKDIR/metrics.jsonl -> WORKDIR/curves.png.

  python -m esvit_jax.plot WORKDIR

One panel per metric present (loss, view and region loss, teacher entropy, teacher embedding std,
learning rate, k-NN top-1, fine-tuning's validation top-1), against the step. Pretraining and fine-tuning
write the figure at their end too.
"""

from collections.abc import Sequence
import os
from typing import Any

from absl import app
from etils import epath
from matplotlib import figure as figure_lib
from matplotlib.backends import backend_agg

from esvit_jax import cli, errors, writers

# (metric key or k-NN key prefix, panel title), in panel order.
PANELS = (
  ("loss", "loss"),
  ("view_loss", "view loss"),
  ("region_loss", "region loss"),
  ("teacher_entropy", "teacher entropy per image (collapse: near log K)"),
  ("teacher_batch_entropy", "entropy of the teacher's batch mean (collapse: near 0)"),
  ("teacher_embedding_std", "teacher embedding std (collapse: near 0)"),
  ("lr", "learning rate"),
  ("knn_top1_k", "k-NN top-1 (%)"),
  ("top1", "validation top-1 (%)"),
  ("ema_top1", "validation top-1 of the EMA (%)"),
)


def _series(records: Sequence[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
  """{metric name: (steps, values)} of the metrics named key, or starting with it for the k-NN."""
  names = sorted({k for r in records for k in r if k == key or (key == "knn_top1_k" and k.startswith(key))})
  return {
    name: ([r["step"] for r in records if name in r], [r[name] for r in records if name in r])
    for name in names
  }


def plot_curves(records: Sequence[dict[str, Any]]) -> figure_lib.Figure:
  """A figure with one panel (axes) per metric of PANELS present in records, in that order.

  Args:
    records: metrics.jsonl records ({'step': s, name: value, ...}), as writers.read_metrics returns.

  Returns:
    The matplotlib figure; `figure.axes` holds the panels.
  """
  panels = [(title, series) for key, title in PANELS if (series := _series(records, key))]
  if not panels:
    raise errors.UserError("No loss, entropy, learning rate or k-NN metric to plot.")
  columns = min(len(panels), 3)
  rows = -(-len(panels) // columns)
  fig = figure_lib.Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)  # Agg draws it, whatever pyplot's backend: no display is needed.
  for i, (title, series) in enumerate(panels):
    ax = fig.add_subplot(rows, columns, i + 1)
    for name, (steps, values) in series.items():
      ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
    if len(series) > 1:
      ax.legend(fontsize="small")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  return fig


def save_curves(workdir: str | os.PathLike) -> epath.Path:
  """Writes workdir/curves.png from workdir/metrics.jsonl.

  Args:
    workdir: a pretraining or fine-tuning workdir.

  Returns:
    The path of the PNG.
  """
  workdir = epath.Path(workdir)
  records = writers.read_metrics(workdir)
  if not records:
    raise errors.NotFoundError(f"No metrics in {workdir / 'metrics.jsonl'}: is {workdir} a training workdir?")
  path = workdir / "curves.png"
  with path.open("wb") as f:
    plot_curves(records).savefig(f, format="png", dpi=100)
  return path


def main(argv):
  """`python -m esvit_jax.plot WORKDIR`: writes WORKDIR/curves.png and prints its path.

  Args:
    argv: the program name and the pretraining workdir, as absl leaves them after the flags.
  """
  if len(argv) != 2:
    raise app.UsageError("Usage: python -m esvit_jax.plot WORKDIR", exitcode=cli.USER_ERROR_EXIT_CODE)
  print(save_curves(argv[1]))


if __name__ == "__main__":
  app.run(cli.exit_on_user_error(main), flags_parser=cli.parse_flags)
