"""MAE and MAE-Lite checkpoints: an independent PyTorch MAE (timm's key names, written here from the
models' maths) saved in the official file layouts, converted to our MAE tree and back exactly, to an export
whose forward is the PyTorch encoder's, and refused when the heads are not known."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from esvit_jax import checkpointing, convert, export, mae_step, sharding, train
from esvit_jax.convert import mae as convert_mae
from tests.configs import mae_tiny as tiny
from tests.test_convert import SMALL, TorchSwin, randomize_, relative_error, save
from tests.test_train import ROOT, losses
from tests.test_vit import TorchBlock

# ----------------------------------------------------------------------------------------------------
# The reference: MAE's encoder and decoder in PyTorch, LayerNorm eps 1e-6, exact GELU, fixed sin-cos tables.


def sincos_table(dim, grid):
  """[1, 1 + grid^2, dim]: a zero CLS row, then per row-major patch sin / cos of its column at
  frequencies 10000^(-k / (dim / 4)) in the first dim / 2 channels and of its row in the last dim / 2."""
  omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
  rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

  def encode(positions):
    angles = positions.reshape(-1, 1).double() * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)

  table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat([encode(cols), encode(rows)], 1)])
  return table.float()[None]


class TorchMaeEncoder(nn.Module):
  """MAE's encoder on every patch (no masking): patch tokens + their table rows, the CLS token + row 0."""

  def __init__(self, embed_dim, depth, heads, patch, image_size):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(sincos_table(embed_dim, image_size // patch), requires_grad=False)
    self.blocks = nn.ModuleList([TorchBlock(embed_dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

  def forward(self, images):
    """images [B, 3, H, W] -> (CLS [B, C], patch tokens [B, N, C]), both after the final norm."""
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return x[:, 0], x[:, 1:]


class TorchMae(TorchMaeEncoder):
  """The whole MAE's parameters and tables under the official names (the decoder's forward is not needed)."""

  def __init__(self, embed_dim, depth, heads, patch, image_size, decoder_dim, decoder_depth, decoder_heads):
    super().__init__(embed_dim, depth, heads, patch, image_size)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
    self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
    self.decoder_pos_embed = nn.Parameter(sincos_table(decoder_dim, image_size // patch), requires_grad=False)
    self.decoder_blocks = nn.ModuleList(
      [TorchBlock(decoder_dim, decoder_heads) for _ in range(decoder_depth)]
    )
    self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(decoder_dim, patch * patch * 3)


# Tiny: 12 heads 4 wide (a head width no official ViT has), 2 decoder blocks to see their indices.
TINY = dict(embed_dim=48, depth=2, heads=12, patch=16, image_size=32)
TINY_DECODER = dict(decoder_dim=32, decoder_depth=2, decoder_heads=4)
MAE_TINY = dict(embed_dim=192, depth=12, heads=12, patch=16, image_size=224)
MAE_TINY_DECODER = dict(decoder_dim=96, decoder_depth=1, decoder_heads=3)
TEACHER = dict(embed_dim=24, depth=1, heads=2, patch=16, image_size=32)  # Stands for D-MAE's MAE-Base.
# The sizes of tests/configs/mae_tiny.py, for --full.
TEST_CONFIG = "tests/configs/mae_tiny.py"
TEST_MAE = dict(embed_dim=32, depth=2, heads=4, patch=4, image_size=32)
TEST_DECODER = dict(decoder_dim=16, decoder_depth=1, decoder_heads=2)
TINY_CONFIG = """
import ml_collections

def get_config():
  model = dict(backbone="vit_tiny", embed_dim=48, num_heads=12, patch_size=16, image_size=32)
  return ml_collections.ConfigDict({"model": model})
"""


def random_mae(seed, dims=TINY, decoder=TINY_DECODER):
  model = randomize_(TorchMae(**dims, **decoder), seed)
  grid = dims["image_size"] // dims["patch"]
  with torch.no_grad():  # The fixed tables stay MAE's.
    model.pos_embed.copy_(sincos_table(dims["embed_dim"], grid))
    model.decoder_pos_embed.copy_(sincos_table(decoder["decoder_dim"], grid))
  return model.eval()


def official_file(model, prefix="module.model.", **entries):
  """MAE-Lite's file: the D-MAE state dict (student, frozen teacher, head-mix adapter) under 'model',
  with the trainer's other entries."""
  wrapper = prefix.replace("model.", "")
  teacher = TorchMaeEncoder(**TEACHER).state_dict()
  state = {
    **{prefix + k: v for k, v in model.state_dict().items()},
    **{f"{wrapper}tch_model.{k}": v for k, v in teacher.items()},
    f"{wrapper}attn_adapter.adapter11.weight": torch.randn(12, 12, 1, 1),
  }
  return {
    "start_epoch": 400,
    "model": state,
    "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
    "scheduler": {"last_epoch": 399},
    "best_top1": 0.0,
    "scaler": {"scale": 65536.0, "_growth_tracker": 3},
    **entries,
  }


def numpy_state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# Round trips.


def test_reference_table_rows_worked_out_by_hand():
  table = sincos_table(8, 3)[0].numpy()
  assert np.all(table[0] == 0) and table.shape == (10, 8)
  # Patch (row 1, column 2): the column's sines at frequencies 1 and 1/100 first, then the row's.
  np.testing.assert_allclose(table[1 + 5, :2], np.sin([2.0, 2.0 / 100]), rtol=1e-7)
  np.testing.assert_allclose(table[1 + 5, 4:6], np.sin([1.0, 1.0 / 100]), rtol=1e-7)


@pytest.mark.parametrize("prefix", ["module.model.", "module.", "model.", ""])
def test_round_trip_in_the_official_layout_is_exact_with_each_prefix(tmp_path, prefix):
  reference = random_mae(0)
  checkpoint = convert.select_network(
    convert.load_torch_file(save(tmp_path, official_file(reference, prefix)))
  )
  assert checkpoint.key == "model" and convert_mae.is_mae(checkpoint)
  network = convert.mae_params_from_state_dict(checkpoint.state_dict, num_heads=12)

  assert network.skipped == {"tch_model.": len(TorchMaeEncoder(**TEACHER).state_dict()), "attn_adapter.": 1}
  assert network.architecture == dict(
    family="vit", embed_dim=48, depth=2, num_heads=12, patch_size=16, image_size=32, mlp_ratio=4.0
  )
  assert network.decoder == {"embed_dim": 32, "depth": 2}
  assert sorted(network.params) == [
    "decoder_blocks_0",
    "decoder_blocks_1",
    "decoder_embed",
    "decoder_norm",
    "decoder_pred",
    "encoder",
    "mask_token",
  ]
  assert "pos_embed" not in network.params["encoder"]  # A constant of our MAE, not a parameter.
  np.testing.assert_array_equal(
    network.params["decoder_blocks_1"]["mlp"]["fc2"]["kernel"].T,
    numpy_state(reference)["decoder_blocks.1.mlp.fc2.weight"],
  )

  back = convert.mae_state_dict(network.params, image_size=32)  # torch -> ours -> torch.
  expected = numpy_state(reference)
  assert sorted(back) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  fresh = TorchMae(**TINY, **TINY_DECODER)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)

  again = convert.mae_params_from_state_dict(back, num_heads=12).params  # ours -> torch -> ours.
  jax.tree.map(np.testing.assert_array_equal, again, network.params)


def test_our_tree_is_the_models_and_mae_tiny_has_the_official_keys_and_counts():
  reference = TorchMae(**MAE_TINY, **MAE_TINY_DECODER)
  architecture = dict(
    family="vit", embed_dim=192, depth=12, num_heads=12, patch_size=16, image_size=224, mlp_ratio=4.0
  )
  shapes = convert_mae.mae_param_shapes(architecture, {"embed_dim": 96, "depth": 1})
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  ours = {k: v.shape for k, v in convert.mae_state_dict(zeros).items()}
  assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  assert count(zeros["encoder"]) == 5_486_592  # Trainable; the 197 x 192 table is not a parameter.
  assert count({k: v for k, v in zeros.items() if k != "encoder"}) == 205_152


# ----------------------------------------------------------------------------------------------------
# The command line: an export of the encoder, and the heads.


def test_encoder_export_lists_what_it_skips_and_runs_the_pytorch_forward(tmp_path, capsys):
  reference = random_mae(1)
  path, out, config = save(tmp_path, official_file(reference)), tmp_path / "export", tmp_path / "tiny.py"
  config.write_text(TINY_CONFIG)
  convert.main(["from-torch", path, str(out), "--config", str(config)])
  summary = capsys.readouterr().out
  teacher_tensors = len(TorchMaeEncoder(**TEACHER).state_dict())
  for line in (
    f"heads 12 from --config {config}",
    "Skipped the decoder (mask_token, decoder_*: 31 tensors",
    f"Skipped tch_model.* ({teacher_tensors} tensors): the distillation teacher.",
    "Skipped attn_adapter.* (1 tensors): the head-mix adapter.",
    "Skipped the file's other entries: start_epoch=400, optimizer, scheduler, best_top1=0.0, scaler.",
    f"Wrote {out}",
  ):
    assert line in summary, summary

  model, params = export.load_backbone(out)
  assert model.num_heads == 12 and model.embed_dim == 48 and model.image_size == 32
  expected = {k: v for k, v in numpy_state(reference).items() if not k.startswith(("decoder_", "mask_"))}
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(params),
    convert.convert_state_dict(expected, num_heads=12).params["backbone"],
  )
  images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    ref_cls, ref_tokens = reference(images)
  cls, tokens = model.apply({"params": params}, jnp.asarray(images.permute(0, 2, 3, 1).numpy()))
  # Measured 2.5e-7 and 3.5e-7 (float32, 2026-12-03, the 2-core development CPU).
  assert relative_error(cls, ref_cls) < 1e-6 and relative_error(tokens, ref_tokens) < 1e-6

  pth = tmp_path / "encoder.pth"
  convert.main(["to-torch", str(out), str(pth)])
  encoder = TorchMaeEncoder(**TINY)
  encoder.load_state_dict(torch.load(pth), strict=True)  # What the official encoder loads.
  for key, value in encoder.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)


def test_mae_tiny_heads_come_from_the_config_or_the_checkpoints_model_name(tmp_path, capsys, monkeypatch):
  reference = random_mae(2, MAE_TINY, MAE_TINY_DECODER)
  state = reference.state_dict()
  assert convert.infer_vit_architecture(state)["num_heads"] == 3  # What the shapes would say: DeiT-Tiny's.
  monkeypatch.chdir(ROOT)  # --config takes a path, as main.py does.
  path = save(tmp_path, {"model": {"module.model." + k: v for k, v in state.items()}})
  convert.main(["from-torch", path, str(tmp_path / "config"), "--config", "configs/mae_tiny.py"])
  assert "heads 12 from --config configs/mae_tiny.py" in capsys.readouterr().out
  named = save(
    tmp_path, {"model": state, "args": argparse.Namespace(model="mae_vit_tiny_patch16")}, "named.pth"
  )
  convert.main(["from-torch", named, str(tmp_path / "named")])
  assert "heads 12 from the checkpoint's model name mae_vit_tiny_patch16" in capsys.readouterr().out
  for out in ("config", "named"):
    model, params = export.load_backbone(tmp_path / out)
    assert (model.embed_dim, model.depth, model.num_heads) == (192, 12, 12)
    np.testing.assert_array_equal(
      params["blocks_11"]["attn"]["qkv"]["kernel"], state["blocks.11.attn.qkv.weight"].numpy().T
    )


def test_heads_are_never_guessed(tmp_path):
  path, out, config = save(tmp_path, official_file(random_mae(3))), tmp_path / "out", tmp_path / "tiny.py"
  with pytest.raises(convert.ConversionError, match="cannot be read from the shapes .* pass --config"):
    convert.main(["from-torch", path, str(out)])
  named = save(
    tmp_path, official_file(random_mae(3), args=argparse.Namespace(model="mae_vit_tiny_patch16")), "n.pth"
  )
  with pytest.raises(
    convert.ConversionError, match=r"names its model mae_vit_tiny_patch16 \(192 wide\), its weights are 48"
  ):
    convert.main(["from-torch", named, str(out)])
  config.write_text(TINY_CONFIG)
  with pytest.raises(
    convert.ConversionError, match=r"'model' entry \(MAE\), not an EsViT or DINO pretraining checkpoint"
  ):
    convert.main(["from-torch", path, str(out), "--full", "--config", str(config)])
  assert not out.exists()


def test_fixed_tables_missing_and_unexpected_keys_are_reported_together():
  state = {"module.model." + k: v for k, v in numpy_state(random_mae(4)).items()}
  state["module.model.pos_embed"] = state["module.model.pos_embed"] + 1e-3
  state["module.model.fc_norm.weight"] = np.ones(48, np.float32)
  del state["module.model.decoder_norm.bias"]
  with pytest.raises(convert.ConversionError) as failure:
    convert.mae_params_from_state_dict(state, num_heads=12)
  assert sorted(failure.value.problems) == [
    "missing key decoder_norm.bias (32,)",
    "pos_embed differs from MAE's fixed 2-D sin-cos table by up to 0.001; ours keeps the table fixed.",
    "unexpected key fc_norm.weight (48,)",
  ]


def test_config_gives_the_heads_of_any_vit_and_is_refused_for_a_swin(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(TINY_CONFIG)
  encoder = randomize_(TorchMaeEncoder(**TINY), 5)  # A bare ViT state dict, 48 wide: not the head width 64.
  with pytest.raises(convert.ConversionError, match="head width 64"):
    convert.main(["from-torch", save(tmp_path, encoder.state_dict()), str(tmp_path / "default")])
  convert.main(
    ["from-torch", save(tmp_path, encoder.state_dict()), str(tmp_path / "vit"), "--config", str(config)]
  )
  assert export.load_backbone(tmp_path / "vit")[0].num_heads == 12
  with pytest.raises(convert.ConversionError, match="a Swin's are read from its relative position tables"):
    convert.main(
      [
        "from-torch",
        save(tmp_path, TorchSwin(**SMALL, window=7).state_dict()),
        str(tmp_path / "swin"),
        "--config",
        str(config),
      ]
    )


# ----------------------------------------------------------------------------------------------------
# --full: a pretraining workdir that main.py continues.


def test_epochs_are_counted_as_each_official_trainer_resumes():
  # MAE-Lite resumes at start_epoch; MAE saves the 0-based epoch just finished and resumes at epoch + 1.
  assert convert_mae.finished_epochs({"start_epoch": 400, "model": {}}) == 400
  assert convert_mae.finished_epochs({"epoch": 19, "model": {}}) == 20
  assert convert_mae.finished_epochs({"model": {}}) is None
  assert convert_mae.finished_epochs({"patch_embed.proj.weight": torch.zeros(1)}) is None


def test_full_mae_conversion_refuses_another_encoder_or_decoder_and_a_file_without_an_mae(
  tmp_path, monkeypatch
):
  monkeypatch.chdir(ROOT)  # --config takes a path, as main.py does.
  out = tmp_path / "workdir"
  other = random_mae(7, {**TEST_MAE, "depth": 1}, {**TEST_DECODER, "decoder_dim": 24, "decoder_depth": 2})
  with pytest.raises(convert.ConversionError) as failure:
    convert.main(
      ["from-torch", save(tmp_path, official_file(other)), str(out), "--full", "--config", TEST_CONFIG]
    )
  encoder, decoder = failure.value.problems
  assert "builds the encoder" in encoder and "'depth': 2" in encoder and "'depth': 1" in encoder
  assert decoder.startswith(
    f"--config {TEST_CONFIG} builds a decoder 16 wide with 1 blocks, the checkpoint's is 24 wide with 2"
  )
  encoder_only = save(tmp_path, randomize_(TorchMaeEncoder(**TEST_MAE), 8).state_dict(), "encoder.pth")
  with pytest.raises(convert.ConversionError, match="holds no MAE .* is an MAE config"):
    convert.main(["from-torch", encoder_only, str(out), "--full", "--config", TEST_CONFIG])
  assert not out.exists()


@pytest.mark.slow
def test_full_mae_conversion_writes_a_workdir_that_training_continues(tmp_path, capsys, monkeypatch):
  reference = random_mae(6, TEST_MAE, TEST_DECODER)
  path, workdir = save(tmp_path, official_file(reference, start_epoch=3)), tmp_path / "workdir"
  monkeypatch.chdir(ROOT)
  convert.main(
    ["from-torch", path, str(workdir), "--full", "--config", TEST_CONFIG, "--steps-per-epoch", "2"]
  )
  summary = capsys.readouterr().out
  for line in (
    f"heads 4 from --config {TEST_CONFIG}",
    "Converted the decoder (mask_token, decoder_*: 19 tensors",
    f"width 16, 1 blocks, heads 2 from --config {TEST_CONFIG}).",
    "Checked pos_embed and decoder_pos_embed against MAE's fixed sin-cos tables",
    f"Wrote {workdir}: step 6 = epoch 3 x 2 steps per epoch (batch 16).",
    "The file's optimizer state is torch's and is not converted",
    f"Continue with: python main.py --config {TEST_CONFIG} --workdir {workdir}",
  ):
    assert line in summary, summary
  written = json.loads((workdir / "config.json").read_text())
  assert written["method"] == "mae" and written["model"]["decoder_heads"] == 2

  config = tiny.get_config()
  mesh = sharding.make_mesh(jax.devices()[:1])
  abstract = mae_step.MaePretraining(config, mesh, steps_per_epoch=2).abstract_state
  state, meta = checkpointing.Checkpointer(workdir).restore_latest(abstract)
  assert int(state.step) == 6 and meta["input_position"] == 6
  params, expected = jax.device_get(state.params), numpy_state(reference)
  np.testing.assert_array_equal(
    params["encoder"]["patch_embed"]["proj"]["kernel"],
    expected["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    params["decoder_blocks_0"]["attn"]["qkv"]["kernel"], expected["decoder_blocks.0.attn.qkv.weight"].T
  )
  np.testing.assert_array_equal(params["mask_token"], expected["mask_token"])
  back = convert.mae_state_dict(params, image_size=32)  # Every tensor, through the tested inverse map.
  assert sorted(back) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  counts = {
    jax.tree_util.keystr(p): int(v)
    for p, v in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    if v.ndim == 0
  }
  adam = [name for name in counts if name.startswith("[0]")]  # optax.adamw: Adam, weight decay, lr.
  assert adam == ["[0].count"] and counts.pop("[0].count") == 0  # Adam restarts, as torch without its state;
  assert set(counts.values()) == {6}  # the lr and weight-decay schedules go on at step 6.

  config.total_steps = 8
  final = train.train_and_evaluate(config, str(workdir))
  assert sorted(losses(workdir)) == [7, 8] and int(final.step) == 8
