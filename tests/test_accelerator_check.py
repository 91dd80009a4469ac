"""The accelerator check runs end to end (here on the CPU, on the tiny config) and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_check_prints_its_table_and_writes_the_json(tmp_path):
  cmd = [
    sys.executable,
    "benchmarks/accelerator_check.py",
    "--config=tests/configs/tiny.py",
    "--per_device_batches=1,2",
    "--steps=2",
    "--warmup=0",
    "--num_images=64",
    "--image_size=48,80",
    "--host_batches=2",
    f"--out_dir={tmp_path}",
  ]
  # On the session's 8 CPU devices (tests/conftest.py).
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| batch/dev | compile s | step ms | images/s | MFU % |" in done.stdout
  [name] = os.listdir(tmp_path)
  assert name.startswith("cpu-") and name.endswith(".json")
  with open(tmp_path / name) as f:
    report = json.load(f)
  assert report["device_kind"] == "cpu" and report["num_devices"] == 8 and "jax" in report["versions"]
  assert report["config"]["augment_on"] == "device" and report["config"]["canvas_size"] == 64
  assert report["host_ms_per_img"] > 0
  assert [row["per_device_batch"] for row in report["rows"]] == [1, 2]
  for row, global_batch in zip(report["rows"], (8, 16), strict=True):
    assert "error" not in row, row
    assert row["global_batch"] == global_batch
    assert row["step_ms"] > 0 and row["compile_s"] > 0 and row["mfu_percent"] > 0
    assert row["train_img_s"] == pytest.approx(global_batch / row["step_ms"] * 1000)
    assert 0 < row["augment_share_percent"] < 100
    assert row["augment_xla_gflop_per_img"] > 0
