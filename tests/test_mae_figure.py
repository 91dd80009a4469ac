"""MAE's reconstruction figure: the panels against a pixel mask drawn patch by patch, the un-normalisation
against a decoder that predicts the true patches, and the CLI on MAE and EsViT workdirs."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from esvit_jax import checkpointing, errors, losses, mae_figure, mae_step, sharding, train_step, visualize
from esvit_jax.data.normalize import normalize_images
from esvit_jax.models import mae
from tests.configs import mae_tiny, tiny

CONFIG = mae_tiny.get_config()  # 32 px crops of 4 px patches: 8 x 8 patches, 16 of them visible.
SIDE, PATCH, GRID = 32, 4, 8


@pytest.fixture(scope="module")
def tiny_mae():
  model = mae_step.build_model(CONFIG)
  ids = jnp.arange(GRID * GRID, dtype=jnp.int32)[None]
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3)), ids)["params"]
  return model, params


def random_images(count: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, SIDE, SIDE, 3), np.uint8)


def pixel_mask(mask: np.ndarray) -> np.ndarray:
  """bool [B, S, S, 1]: True on the pixels of each masked patch (patch k at row k // 8, column k % 8)."""
  pixels = np.zeros((len(mask), SIDE, SIDE, 1), bool)
  for b, k in zip(*np.nonzero(mask), strict=True):
    row, col = divmod(int(k), GRID)
    pixels[b, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = True
  return pixels


def test_panels_show_the_seeded_mask_and_keep_the_visible_patches(tiny_mae):
  model, params = tiny_mae
  images = random_images(3, seed=0)
  out = mae_figure.reconstruct(model, params, images, seed=1, norm_pix=True)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
    "masked": ((3, SIDE, SIDE, 3), np.uint8),
    "reconstruction": ((3, SIDE, SIDE, 3), np.uint8),
    "pasted": ((3, SIDE, SIDE, 3), np.uint8),
    "mask": ((3, GRID * GRID), bool),
  }
  # Image i's mask is the training masks' function of (key(seed), position i): 48 of the 64 patches.
  ids = mae.random_ids_shuffle(jax.random.key(1), jnp.arange(3), GRID * GRID)
  np.testing.assert_array_equal(out["mask"], np.asarray(mae.patch_mask(ids, 16)) == 1)
  np.testing.assert_array_equal(out["mask"].sum(axis=1), 48)
  masked = pixel_mask(out["mask"])
  np.testing.assert_array_equal(out["masked"], np.where(masked, [124, 116, 104], images))
  np.testing.assert_array_equal(out["pasted"], np.where(masked, out["reconstruction"], images))
  # An untrained decoder predicts something else than the hidden pixels.
  hidden = np.broadcast_to(masked, images.shape)
  assert np.abs(out["reconstruction"][hidden].astype(int) - images[hidden]).mean() > 20
  again = mae_figure.reconstruct(model, params, images, seed=1)
  np.testing.assert_array_equal(again["pasted"], out["pasted"])
  assert not np.array_equal(mae_figure.reconstruct(model, params, images, seed=2)["mask"], out["mask"])


def test_the_mask_colour_is_a_normalised_zero():
  np.testing.assert_allclose(normalize_images(mae_figure.MASK_COLOUR), 0, atol=0.5 / 255 / 0.224)


def test_figure_rows_hold_the_four_panels_of_each_image():
  images = random_images(2, seed=3)
  names = ("masked", "reconstruction", "pasted")
  panels = {name: random_images(2, seed=10 + k) for k, name in enumerate(names)}
  figure = mae_figure.reconstruction_figure(images, panels)
  assert figure.shape == (2 * (SIDE + 2) - 2, 4 * (SIDE + 2) - 2, 3)
  for row in range(2):
    for column, panel in enumerate((images, *(panels[name] for name in names))):
      top, left = row * (SIDE + 2), column * (SIDE + 2)
      np.testing.assert_array_equal(figure[top : top + SIDE, left : left + SIDE], panel[row])
  assert np.all(figure[SIDE : SIDE + 2] == 255) and np.all(figure[:, SIDE : SIDE + 2] == 255)


class PerfectDecoder(mae.MaskedAutoencoder):
  """Predicts every patch's true pixels: normalised per patch with norm_pix, as the loss's targets are."""

  norm_pix: bool = True

  def __call__(self, images, ids_shuffle, train=False):
    target = losses.patchify(images, self.encoder.patch_size)
    pred = losses.normalized_pixels(target) if self.norm_pix else target
    return pred, mae.patch_mask(ids_shuffle, mae.num_kept(ids_shuffle.shape[1], self.mask_ratio))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_a_decoder_predicting_the_true_patches_reconstructs_the_input(tiny_mae, norm_pix):
  images = random_images(2, seed=4)
  images[0, :8, :8] = 77  # Flat patches: zero variance.
  images[1] = images[1] // 16 + 120  # Low contrast.
  perfect = PerfectDecoder(tiny_mae[0].encoder, norm_pix=norm_pix)
  out = mae_figure.reconstruct(perfect, {}, images, norm_pix=norm_pix)
  # Measured: exact (the float error is about 1e-4 levels, far from a rounding boundary).
  np.testing.assert_array_equal(out["reconstruction"], images)
  np.testing.assert_array_equal(out["pasted"], images)
  if norm_pix:  # Without the true patch's mean and std back, the prediction is far off.
    wrong = mae_figure.reconstruct(perfect, {}, images, norm_pix=False)["reconstruction"]
    assert np.abs(wrong.astype(int) - images).mean() > 20  # Measured: 31.7 levels.


def save_workdir(path, config, state):
  """What the loop writes that a figure reads: config.json and a checkpoint of the whole state at step 2."""
  checkpointer = checkpointing.Checkpointer(path)
  checkpointer.save(2, state, {"input_position": 2, "config": config.to_json_best_effort()}, force=True)
  checkpointer.wait()
  checkpointer.close()
  (path / "config.json").write_text(config.to_json_best_effort(indent=2))


@pytest.fixture(scope="module")
def mae_workdir(tmp_path_factory):
  """An MAE workdir as the loop writes it, with no train step compiled (test_mae_train.py runs the loop)."""
  path = tmp_path_factory.mktemp("mae")
  pretraining = mae_step.MaePretraining(CONFIG, sharding.make_mesh(jax.devices()[:1]), steps_per_epoch=4)
  state = pretraining.create_state(jax.random.PRNGKey(1))
  save_workdir(path, CONFIG, state)
  return path, jax.device_get(state.params)


@pytest.fixture(scope="module")
def esvit_workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("esvit")
  config = tiny.get_config()
  mesh = sharding.make_mesh(jax.devices()[:1])
  save_workdir(
    path, config, train_step.create_train_state(config, mesh, jax.random.PRNGKey(0), steps_per_epoch=4)
  )
  return path


def test_load_mae_reads_the_whole_autoencoder_of_the_latest_checkpoint(mae_workdir, esvit_workdir, tmp_path):
  path, params = mae_workdir
  model, loaded, config = mae_figure.load_mae(path)
  assert model == mae_step.build_model(CONFIG) and config.norm_pix_loss and config.crop_size == SIDE
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)
  assert mae_figure.is_mae_workdir(path) and not mae_figure.is_mae_workdir(esvit_workdir)
  with pytest.raises(errors.UserError, match="'esvit' run"):
    mae_figure.load_mae(esvit_workdir)
  (tmp_path / "config.json").write_text(CONFIG.to_json_best_effort())
  with pytest.raises(errors.NotFoundError, match="no checkpoint"):
    mae_figure.load_mae(tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_cli_on_an_mae_workdir_writes_the_reconstruction_figure(mae_workdir, tmp_path, capsys):
  path, _ = mae_workdir
  photo = np.random.default_rng(5).integers(0, 256, (40, 60, 3), np.uint8)
  Image.fromarray(photo).save(tmp_path / "photo.png")
  out = tmp_path / "vis"
  visualize.main(["--pretrained", str(path), "--image", str(tmp_path / "photo.png"), "--out", str(out)])
  assert "reconstruction.png" in capsys.readouterr().out
  assert [p.name for p in out.iterdir()] == ["reconstruction.png"]
  image = visualize.load_image(tmp_path / "photo.png", SIDE)[None]
  model, params, _ = mae_figure.load_mae(path)
  expected = mae_figure.reconstruction_figure(image, mae_figure.reconstruct(model, params, image, seed=0))
  with Image.open(out / "reconstruction.png") as png:
    np.testing.assert_array_equal(np.asarray(png), expected)


def test_cli_on_an_esvit_workdir_keeps_the_attention_figures(esvit_workdir, tmp_path, capsys):
  Image.fromarray(random_images(1, seed=6)[0]).save(tmp_path / "photo.png")
  out = tmp_path / "vis"
  photo = str(tmp_path / "photo.png")
  visualize.main(["--pretrained", str(esvit_workdir), "--image", photo, "--out", str(out)])
  assert "most similar region pairs" in capsys.readouterr().out
  names = {p.name for p in out.iterdir()}
  assert {"image.png", "attention_heads.png", "correspondence.png"} <= names
  assert "reconstruction.png" not in names
