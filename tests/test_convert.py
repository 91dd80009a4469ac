"""PyTorch interoperability: an independent PyTorch Swin (written here from the official layout, with the
official key names) against the converted JAX model, exact round trips, and the error reports."""

import argparse
import fractions
import json
import math
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from esvit_jax import checkpointing, convert, export, sharding, train_step
from esvit_jax.models import DINOHead, backbones, build_backbone, build_esvit
from tests.test_train import ROOT

# ----------------------------------------------------------------------------------------------------
# The reference: EsViT's Swin in PyTorch, (B, L, C) tokens as in the official code, LayerNorm eps 1e-6.


def spec_relative_position_index(window):
  """idx[i, j] = (dy + w - 1) * (2w - 1) + (dx + w - 1), tokens row-major inside the window."""
  y, x = np.divmod(np.arange(window * window), window)
  dy, dx = y[:, None] - y[None, :], x[:, None] - x[None, :]
  return torch.from_numpy((dy + window - 1) * (2 * window - 1) + dx + window - 1)


def spec_shift_mask(size, window, shift):
  """[nW, N, N]: -100 between tokens of different regions of the padded map (slices 0:-w, -w:-s, -s:)."""
  padded = math.ceil(size / window) * window
  regions = torch.zeros(padded, padded)
  bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, rows in enumerate(bands):
    for j, cols in enumerate(bands):
      regions[rows, cols] = 3 * i + j
  n = padded // window
  ids = regions.reshape(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)
  return torch.where(ids[:, :, None] != ids[:, None, :], -100.0, 0.0)


class TorchWindowAttention(nn.Module):
  def __init__(self, dim, heads, window):
    super().__init__()
    self.heads = heads
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
    self.register_buffer("relative_position_index", spec_relative_position_index(window))
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, windows, mask):
    """windows: [B * nW, N, C] batch-major; mask: [nW, N, N] or None."""
    bn, n, c = windows.shape
    q, k, v = self.qkv(windows).reshape(bn, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(n, n, -1)
    attn = attn + bias.permute(2, 0, 1)[None]
    if mask is not None:
      nw = mask.shape[0]
      attn = (attn.reshape(bn // nw, nw, self.heads, n, n) + mask[None, :, None]).reshape(
        bn, self.heads, n, n
      )
    return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(bn, n, c))


class TorchMlp(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.fc1 = nn.Linear(dim, 4 * dim)
    self.fc2 = nn.Linear(4 * dim, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))  # Exact (erf) GELU.


class TorchBlock(nn.Module):
  def __init__(self, dim, heads, window, shift):
    super().__init__()
    self.window, self.shift = window, shift
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = TorchWindowAttention(dim, heads, window)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = TorchMlp(dim)

  def forward(self, x):
    b, length, c = x.shape
    h, w, s = math.isqrt(length), self.window, self.shift
    pad = -h % w
    y = F.pad(self.norm1(x).reshape(b, h, h, c), (0, 0, 0, pad, 0, pad))  # Padded tokens stay unmasked.
    n = (h + pad) // w
    mask = None
    if s:
      y = torch.roll(y, (-s, -s), dims=(1, 2))
      mask = spec_shift_mask(h, w, s)
    windows = y.reshape(b, n, w, n, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b * n * n, w * w, c)
    y = (
      self.attn(windows, mask).reshape(b, n, n, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n * w, n * w, c)
    )
    if s:
      y = torch.roll(y, (s, s), dims=(1, 2))
    x = x + y[:, :h, :h].reshape(b, length, c)
    return x + self.mlp(self.norm2(x))


class TorchPatchMerging(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
    self.norm = nn.LayerNorm(4 * dim, eps=1e-6)

  def forward(self, x):
    b, length, c = x.shape
    h = math.isqrt(length)
    x = F.pad(x.reshape(b, h, h, c), (0, 0, 0, h % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class TorchSwin(nn.Module):
  """Window and shift of each block fixed from the construction resolution (spec 1.2 step 2)."""

  def __init__(self, embed_dim, depths, num_heads, window, image_size=224, patch=4):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch, patch)
    self.patch_embed.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.layers = nn.ModuleList()
    for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=False)):
      dim, resolution = embed_dim * 2**i, image_size // patch // 2**i
      layer = nn.Module()
      layer.blocks = nn.ModuleList(
        [
          TorchBlock(dim, heads, resolution, 0)
          if resolution <= window
          else TorchBlock(dim, heads, window, 0 if j % 2 == 0 else window // 2)
          for j in range(depth)
        ]
      )
      if i < len(depths) - 1:
        layer.downsample = TorchPatchMerging(dim)
      self.layers.append(layer)
    self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1), eps=1e-6)

  def forward(self, images):
    """images: [B, 3, H, W] -> (pooled [B, C], regions [B, N, C])."""
    x = self.patch_embed.norm(self.patch_embed.proj(images).flatten(2).transpose(1, 2))
    for layer in self.layers:
      for block in layer.blocks:
        x = block(x)
      if hasattr(layer, "downsample"):
        x = layer.downsample(x)
    regions = self.norm(x)
    return regions.mean(1), regions


class TorchWeightNormLinear(nn.Module):
  """weight_norm(Linear(bias=False)): W[k] = g[k] v[k] / ||v[k]||, state dict keys weight_g, weight_v."""

  def __init__(self, in_dim, out_dim):
    super().__init__()
    self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
    self.weight_v = nn.Parameter(torch.zeros(out_dim, in_dim))

  def forward(self, x):
    return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class TorchDINOHead(nn.Module):
  def __init__(self, in_dim, out_dim, hidden, bottleneck):
    super().__init__()
    self.mlp = nn.Sequential(
      nn.Linear(in_dim, hidden),
      nn.GELU(),
      nn.Linear(hidden, hidden),
      nn.GELU(),
      nn.Linear(hidden, bottleneck),
    )
    self.last_layer = TorchWeightNormLinear(bottleneck, out_dim)

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def randomize_(module, seed):
  """Random values for every parameter: the init's zero biases and unit norms would hide layout mistakes."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if "relative_position_bias_table" in name:
        p.copy_(noise)
      elif p.ndim >= 2:
        p.copy_(noise / math.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("weight"):
        p.copy_(1 + 0.3 * noise)
      else:
        p.copy_(0.3 * noise)
  return module


def relative_error(ours, reference):
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return np.abs(ours - reference).max() / np.abs(reference).max()


def save(tmp_path, obj, name="ckpt.pth"):
  path = tmp_path / name
  torch.save(obj, path)
  return str(path)


# Four stages with the real windows and shifts (96px crops pad to 7 and keep their shifts), tiny widths.
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))


@pytest.fixture(scope="module")
def torch_swin():
  return randomize_(TorchSwin(**SMALL, window=7), seed=0).eval()


@pytest.fixture(scope="module")
def exported(torch_swin, tmp_path_factory):
  """The reference's state dict written as an official checkpoint, converted by the CLI."""
  tmp = tmp_path_factory.mktemp("export")
  heads = {
    f"{name}.{k}": v
    for name in ("head", "head_dense")
    for k, v in randomize_(TorchDINOHead(128, 32, 24, 8), seed=1).state_dict().items()
  }
  teacher = {**torch_swin.state_dict(), **heads}
  checkpoint = {
    "student": {"module." + k: v + 1 if v.is_floating_point() else v for k, v in teacher.items()},
    "teacher": teacher,
    "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
    "epoch": 7,
    "args": argparse.Namespace(arch="swin_tiny", out_dim=32, use_dense_prediction=True),
    "dino_loss": {"center": torch.randn(1, 32), "center_grid": torch.randn(1, 32)},
    "fp16_scaler": {"scale": 65536.0, "_growth_tracker": 3},
  }
  path, out = save(tmp, checkpoint), str(tmp / "teacher")
  convert.main(["from-torch", path, out])
  return path, out


def convert_cli(argv, capsys):
  convert.main(argv)
  return capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# The reference itself against the spec; architecture inference on the six official variants.

OFFICIAL = {
  "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
  "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
  "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def meta_state_dict(name, window):
  with torch.device("meta"):
    return TorchSwin(**OFFICIAL[name], window=window).state_dict()


def test_reference_has_the_official_swin_tiny_keys():
  state = meta_state_dict("swin_tiny", 7)
  assert len(state) == 183  # 183 official backbone keys including the buffers.
  assert state["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (169, 3)
  assert state["layers.2.blocks.5.attn.qkv.weight"].shape == (1152, 384)
  assert state["layers.2.downsample.reduction.weight"].shape == (768, 1536)
  assert state["layers.2.downsample.norm.weight"].shape == (1536,)
  assert not any(k.startswith("layers.3.downsample") or "attn_mask" in k for k in state)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
@pytest.mark.parametrize("window", [7, 14])
def test_infers_official_architectures(name, window):
  state = meta_state_dict(name, window)
  if window == 14:  # Stage 4 (7x7 at 224) uses its resolution as window: 169 rows, not 729.
    assert state["layers.2.blocks.0.attn.relative_position_bias_table"].shape[0] == 729
    assert state["layers.3.blocks.0.attn.relative_position_bias_table"].shape[0] == 169
  arch = convert.infer_architecture(state)
  assert arch == dict(
    OFFICIAL[name],
    family="swin",
    depths=list(OFFICIAL[name]["depths"]),
    num_heads=list(OFFICIAL[name]["num_heads"]),
    window_size=window,
    image_size=224,
    patch_size=4,
    mlp_ratio=4.0,
  )
  assert backbones.variant_name(arch) == name


@pytest.mark.parametrize("name,window", [("swin_tiny", 7), ("swin_base", 14)])
def test_our_state_dict_has_exactly_the_official_keys_and_shapes(name, window):
  model = build_backbone(name, window_size=window)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes)
  ours = {k: v.shape for k, v in convert.to_state_dict({"backbone": zeros}).items()}
  assert ours == {k: tuple(v.shape) for k, v in meta_state_dict(name, window).items()}


# ----------------------------------------------------------------------------------------------------
# Numerics: the converted model against the PyTorch forward.


@pytest.mark.parametrize(
  "dims,window",
  [
    (OFFICIAL["swin_tiny"], 7),  # Full size.
    (dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)), 14),  # Stage 4's table has 169 rows.
  ],
)
def test_converted_model_matches_pytorch_forward(dims, window):
  reference = randomize_(TorchSwin(**dims, window=window), seed=window).eval()
  network = convert.convert_state_dict(reference.state_dict())
  assert network.architecture["window_size"] == window
  apply = jax.jit(backbones.from_architecture(network.architecture).apply)
  for size, tokens in ((224, 49), (96, 9)):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
      ref_pooled, ref_regions = reference(images)
    pooled, regions = apply(
      {"params": network.params["backbone"]}, jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    )
    assert regions.shape == ref_regions.shape == (2, tokens, dims["embed_dim"] * 8)
    # Largest measured on 2026-12-03 (CPU): 1.8e-6 (Swin-T regions at 224 px).
    assert relative_error(pooled, ref_pooled) < 5e-6
    assert relative_error(regions, ref_regions) < 5e-6


def test_heads_convert_to_our_dino_head(torch_swin):
  head = randomize_(TorchDINOHead(128, 32, 24, 8), seed=5).eval()
  state = {**torch_swin.state_dict(), **{f"head_dense.{k}": v for k, v in head.state_dict().items()}}
  network = convert.convert_state_dict({"module." + k: v for k, v in state.items()})
  assert network.heads == {"head_dense": dict(out_dim=32, hidden_dim=24, bottleneck_dim=8, num_layers=3)}
  features = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    reference = head(features)
  ours = DINOHead(out_dim=32, hidden_dim=24, bottleneck_dim=8).apply(
    {"params": network.params["region_head"]}, jnp.asarray(features.numpy())
  )
  assert relative_error(ours, reference) < 1e-5


# ----------------------------------------------------------------------------------------------------
# Round trips and the CLI.


def test_round_trip_our_params_torch_ours_is_exact():
  config = dict(
    backbone="swin_tiny",
    **SMALL,
    window_size=7,
    out_dim=32,
    hidden_dim=24,
    bottleneck_dim=8,
    norm_last_layer=False,
  )
  model = build_esvit(config, use_region_head=True)
  crops = [jnp.zeros((1, 1, 224, 224, 3))]
  shapes = jax.eval_shape(model.init, jax.random.key(0), crops)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
  state = convert.to_state_dict(params)
  assert state["head_dense.last_layer.weight_g"].shape == (32, 1)
  back = convert.convert_state_dict(state).params
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_official_checkpoint_summary_and_student_key(exported, tmp_path, capsys):
  checkpoint, out = exported
  student_out = tmp_path / "student"
  summary = convert_cli(["from-torch", checkpoint, str(student_out), "--key", "student"], capsys)
  assert "the student after 7 epochs" in summary and "Loss centre center_grid: shape (1, 32)" in summary
  assert (
    "Found head_dense (8 tensors, out_dim 32); heads are not part of an export." in summary
    and "8 relative_position_index buffers checked" in summary
  )
  _, teacher = export.load_backbone(out)
  _, student = export.load_backbone(student_out)
  jax.tree.map(lambda s, t: np.testing.assert_allclose(s, np.asarray(t) + 1, rtol=1e-6), student, teacher)
  loaded = convert.select_network(convert.load_torch_file(checkpoint))
  assert loaded.key == "teacher" and loaded.epoch == 7 and set(loaded.centres) == {"center", "center_grid"}


def test_pretraining_checkpoint_has_both_networks_heads_and_centres(exported):
  checkpoint, _ = exported
  loaded = convert.read_pretraining_checkpoint(checkpoint)
  assert loaded.epoch == 7 and {k: v.shape for k, v in loaded.centres.items()} == {
    "center": (1, 32),
    "center_grid": (1, 32),
  }
  config = dict(
    backbone="swin_tiny",
    **SMALL,
    window_size=7,
    out_dim=32,
    hidden_dim=24,
    bottleneck_dim=8,
    norm_last_layer=False,
  )
  shapes = jax.eval_shape(
    build_esvit(config, use_region_head=True).init, jax.random.key(0), [jnp.zeros((1, 1, 224, 224, 3))]
  )["params"]
  for network in (loaded.student, loaded.teacher):
    assert jax.tree.map(np.shape, network.params) == jax.tree.map(lambda s: s.shape, shapes)
  jax.tree.map(
    lambda s, t: np.testing.assert_allclose(s, t + 1, rtol=1e-6), loaded.student.params, loaded.teacher.params
  )


def test_to_torch_loads_strict_into_the_reference(torch_swin, exported, tmp_path, capsys):
  _, out = exported
  pth = tmp_path / "back.pth"
  assert f"Wrote {len(torch_swin.state_dict())} tensors" in convert_cli(["to-torch", out, str(pth)], capsys)
  fresh = TorchSwin(**SMALL, window=7)
  fresh.load_state_dict(torch.load(pth, weights_only=True), strict=True)
  for key, value in torch_swin.state_dict().items():
    assert torch.equal(fresh.state_dict()[key], value), key


# ----------------------------------------------------------------------------------------------------
# Corrupted inputs: one clear report (a user error: the tool exits with 2), nothing written.


def expect_failure(tmp_path, state, *messages, argv=()):
  out = tmp_path / "out"
  with pytest.raises(convert.ConversionError) as failure:
    convert.main(["from-torch", save(tmp_path, state), str(out), *argv])
  for message in messages:
    assert message in str(failure.value)
  assert not out.exists()


def test_missing_wrong_shape_unexpected_and_bad_buffer_reported_together(torch_swin, tmp_path):
  state = dict(torch_swin.state_dict())
  del state["layers.1.blocks.0.norm2.bias"]
  state["norm.weight"] = torch.zeros(64)
  state["layers.0.blocks.1.attn.relative_position_index"] = state[
    "layers.0.blocks.1.attn.relative_position_index"
  ].T
  state["layers.3.blocks.0.attn_mask"] = torch.zeros(1, 49, 49)
  expect_failure(
    tmp_path,
    state,
    "missing key layers.1.blocks.0.norm2.bias (32,)",
    "wrong shape for norm.weight: (64,) in the checkpoint, (128,) expected",
    "layers.0.blocks.1.attn.relative_position_index (49, 49) differs",
    "unexpected key layers.3.blocks.0.attn_mask (1, 49, 49)",
  )


def test_unknown_architectures_are_named(tmp_path):
  vit = {
    "cls_token": torch.zeros(1, 1, 384),
    "pos_embed": torch.zeros(1, 197, 384),
    "patch_embed.proj.weight": torch.zeros(384, 3, 16, 16),
    "blocks.0.attn.qkv.weight": torch.zeros(1152, 384),
  }
  expect_failure(
    tmp_path,
    {"teacher": {"backbone." + k: v for k, v in vit.items()}},
    "Not a ViT state dict",
    "lack blocks.0.mlp.fc1.weight",
  )
  resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer4.2.bn3.weight": torch.zeros(2048)}
  expect_failure(tmp_path, resnet, "Not a Swin Transformer", "a ResNet")
  swin = {
    "patch_embed.proj.weight": torch.zeros(16, 3, 4, 4),
    "layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(50, 2),
    "layers.0.blocks.0.mlp.fc1.weight": torch.zeros(64, 16),
  }
  expect_failure(tmp_path, swin, "not ((2w-1)^2, heads)")


def test_checkpoint_without_the_key_and_untrusted_pickles(torch_swin, tmp_path):
  expect_failure(
    tmp_path,
    {"teacher": torch_swin.state_dict(), "epoch": 1},
    "a 'student' state dict",
    argv=["--key", "student"],
  )
  expect_failure(
    tmp_path, {"model": torch_swin.state_dict(), "ratio": fractions.Fraction(1, 3)}, "--trust-pickle"
  )
  path = save(tmp_path, {"teacher": torch_swin.state_dict(), "ratio": fractions.Fraction(1, 3)})
  assert convert.load_torch_file(path, trust_pickle=True)["ratio"] == fractions.Fraction(1, 3)


def test_missing_torch_asks_for_the_extra(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  with pytest.raises(convert.TorchMissingError) as failure:
    convert.main(["from-torch", str(tmp_path / "ckpt.pth"), str(tmp_path / "out")])
  assert "pip install torch==2.13.0" in str(failure.value) and "make install-torch" in str(failure.value)


@pytest.mark.slow
def test_full_conversion_writes_a_pretraining_workdir_that_resumes(tmp_path, capsys, monkeypatch):
  """--full: a Swin-T V-only checkpoint (no head_dense) becomes a workdir main.py continues at epoch 3."""
  teacher = randomize_(TorchSwin(**OFFICIAL["swin_tiny"], window=7), seed=3).state_dict()
  teacher.update(
    {f"head.{k}": v for k, v in randomize_(TorchDINOHead(768, 64, 32, 16), seed=4).state_dict().items()}
  )
  checkpoint = {
    "student": {"module." + k: v + 1 if v.is_floating_point() else v for k, v in teacher.items()},
    "teacher": teacher,
    "epoch": 3,
    "dino_loss": {"center": torch.randn(1, 64)},
  }
  path, workdir = save(tmp_path, checkpoint), tmp_path / "workdir"
  monkeypatch.chdir(ROOT)  # --config takes a path, as main.py does.
  with pytest.raises(convert.ConversionError, match="needs --config"):
    convert.main(["from-torch", path, str(workdir), "--full"])
  with pytest.raises(
    convert.ConversionError, match="the checkpoint holds"
  ):  # A W14 config for a W7 checkpoint.
    convert.main(["from-torch", path, str(workdir), "--full", "--config", "configs/swin_t.py:window=14"])
  summary = convert_cli(
    ["from-torch", path, str(workdir), "--full", "--config", "configs/swin_t.py", "--steps-per-epoch", "10"],
    capsys,
  )
  assert "step 30 = epoch 3 x 10 steps per epoch" in summary and "new head_dense" in summary
  assert (
    "python main.py --config configs/swin_t.py --config.model.out_dim=64 --config.model.hidden_dim=32 "
    "--config.model.bottleneck_dim=16 --workdir"
  ) in summary

  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  assert (
    config.model.backbone == "swin_tiny" and config.model.out_dim == 64 and config.region_loss_weight == 0.5
  )
  mesh = sharding.make_mesh(jax.devices()[:1])
  state, meta = checkpointing.Checkpointer(workdir).restore_latest(
    train_step.abstract_train_state(config, mesh, steps_per_epoch=10)
  )
  assert int(state.step) == 30 and meta["input_position"] == 30
  converted = convert.read_pretraining_checkpoint(path)
  for ours, theirs in (
    (state.teacher_params, converted.teacher.params),
    (state.params, converted.student.params),
  ):
    jax.tree.map(np.testing.assert_array_equal, {k: ours[k] for k in theirs}, theirs)
  assert "region_head" in state.params  # Fresh, as in the official V -> V+R continued runs.
  np.testing.assert_array_equal(state.center, checkpoint["dino_loss"]["center"].numpy())
  np.testing.assert_array_equal(state.region_center, 0)
  counts = {
    jax.tree_util.keystr(p): int(v)
    for p, v in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    if v.ndim == 0
  }
  assert sorted(set(counts.values())) == [
    0,
    20,
    30,
  ]  # Adam restarts; schedules at step 30 (last layer: 30 - 10).
