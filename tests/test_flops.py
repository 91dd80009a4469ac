"""Analytic FLOPs (esvit_jax/flops.py): a Swin block by hand, published backbone costs, and XLA's count; the
same for MAE's step."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import flops, mae_step, sharding, train_step
from esvit_jax.configs import mae_tiny, mae_tiny_distill, vit_base, vit_s16, vit_tiny
from esvit_jax.models import backbones
from tests import test_vit
from tests.configs import mae_tiny as tiny_mae
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
  arch = dict(embed_dim=96, depths=(2, 2, 6, 2), window_size=7, image_size=224, patch_size=4)
  counted = flops.backbone_flops(arch, size)
  assert counted["tokens"] == 49 and counted["features"] == 768
  assert (counted["patch_embed"] + counted["body"]) / 2e9 == pytest.approx(published_gmacs, rel=0.01)


def test_train_step_flops_of_a_small_vit_match_a_hand_count():
  """ViT-Tiny (D 192, 12 blocks, patch 16) on 2 globals of 32 px (4 patches + CLS) and 2 locals of 16 px
  (1 patch + CLS), head 192 -> 6 -> 6 -> 4 -> K = 10, region loss on."""
  config = vit_tiny.get_config()
  config.model.update(hidden_dim=6, bottleneck_dim=4, out_dim=10)
  config.global_crop_size, config.local_crop_size, config.num_local_crops = 32, 16, 2
  d = 192
  # Per block on T tokens: qkv 2TD*3D, scores and weighted values 2 * 2TTD, proj 2TDD, MLP 2 * 2TD*4D.
  body_global, body_local = (12 * (24 * t * d * d + 4 * t * t * d) for t in (5, 2))
  embed_global, embed_local = 2 * 4 * 768 * d, 2 * 1 * 768 * d  # Patches x (16 * 16 * 3) x D.
  head = 2 * (d * 6 + 6 * 6 + 6 * 4 + 4 * 10)  # Per row: the pooled feature and each region token.
  body_global += head * (1 + 4)
  body_local += head * (1 + 1)
  cross_entropy = 2 * 2 * 4 * 10 + 2 * 2 * (2 * 4 + 2 * 1) * 4 * 10  # 2 teacher views: 4 crops, 10 tokens.
  similarity = 2 * 2 * (2 * 4 + 2 * 1) * 4 * d
  embed, body = 2 * (embed_global + embed_local), 2 * (body_global + body_local)
  expected = {
    "student_forward": embed + body + cross_entropy + similarity,
    "student_backward": embed + 2 * body + cross_entropy,  # The patch embedding needs no input gradient.
    "teacher_forward": 2 * (embed_global + body_global),
  }
  expected["step"] = sum(expected.values())
  assert expected["step"] == 562_561_632
  assert flops.train_step_flops(config) == expected


def test_train_step_flops_within_10_percent_of_xla_cost_analysis():
  config = tiny.get_config()
  config.model.update(embed_dim=96, out_dim=2048, hidden_dim=512, bottleneck_dim=64)  # Matmuls dominate.
  config.batch_size, config.augment_on = 8, "host"  # The model's FLOPs: the batch holds the crops.
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = train_step.abstract_train_state(config, mesh, steps_per_epoch=100)
  batch = {
    "globals": jax.ShapeDtypeStruct((8, 2, 32, 32, 3), np.uint8),
    "locals": jax.ShapeDtypeStruct((8, 2, 16, 16, 3), np.uint8),
  }
  cost = (
    train_step.make_train_step(config, mesh, steps_per_epoch=100)
    .lower(state, batch)
    .compile()
    .cost_analysis()
  )
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = flops.train_step_flops(config)["step"] * config.batch_size
  assert analytic == pytest.approx(cost["flops"], rel=0.10)


def run_benchmark(config: str) -> tuple[str, dict[str, str]]:
  """Runs benchmarks/train_step.py on `config` from the checkout's root; returns its output and table."""
  cmd = [
    sys.executable,
    "benchmarks/train_step.py",
    "--config",
    config,
    "--per_device_batch=1",
    "--steps=2",
    "--warmup=1",
    "--inference_batch=2",
    "--pipeline_batches=2",
  ]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  header = max(i for i, line in enumerate(lines) if line.split() == ["field", "value"])  # The results table.
  return done.stdout, dict(line.split(None, 1) for line in lines[header + 2 :] if line.strip())


STEP_FIELDS = (
  "compile_s",
  "step_ms",
  "train_img_s",
  "train_img_s_per_device",
  "peak_memory_gib",
  "analytic_gflop_per_img",
  "xla_gflop_per_img",
  "mfu_percent",
  "peak_tflops_per_device",
  "inference_img_s_per_device",
  "pipeline_img_s_per_core",
  "cores_to_feed_step",
)


@pytest.mark.slow
def test_benchmark_runs_on_the_tiny_config_and_prints_every_field():
  stdout, table = run_benchmark("tests/configs/tiny.py")
  for field in STEP_FIELDS:
    assert field in table, (field, stdout[-2000:])
  assert float(table["train_img_s"]) > 0 and 0 < float(table["mfu_percent"]) < 100


@pytest.mark.slow
def test_benchmark_runs_on_the_tiny_mae_config_with_its_own_feed_rate_and_no_esvit_fields():
  stdout, table = run_benchmark("tests/configs/mae_tiny.py")
  assert "MAE vit_tiny patch 4, one 32 px crop, 16 of 64 patches visible, decoder 16 x 1" in stdout
  for field in (
    *STEP_FIELDS,
    "h100_img_s_at_40pct_mfu",
    "host_to_device_gb_s_at_h100_40pct_mfu",
    "augment_alone_share_of_step_time_percent",
    "cores_to_feed_h100_at_40pct_mfu",
  ):
    assert field in table, (field, stdout[-2000:])
  for esvit_only in ("step_ms_without_augment", "host_to_device_gb_s_at_2500_img_s"):
    assert esvit_only not in table
  assert table["host_mode"] == "none for MAE (its crop is made in the step only)"
  analytic = flops.mae_step_flops(tiny_mae.get_config())["step"]
  assert float(table["analytic_gflop_per_img"]) == pytest.approx(analytic / 1e9, abs=1e-3)
  rate = 0.4 * 989e12 / analytic  # 40% of an H100's dense bf16 peak over the analytic FLOPs per image.
  assert float(table["h100_img_s_at_40pct_mfu"]) == pytest.approx(rate, rel=1e-6)
  cores = float(table["cores_to_feed_h100_at_40pct_mfu"])
  assert cores == pytest.approx(rate / float(table["pipeline_img_s_per_core"]), rel=1e-3)


def test_vit_block_flops_match_a_hand_count():
  # 5 tokens (CLS + 4 patches), C = 8, MLP ratio 4: every token attends to all 5.
  qkv, scores, weighted_values, proj = 2 * 5 * 8 * 24, 2 * 5 * 5 * 8, 2 * 5 * 5 * 8, 2 * 5 * 8 * 8
  mlp = 2 * 5 * 8 * 32 * 2
  assert qkv + scores + weighted_values + proj + mlp == 8480
  assert flops.vit_block_flops(5, dim=8) == 8480


@pytest.mark.parametrize("name,published_gmacs", [("vit_small", 4.6), ("vit_base", 17.6)])
def test_vit_backbone_costs_match_the_published_deit_numbers(name, published_gmacs):
  """DeiT's table: 4.6 G (ViT-S/16) and 17.6 G (ViT-B/16) multiply-adds at 224 px."""
  config = {"vit_small": vit_s16, "vit_base": vit_base}[name].get_config()
  arch = backbones.architecture(backbones.backbone_from_config(config.model))
  counted = flops.backbone_flops(arch, 224)
  assert counted["tokens"] == 196 and flops.backbone_flops(arch, 96)["tokens"] == 36
  assert (counted["patch_embed"] + counted["body"]) / 2e9 == pytest.approx(published_gmacs, rel=0.02)


def test_vit_train_step_flops_within_10_percent_of_xla_cost_analysis():
  config = test_vit.with_tiny_vit(tiny.get_config())
  config.model.update(embed_dim=128, out_dim=2048, hidden_dim=512, bottleneck_dim=64)  # Matmuls dominate.
  config.batch_size, config.augment_on = 8, "host"  # The model's FLOPs: the batch holds the crops.
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = train_step.abstract_train_state(config, mesh, steps_per_epoch=100)
  batch = {
    "globals": jax.ShapeDtypeStruct((8, 2, 32, 32, 3), np.uint8),
    "locals": jax.ShapeDtypeStruct((8, 2, 16, 16, 3), np.uint8),
  }
  cost = (
    train_step.make_train_step(config, mesh, steps_per_epoch=100)
    .lower(state, batch)
    .compile()
    .cost_analysis()
  )
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = flops.train_step_flops(config)["step"] * config.batch_size
  assert analytic == pytest.approx(cost["flops"], rel=0.10)


def test_mae_tiny_step_flops_match_a_hand_count():
  """MAE-Tiny at 224 px: 196 patches of 16 px, 49 visible (75% masked); encoder D 192 x 12 blocks on the
  CLS + 49 tokens, decoder 96 wide, 1 block on CLS + 196 tokens, predicting 16 * 16 * 3 = 768 pixels."""
  config = mae_tiny.get_config()
  d, t, decoder, t_dec = 192, 50, 96, 197
  embed = 2 * 196 * 768 * d  # The patch embedding runs on every patch, before the visible ones are taken.
  # Per block on T tokens: qkv 2TD*3D, scores and weighted values 2 * 2TTD, proj 2TDD, MLP 2 * 2TD*4D.
  encoder = 12 * (24 * t * d * d + 4 * t * t * d)
  decoder_embed = 2 * t * d * decoder
  decoder_block = 24 * t_dec * decoder * decoder + 4 * t_dec * t_dec * decoder
  prediction = 2 * t_dec * decoder * 768
  body = encoder + decoder_embed + decoder_block + prediction
  expected = {
    "student_forward": embed + body,
    "student_backward": embed + 2 * body,  # The images need no gradient: the embedding's backward is once.
    "teacher_forward": 0,
  }
  expected["step"] = sum(expected.values())
  assert expected["student_forward"] == 701_052_288  # About 0.35 G multiply-adds forward.
  assert expected["step"] == 2_045_354_112
  assert flops.mae_step_flops(config) == expected
  assert flops.train_step_flops(config) == expected  # Dispatched on config.method.


def test_d_mae_tiny_step_adds_the_teacher_up_to_its_distilled_logits_and_the_head_mix():
  """D-MAE-Tiny: a ViT-Base teacher (D 768) on the student's CLS + 49 visible tokens; block 12's logits are
  distilled, so the teacher computes blocks 1-11 and block 12's qkv and scores, nothing after (XLA drops
  what no output reads); a 12 x 12 head mix of the student's logits."""
  config = mae_tiny_distill.get_config()
  plain = flops.mae_step_flops(mae_tiny.get_config())
  d, t = 768, 50
  teacher = 2 * 196 * 768 * d + 11 * (24 * t * d * d + 4 * t * t * d) + 2 * t * d * 3 * d + 2 * t * t * d
  head_mix = 2 * 12 * 12 * t * t
  counted = flops.mae_step_flops(config)
  assert counted["teacher_forward"] == teacher == 8_282_155_008
  assert counted["student_forward"] == plain["student_forward"] + head_mix
  assert counted["student_backward"] == plain["student_backward"] + 2 * head_mix
  assert counted["step"] == sum(v for k, v in counted.items() if k != "step")


def _mae_xla_over_analytic(config, teacher=None) -> float:
  """XLA's cost analysis of the jitted MAE step less that of its inputs (crops and masks, which the
  analytic count leaves out), over the analytic count."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  pretraining = mae_step.MaePretraining(config, mesh, steps_per_epoch=100, teacher=teacher)
  size = config.canvas_size
  batch = {
    "canvas": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), np.uint8),
    "image_size": jax.ShapeDtypeStruct((config.batch_size, 2), np.int32),
  }

  def cost(lowered):
    analysis = lowered.compile().cost_analysis()
    return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]

  step = cost(pretraining.train_step().lower(pretraining.abstract_state, batch))
  inputs = cost(jax.jit(pretraining.inputs).lower(batch, jnp.zeros((), jnp.int32)))
  teacher_arch = backbones.architecture(teacher[0]) if teacher else None
  return (step - inputs) / (flops.mae_step_flops(config, teacher_arch)["step"] * config.batch_size)


def _mae_with_wide_encoder():
  config = tiny_mae.get_config()  # 32 px crops of 4 px patches: 16 of 64 visible.
  config.model.update(dict(embed_dim=192, num_heads=12, decoder_dim=96, decoder_heads=3))  # Matmuls dominate.
  config.batch_size = 8
  return config


def test_mae_step_flops_within_10_percent_of_xla_cost_analysis():
  # Measured: 1.056 (the rest is elementwise work: AdamW, LayerNorm, GELU, softmax).
  assert _mae_xla_over_analytic(_mae_with_wide_encoder()) == pytest.approx(1.0, abs=0.10)


@pytest.mark.slow
def test_d_mae_step_flops_within_10_percent_of_xla_cost_analysis():
  config = _mae_with_wide_encoder()
  config.distill.update(enabled=True, blocks=(2,), teacher_heads=6)  # The student's last block.
  # A 3-block teacher: its third block, after the distilled second, is computed by no one.
  teacher = backbones.build_backbone(
    "vit_small", depth=3, num_heads=6, patch_size=4, image_size=32, drop_path_rate=0.0
  )
  params = teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  # Measured: 1.046; counting the teacher's every block would give 0.71.
  assert _mae_xla_over_analytic(config, (teacher, params)) == pytest.approx(1.0, abs=0.10)
