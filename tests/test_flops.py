"""Analytic FLOPs (esvit_jax/flops.py): a Swin block by hand, published backbone costs, and XLA's count."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import swin_t
from esvit_jax import flops
from esvit_jax import sharding
from esvit_jax import train_step
from tests.configs import tiny
from tests.test_train import ROOT


def test_swin_block_flops_match_a_hand_count():
  # A 6x6 map, C = 8, window 4 -> padded to 8x8 = 64 tokens; the MLP (ratio 4) runs on the 36 real ones.
  qkv = 2 * 64 * 8 * 24  # 24576
  scores = 2 * 64 * 16 * 8  # each token against the 16 tokens of its window: 16384
  weighted_values = 2 * 64 * 16 * 8  # 16384
  proj = 2 * 64 * 8 * 8  # 8192
  mlp = 2 * 36 * 8 * 32 + 2 * 36 * 32 * 8  # 36864
  assert qkv + scores + weighted_values + proj + mlp == 102400
  assert flops.swin_block_flops(6, 6, dim=8, window=4) == 102400


@pytest.mark.parametrize("size,published_gmacs", [(224, 4.5)])
def test_swin_tiny_backbone_cost_matches_the_published_4_5_gmacs(size, published_gmacs):
  config = swin_t.get_config()
  arch = dict(embed_dim=96, depths=(2, 2, 6, 2), window_size=7, image_size=224, patch_size=4)
  counted = flops.backbone_flops(arch, size)
  assert counted["tokens"] == 49 and counted["features"] == 768
  assert (counted["patch_embed"] + counted["body"]) / 2e9 == pytest.approx(published_gmacs, rel=0.01)
  parts = flops.train_step_flops(config)
  assert parts["step"] == parts["student_forward"] + parts["student_backward"] + parts["teacher_forward"]


def test_train_step_flops_within_10_percent_of_xla_cost_analysis():
  config = tiny.get_config()
  config.model.update(embed_dim=96, out_dim=2048, hidden_dim=512, bottleneck_dim=64)  # Matmuls dominate.
  config.batch_size = 8
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = train_step.abstract_train_state(config, mesh, steps_per_epoch=100)
  batch = {"globals": jax.ShapeDtypeStruct((8, 2, 32, 32, 3), np.uint8),
           "locals": jax.ShapeDtypeStruct((8, 2, 16, 16, 3), np.uint8)}
  cost = train_step.make_train_step(config, mesh, steps_per_epoch=100).lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = flops.train_step_flops(config)["step"] * config.batch_size
  assert analytic == pytest.approx(cost["flops"], rel=0.10)


def test_benchmark_runs_on_the_tiny_config_and_prints_every_field():
  cmd = [sys.executable, "benchmarks/train_step.py", "--config", "tests/configs/tiny.py", "--per_device_batch=1",
         "--steps=2", "--warmup=1", "--inference_batch=2", "--pipeline_batches=2"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  table = dict(line.split(None, 1) for line in done.stdout.splitlines()[-18:] if line and not line.startswith("-"))
  for field in ("compile_s", "step_ms", "train_img_s", "train_img_s_per_device", "peak_memory_gib",
                "analytic_gflop_per_img", "xla_gflop_per_img", "mfu_percent", "peak_tflops_per_device",
                "inference_img_s_per_device", "pipeline_img_s_per_core", "cores_to_feed_step"):
    assert field in table, (field, done.stdout[-2000:])
  assert float(table["train_img_s"]) > 0 and 0 < float(table["mfu_percent"]) < 100
