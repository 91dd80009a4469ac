"""ViT backbone: an independent PyTorch ViT written here from the maths (official key names), the bicubic
position-embedding interpolation against torch, parameter counts, the converter, and EsViT/DINO training."""

import json
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from esvit_jax import checkpointing, convert, export, sharding, train, train_step, writers
from esvit_jax.configs import knn as knn_configs
from esvit_jax.configs import linear_probe as linear_configs
from esvit_jax.evaluate import knn, linear
from esvit_jax.models import backbones, build_backbone, build_esvit, vit
from tests import test_train_step
from tests.configs import tiny
from tests.test_convert import TorchDINOHead, TorchMlp, randomize_, relative_error, save
from tests.test_train import ROOT
from tests.test_train_step import run_steps

# ----------------------------------------------------------------------------------------------------
# The reference: a DeiT/DINO ViT in PyTorch, (B, 1 + N, C) tokens, LayerNorm eps 1e-6, exact GELU.


class TorchAttention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    self.logits = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5  # Before the softmax (MAE-Lite's).
    return self.proj((self.logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class TorchBlock(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = TorchAttention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = TorchMlp(dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TorchViT(nn.Module):
  """Position embeddings for the 224 grid, resampled for other inputs with torch bicubic and the scale
  factor sqrt(new patches / old patches); the CLS position is kept."""

  def __init__(self, embed_dim, depth, heads, patch, image_size=224):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, embed_dim))
    self.blocks = nn.ModuleList([TorchBlock(embed_dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

  def position_embeddings(self, num_patches):
    old = self.pos_embed.shape[1] - 1
    if num_patches == old:
      return self.pos_embed
    side, dim = math.isqrt(old), self.pos_embed.shape[-1]
    grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=math.sqrt(num_patches / old), mode="bicubic")
    return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

  def block_outputs(self, images):
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.position_embeddings(x.shape[1])
    outputs = []
    for block in self.blocks:
      x = block(x)
      outputs.append(x)
    return outputs

  def forward(self, images):
    """images [B, 3, H, W] -> (CLS [B, C], patch tokens [B, N, C]), both after the final norm."""
    x = self.norm(self.block_outputs(images)[-1])
    return x[:, 0], x[:, 1:]

  def last_blocks(self, images, n, avgpool):
    outputs = [self.norm(x) for x in self.block_outputs(images)[-n:]]
    return torch.cat([x[:, 0] for x in outputs] + ([outputs[-1][:, 1:].mean(1)] if avgpool else []), dim=-1)


def random_vit(seed, **dims):
  model = randomize_(TorchViT(**dims), seed)
  generator = torch.Generator().manual_seed(seed + 100)
  with torch.no_grad():  # Unit-scale embeddings, so that a wrong interpolation shows in the output.
    model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=generator))
    model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=generator))
  return model.eval()


def nhwc(images):
  return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


# ----------------------------------------------------------------------------------------------------
# Position-embedding interpolation.


@pytest.mark.parametrize("side,new_side", [(14, 6), (14, 10), (28, 12), (28, 20), (4, 2), (14, 14)])
def test_position_interpolation_matches_torch_bicubic(side, new_side):
  rng = np.random.default_rng(side + new_side)
  pos_embed = rng.standard_normal((1, 1 + side * side, 5)).astype(np.float32)
  ours = vit.interpolate_pos_embed(jnp.asarray(pos_embed), new_side**2)
  grid = torch.from_numpy(pos_embed[:, 1:]).reshape(1, side, side, 5).permute(0, 3, 1, 2)
  scale = math.sqrt(new_side**2 / side**2)

  def resample(x):
    return F.interpolate(x, scale_factor=scale, mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 5)

  assert ours.shape == (1, 1 + new_side**2, 5)
  np.testing.assert_array_equal(ours[:, 0], pos_embed[:, 0])  # The CLS position is kept.
  assert relative_error(ours[:, 1:], resample(grid)) < 1e-5
  # The matrix itself is torch's resampling exactly (in float64, free of float32 rounding).
  matrix = vit.bicubic_matrix(side, scale)
  grid_np = pos_embed[0, 1:].reshape(side, side, 5)
  np.testing.assert_allclose(
    np.einsum("yi,xj,ijc->yxc", matrix, matrix, grid_np),
    resample(grid.double()).reshape(new_side, new_side, 5),
    rtol=0,
    atol=1e-12,
  )


def test_cubic_coefficient_is_torchs_not_pils():
  """Upsampling a unit impulse 2x samples the kernel at distances 1.75, 1.25, 0.75, 0.25: with a = -0.75
  (torch) -0.03515625, -0.10546875, 0.26171875, 0.87890625; PIL's a = -0.5 would give -0.0234375 first."""
  impulse = np.zeros(6)
  impulse[2] = 1
  row = vit.bicubic_matrix(6, 2.0) @ impulse
  reference = F.interpolate(
    torch.from_numpy(impulse)[None, None, None], scale_factor=(1.0, 2.0), mode="bicubic"
  )
  np.testing.assert_allclose(row, reference[0, 0, 0].numpy(), atol=1e-12)
  np.testing.assert_array_equal(row[1:5], [-0.03515625, -0.10546875, 0.26171875, 0.87890625])


def test_sizes_the_official_interpolation_cannot_make_are_refused():
  """floor(28 * sqrt(29^2 / 28^2)) = 28 in floating point, so 232 px at patch 8 fails in the official code."""
  model = build_backbone("vit_tiny", embed_dim=16, depth=1, num_heads=1, patch_size=8)
  with pytest.raises(ValueError, match="28x28"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 232, 232, 3)))


# ----------------------------------------------------------------------------------------------------
# Forward against the reference, parameter counts, initialisation, probe features.


@pytest.mark.parametrize("patch", [16, 8])
def test_forward_matches_pytorch_at_224_96_and_160(patch):
  reference = random_vit(patch, embed_dim=128, depth=2, heads=2, patch=patch)
  network = convert.convert_state_dict(reference.state_dict())
  assert network.architecture == dict(
    family="vit", embed_dim=128, depth=2, num_heads=2, patch_size=patch, image_size=224, mlp_ratio=4.0
  )
  model = backbones.from_architecture(network.architecture)
  apply = jax.jit(model.apply)
  probe = jax.jit(lambda p, x: model.apply(p, x, 2, True, method="last_blocks"))
  variables = {"params": network.params["backbone"]}
  for size in (224, 96, 160):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
      ref_cls, ref_patches = reference(images)
      ref_probe = reference.last_blocks(images, 2, avgpool=True)
    cls, patches = apply(variables, nhwc(images))
    assert patches.shape == ref_patches.shape == (2, (size // patch) ** 2, 128)
    assert relative_error(cls, ref_cls) < 1e-5 and relative_error(patches, ref_patches) < 1e-5
    features = probe(variables, nhwc(images))
    assert features.shape == (2, 3 * 128) and relative_error(features, ref_probe) < 1e-5


def test_full_vit_small_matches_pytorch_on_a_local_crop():
  """ViT-S/16 at its real size on a 96 px crop: 36 patch tokens, the position grid resampled 14 -> 6."""
  reference = random_vit(3, embed_dim=384, depth=12, heads=6, patch=16)
  network = convert.convert_state_dict(reference.state_dict())
  assert network.name == "vit_small"
  images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    ref_cls, ref_patches = reference(images)
  cls, patches = jax.jit(backbones.from_architecture(network.architecture).apply)(
    {"params": network.params["backbone"]}, nhwc(images)
  )
  assert patches.shape == (1, 36, 384)
  assert relative_error(cls, ref_cls) < 1e-5 and relative_error(patches, ref_patches) < 1e-5


@pytest.mark.parametrize("std", [1.0, 1e-3])
def test_block_matches_pytorch_also_on_tokens_of_tiny_variance(std):
  """Tokens of std 1e-3 (variance 1e-6, the size of eps) make LayerNorm's eps 1e-6 and 1e-5 differ by 2x;
  unit tokens spread the GELU's inputs where the tanh form is off erf by up to 5e-4."""
  reference = randomize_(TorchBlock(32, 2), seed=7).eval()
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  params = {}
  for key, value in state.items():  # torch Linear [out, in] -> Dense [in, out]; LayerNorm weight -> scale.
    *path, leaf = key.split(".")
    name = "kernel" if leaf == "weight" and value.ndim == 2 else "scale" if leaf == "weight" else leaf
    node = params
    for module in path:
      node = node.setdefault(module, {})
    node[name] = value.T if name == "kernel" else value
  tokens = std * torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    expected = reference(tokens).numpy()
  out = jax.jit(vit.Block(num_heads=2).apply)({"params": params}, jnp.asarray(tokens.numpy()))
  # Measured 1.1e-6 on 2026-12-03 (CPU); the tanh GELU moves the output by 4e-4, eps 1e-5 (std 1e-3) by 1.0.
  np.testing.assert_allclose(out, expected, rtol=0, atol=3e-6)


def count(tree):
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "name,dims,expected",
  [
    ("vit_small", dict(embed_dim=384, heads=6), 21_665_664),
    ("vit_base", dict(embed_dim=768, heads=12), 85_798_656),
  ],
)
def test_parameter_counts_are_the_official_ones(name, dims, expected):
  """Counted on shapes only (eval_shape and torch's meta device): nothing is allocated."""
  model = build_backbone(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  with torch.device("meta"):
    reference = TorchViT(**dims, depth=12, patch=16)
  assert count(shapes) == sum(p.numel() for p in reference.parameters()) == expected
  zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes)
  ours = {k: v.shape for k, v in convert.to_state_dict({"backbone": zeros}).items()}
  assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def test_official_initialisation_and_drop_path_schedule():
  model = build_backbone("vit_tiny", embed_dim=64, depth=3, num_heads=1, drop_path_rate=0.3)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  for leaf in (
    params["pos_embed"],
    params["blocks_1"]["mlp"]["fc1"]["kernel"],
    params["blocks_2"]["attn"]["qkv"]["kernel"],
  ):
    assert abs(float(jnp.std(leaf)) - 0.02) < 0.002
  assert abs(float(jnp.std(params["cls_token"])) - 0.02) < 0.01
  np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["bias"], 0)
  np.testing.assert_array_equal(params["norm"]["scale"], 1)
  bound = 1 / np.sqrt(3 * 16 * 16)  # torch's default Conv2d init: U(+-1/sqrt(fan_in)).
  assert bound * 0.9 < float(jnp.abs(params["patch_embed"]["proj"]["kernel"]).max()) <= bound
  bound_model = model.bind({"params": params})
  np.testing.assert_allclose([b.drop_path for b in bound_model.blocks], [0.0, 0.15, 0.3])


def test_jit_compiles_once_per_resolution():
  model = build_backbone(
    "vit_tiny", embed_dim=32, depth=1, num_heads=2, patch_size=8, image_size=32, dtype=jnp.bfloat16
  )
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=2)
  def forward(variables, images):
    return model.apply(variables, images)

  for _ in range(2):
    for size in (32, 16):
      cls, patches = forward(variables, jax.random.normal(jax.random.key(1), (2, size, size, 3)))
      assert cls.dtype == jnp.float32 and patches.shape == (2, (size // 8) ** 2, 32)


# ----------------------------------------------------------------------------------------------------
# Official EsViT / DINO ViT checkpoints in and out.


def test_round_trip_our_params_torch_ours_is_exact():
  config = dict(
    backbone="vit_small",
    embed_dim=128,
    depth=2,
    num_heads=2,
    patch_size=8,
    out_dim=32,
    hidden_dim=24,
    bottleneck_dim=8,
    norm_last_layer=False,
  )
  model = build_esvit(config, use_region_head=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0), [jnp.zeros((1, 1, 224, 224, 3))])["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
  state = convert.to_state_dict(params)
  assert state["pos_embed"].shape == (1, 785, 128) and state["blocks.1.attn.qkv.weight"].shape == (384, 128)
  network = convert.convert_state_dict(state)
  assert network.architecture["patch_size"] == 8 and set(network.heads) == {"head", "head_dense"}
  assert jax.tree.structure(network.params) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, network.params, params)


def test_dino_checkpoint_converts_and_loads_strict_into_the_reference(tmp_path, capsys):
  """A DINO full checkpoint ('backbone.' and 'module.' prefixes, a view head only) -> export -> .pth."""
  reference = random_vit(11, embed_dim=128, depth=2, heads=2, patch=16)
  head = randomize_(TorchDINOHead(128, 32, 24, 8), seed=12)
  teacher = {
    **{"backbone." + k: v for k, v in reference.state_dict().items()},
    **{"head." + k: v for k, v in head.state_dict().items()},
  }
  checkpoint = {
    "student": {"module." + k: v for k, v in teacher.items()},
    "teacher": teacher,
    "epoch": 5,
    "dino_loss": {"center": torch.zeros(1, 32)},
  }
  path, out, pth = save(tmp_path, checkpoint), str(tmp_path / "export"), str(tmp_path / "back.pth")
  convert.main(["from-torch", path, out])
  summary = capsys.readouterr().out
  assert "a custom ViT/16 (embed_dim 128, depth 2, heads 2, position grid for 224 px)" in summary
  assert "Found head (8 tensors, out_dim 32)" in summary
  convert.main(["to-torch", out, pth])
  fresh = TorchViT(128, 2, 2, 16)
  fresh.load_state_dict(torch.load(pth, weights_only=True), strict=True)
  for key, value in reference.state_dict().items():
    assert torch.equal(fresh.state_dict()[key], value), key
  images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
  model, params = export.load_backbone(out)
  with torch.no_grad():
    ref_cls, _ = fresh(images)
  assert relative_error(model.apply({"params": params}, nhwc(images))[0], ref_cls) < 1e-5
  # The student's keys carry both wrappers ('module.backbone.'): both are stripped.
  convert.main(["from-torch", path, str(tmp_path / "student"), "--key", "student"])
  _, student = export.load_backbone(tmp_path / "student")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(student), jax.device_get(params))


def test_vit_layout_errors_are_reported(tmp_path):
  state = dict(random_vit(0, embed_dim=128, depth=2, heads=2, patch=16).state_dict())
  del state["blocks.1.norm2.bias"]
  state["blocks.0.attn.proj.weight"] = torch.zeros(128, 64)
  with pytest.raises(convert.ConversionError) as failure:
    convert.convert_state_dict(state)
  assert sorted(failure.value.problems) == [
    "missing key blocks.1.norm2.bias (128,)",
    "wrong shape for blocks.0.attn.proj.weight: (128, 64) in the checkpoint, (128, 128) expected",
  ]
  odd = {k: v for k, v in state.items()}
  odd["patch_embed.proj.weight"] = torch.zeros(100, 3, 16, 16)
  with pytest.raises(convert.ConversionError, match="head width 64"):
    convert.convert_state_dict(odd)


# ----------------------------------------------------------------------------------------------------
# EsViT and DINO pretraining with a ViT.


def with_tiny_vit(config):
  """A 2-block ViT (48 channels, 2 heads) with patch 8: 16 patch tokens on 32 px crops, 4 on 16 px."""
  for key in ("window_size", "depths", "num_heads"):
    del config.model[key]
  config.model.update(backbone="vit_tiny", embed_dim=48, depth=2, num_heads=2, patch_size=8, image_size=32)
  return config


@pytest.mark.slow
@pytest.mark.parametrize("region_loss_weight", [0.5, 0.0], ids=["esvit", "dino"])
def test_pretraining_on_demo_data_lowers_the_loss(region_loss_weight, tmp_path):
  """12 steps of the full loop on the demo stream (peak lr 3e-3). Teacher and centres are held fixed
  (momenta 1) so that the target stays put: in so few steps their drift is larger than the learning."""
  config = with_tiny_vit(tiny.get_config())
  config.update(
    region_loss_weight=region_loss_weight,
    total_steps=12,
    ckpt_every_steps=12,
    lr=0.05,
    momentum_teacher=1.0,
    center_momentum=1.0,
  )
  state = train.train_and_evaluate(config, str(tmp_path))
  losses = [r["loss"] for r in writers.read_metrics(tmp_path) if "loss" in r]
  assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.05, losses
  assert ("region_head" in state.params) == (region_loss_weight > 0)
  model, params = export.load_pretrained(tmp_path / "export")
  assert isinstance(model, vit.VisionTransformer) and model.patch_size == 8
  _, from_workdir = export.load_pretrained(tmp_path)  # The teacher backbone read alone from the checkpoint.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_workdir), jax.device_get(params))
  cls, patches = model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))
  assert cls.shape == (1, 48) and patches.shape == (1, 16, 48)
  if region_loss_weight:  # The evaluations read a ViT export as they read a Swin's.
    demo_data = dict(dataset="demo", eval_split="test", eval_resize=36, eval_crop_size=32, eval_batch_size=40)
    knn_config = knn_configs.get_config()
    knn_config.update(**demo_data, max_train_examples=200, max_eval_examples=80, ks=(10,))
    knn_config.pretrained = str(tmp_path / "export")
    assert 0 <= knn.run(knn_config, str(tmp_path / "knn"))["knn_top1_k10"] <= 100
    probe_config = linear_configs.get_config()
    probe_config.update(
      **demo_data, crop_size=32, batch_size=400, epochs=1, n_last_blocks=1, avgpool_patchtokens=True
    )
    probe_config.pretrained = str(tmp_path / "export")
    results = linear.train_and_evaluate(probe_config, str(tmp_path / "linear"))
    assert results["feature_dim"] == 2 * 48  # The last CLS token and the mean patch token (DINO's ViT-B).


def step_config(**overrides):
  return with_tiny_vit(test_train_step.tiny_config(**overrides))


@pytest.fixture(scope="module")
def single_device_steps():
  return run_steps(step_config(), sharding.make_mesh(jax.devices()[:1]), num_steps=2)


def test_sharded_step_matches_single_device_and_compiles_once(single_device_steps):
  """run_steps asserts one compilation for both steps; 8 fake devices give the single-device numbers."""
  _, expected_states, expected_metrics, _ = single_device_steps
  assert {"view_loss", "region_loss"} <= set(expected_metrics[0])
  _, states, metrics, _ = run_steps(step_config(), sharding.make_mesh(), num_steps=2)
  for ours, expected in zip(metrics, expected_metrics, strict=True):
    for key in expected:
      np.testing.assert_allclose(ours[key], expected[key], rtol=2e-5, err_msg=key)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=5e-5),
    without_key_bias(states[-1]),
    without_key_bias(expected_states[-1]),
  )


def without_key_bias(state):
  """Zeroes the key part of every qkv bias. Softmax is invariant to it, so its true gradient is 0 and its
  computed one is rounding noise, which Adam scales up to full-size steps of either sign."""

  def mask(path, leaf):
    if "'qkv']['bias']" in jax.tree_util.keystr(path) and leaf.ndim == 1:
      dim = leaf.shape[0] // 3
      leaf = np.concatenate([leaf[:dim], np.zeros(dim, leaf.dtype), leaf[2 * dim :]])
    return leaf

  return jax.tree_util.tree_map_with_path(mask, state)


def test_full_dino_vit_checkpoint_becomes_a_workdir_for_the_vit_recipe(tmp_path, capsys, monkeypatch):
  """--full with a ViT config: DINO's norm_last_layer=True heads (g = 1) lose g; the centre is kept."""
  monkeypatch.chdir(ROOT)
  config_file = tmp_path / "small_vit.py"
  config_file.write_text(
    "from esvit_jax.configs import vit_common\n\n\n"
    "def get_config(arg=None):\n"
    "  config = vit_common.vit_pretrain_config('vit_small', arg)\n"
    "  config.model.update(embed_dim=128, depth=2, num_heads=2)\n"
    "  return config\n"
  )
  backbone = random_vit(21, embed_dim=128, depth=2, heads=2, patch=16).state_dict()
  head = randomize_(TorchDINOHead(128, 32, 24, 8), seed=22).state_dict()
  head["last_layer.weight_g"] = torch.ones(32, 1)  # norm_last_layer=True: g stays 1 in DINO's runs.
  teacher = {
    **{"backbone." + k: v for k, v in backbone.items()},
    **{"head." + k: v for k, v in head.items()},
  }
  checkpoint = {
    "student": {"module." + k: v for k, v in teacher.items()},
    "teacher": teacher,
    "epoch": 2,
    "dino_loss": {"center": torch.randn(1, 32)},
  }
  path, workdir = save(tmp_path, checkpoint), tmp_path / "workdir"
  convert.main(
    [
      "from-torch",
      path,
      str(workdir),
      "--full",
      "--config",
      f"{config_file}:dino=true",
      "--steps-per-epoch",
      "3",
    ]
  )
  summary = capsys.readouterr().out
  assert "step 6 = epoch 2 x 3 steps per epoch" in summary and "--config.model.out_dim=32" in summary
  _, params = export.load_pretrained(workdir)
  reference = convert.convert_state_dict(teacher, with_heads=False).params["backbone"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), reference)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  assert config.model.norm_last_layer and config.region_loss_weight == 0
  abstract = train_step.abstract_train_state(config, sharding.make_mesh(jax.devices()[:1]), steps_per_epoch=3)
  state, _ = checkpointing.Checkpointer(workdir).restore_latest(abstract)
  assert int(state.step) == 6
  np.testing.assert_array_equal(state.center, checkpoint["dino_loss"]["center"].numpy())
  for network in (state.params, state.teacher_params):
    last_layer = network["view_head"]["last_layer"]
    assert set(last_layer) == {"kernel"}  # g = 1 dropped: a norm_last_layer=True head has no scale.
    np.testing.assert_array_equal(last_layer["kernel"], head["last_layer.weight_v"].numpy().T)
