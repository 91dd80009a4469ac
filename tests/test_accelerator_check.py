"""The accelerator check runs end to end (here on the CPU, on the tiny EsViT and MAE configs) and writes its
JSON, also on a machine like the accelerator hosts: no TensorFlow, no tensorflow-datasets, no clu."""

import json
import os
import subprocess
import sys

import pytest

from esvit_jax import flops
from tests.configs import mae_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CHECK = [
  "benchmarks/accelerator_check.py",
  "--config=tests/configs/tiny.py",
  "--per_device_batches=1,2",
  "--steps=2",
  "--warmup=0",
  "--num_images=64",
  "--image_size=48,80",
  "--host_batches=2",
  "--logistic=512,16,4",
]
# Installed as sitecustomize.py, this makes every import of the packages an accelerator host lacks (and that
# do not travel as wheels, README.md "Results and speed") fail as if they were not installed.
ABSENT_PACKAGES = """
import sys


class RefuseAbsent:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None


sys.meta_path.insert(0, RefuseAbsent())
"""


def run_check(out_dir, env=None, config="tests/configs/tiny.py") -> tuple[subprocess.CompletedProcess, dict]:
  """Runs the tiny check on the session's 8 CPU devices (tests/conftest.py); returns it and its JSON."""
  cmd = [sys.executable, *TINY_CHECK, f"--out_dir={out_dir}"]
  cmd[cmd.index("--config=tests/configs/tiny.py")] = f"--config={config}"
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  [name] = os.listdir(out_dir)
  assert name.startswith("cpu-") and name.endswith(".json")
  with open(os.path.join(out_dir, name)) as f:
    return done, json.load(f)


def assert_step_rows(done: subprocess.CompletedProcess, report: dict) -> None:
  assert "| batch/dev | compile s | step ms | images/s | MFU % |" in done.stdout
  assert report["device_kind"] == "cpu" and report["num_devices"] == 8 and "jax" in report["versions"]
  assert report["config"]["augment_on"] == "device" and report["config"]["canvas_size"] == 64
  assert [row["per_device_batch"] for row in report["rows"]] == [1, 2]
  for row, global_batch in zip(report["rows"], (8, 16), strict=True):
    assert "error" not in row, row
    assert row["global_batch"] == global_batch
    assert row["step_ms"] > 0 and row["compile_s"] > 0 and row["mfu_percent"] > 0
    assert row["train_img_s"] == pytest.approx(global_batch / row["step_ms"] * 1000)
    assert 0 < row["augment_share_percent"] < 100
    assert row["augment_xla_gflop_per_img"] > 0


@pytest.mark.slow
def test_accelerator_check_prints_its_table_and_writes_the_json(tmp_path):
  done, report = run_check(tmp_path)
  assert_step_rows(done, report)
  assert report["host_pipeline"] == "measured" and report["host_ms_per_img"] > 0
  assert all(row["host_ms_per_img"] == report["host_ms_per_img"] for row in report["rows"])
  search = report["logistic_search"]
  assert search["shape"] == [512, 16, 4] and search["seconds"] > 0 and 12 <= search["fits"] <= 16
  assert "logistic C search: 512 x 16 features, 4 classes:" in done.stdout


@pytest.mark.slow
def test_accelerator_check_runs_the_mae_step_and_the_cores_that_would_feed_it(tmp_path):
  done, report = run_check(tmp_path, config="tests/configs/mae_tiny.py")
  assert_step_rows(done, report)
  assert "MAE vit_tiny patch 4, one 32 px crop, 16 of 64 patches visible" in done.stdout
  assert report["config"]["method"] == "mae" and report["host_ms_per_img"] > 0
  analytic = flops.mae_step_flops(mae_tiny.get_config())["step"] / 1e9
  for row in report["rows"]:
    assert row["analytic_gflop_per_img"] == pytest.approx(analytic)
    # Host CPU ms per image x images/s: the cores busy decoding at the measured step rate.
    assert row["cores_to_feed"] == pytest.approx(report["host_ms_per_img"] * row["train_img_s"] / 1000)


@pytest.mark.slow
def test_accelerator_check_runs_the_step_without_tensorflow_and_says_it_skipped_the_host_pipeline(tmp_path):
  blocker = tmp_path / "absent"
  blocker.mkdir()
  (blocker / "sitecustomize.py").write_text(ABSENT_PACKAGES)
  # PYTHONPATH carries only the blocker: the simulated machine, not a path the check needs.
  env = {**os.environ, "PYTHONPATH": str(blocker)}
  done, report = run_check(tmp_path / "out", env)
  assert_step_rows(done, report)
  assert report["host_ms_per_img"] is None
  assert report["host_pipeline"].startswith("skipped: TensorFlow is absent")
  assert "host pipeline: skipped: TensorFlow is absent (No module named 'tensorflow'" in done.stdout
