"""curves.png: one panel per metric present in metrics.jsonl, a valid PNG, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from esvit_jax import errors, plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(workdir, records):
  with open(workdir / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"hparams": {"lr": 0.1}}) + "\n")
    for record in records:
      f.write(json.dumps(record) + "\n")


def training_records(with_region=True, with_knn=True):
  records = []
  for step in range(0, 101, 10):
    record = {
      "step": step,
      "loss": 5 - step / 50,
      "view_loss": 5 - step / 40,
      "teacher_entropy": 3 + step / 100,
      "teacher_batch_entropy": 6.0,
      "teacher_embedding_std": 0.08,
      "lr": step * 1e-5,
      "grad_norm": 1.0,
      "images_per_sec": 100.0,
    }
    if with_region:
      record["region_loss"] = 5 - step / 60
    records.append(record)
    if with_knn and step % 50 == 0:
      records.append({"step": step, "knn_top1_k20": 20 + step / 5, "knn_top5_k20": 60.0, "knn_seconds": 2.0})
  return records


@pytest.mark.parametrize(
  "with_region,with_knn,panels", [(True, True, 8), (False, True, 7), (False, False, 6)]
)
def test_one_panel_per_metric_present(with_region, with_knn, panels):
  fig = plot.plot_curves(training_records(with_region, with_knn))
  titles = [ax.get_title() for ax in fig.axes]
  assert len(fig.axes) == panels
  assert ("region loss" in titles) == with_region and ("k-NN top-1 (%)" in titles) == with_knn
  knn_lines = [ax for ax in fig.axes if ax.get_title().startswith("k-NN")]
  if with_knn:  # The top-5 record is not drawn; the top-1 line holds the three evaluations.
    (line,) = knn_lines[0].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [0, 50, 100])
    np.testing.assert_array_equal(line.get_ydata(), [20, 30, 40])


def test_save_curves_writes_a_valid_png(tmp_path):
  write_metrics(tmp_path, training_records())
  path = plot.save_curves(tmp_path)
  assert path == tmp_path / "curves.png"
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size == (1350, 960)  # 3 x 3 panels of 4.5 x 3.2 in at 100 dpi.


def test_missing_metrics_is_a_user_error(tmp_path):
  with pytest.raises(errors.NotFoundError, match="No metrics"):
    plot.save_curves(tmp_path)
  write_metrics(tmp_path, [{"step": 1, "first_step_seconds": 3.0}])
  with pytest.raises(errors.UserError, match="to plot"):
    plot.save_curves(tmp_path)


@pytest.mark.slow
def test_command_line_writes_curves_and_prints_the_path(tmp_path):
  write_metrics(tmp_path, training_records(with_knn=False))
  done = subprocess.run(
    [sys.executable, "-m", "esvit_jax.plot", str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == str(tmp_path / "curves.png")
  with Image.open(tmp_path / "curves.png") as image:
    assert image.format == "PNG"
