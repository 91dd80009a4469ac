"""Visualisation: window layout and thresholding against hand-derived goldens, matching against brute force,
and the CLI's PNGs on a tiny exported model."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from esvit_jax import export, visualize
from esvit_jax.models import build_backbone

# A 4x4 map, window 2, shift 1: after rolling by -1, rolled position (r, c) holds token ((r+1)%4, (c+1)%4).
GOLDEN_POSITIONS_4_2_1 = [[5, 6, 9, 10], [7, 4, 11, 8], [13, 14, 1, 2], [15, 12, 3, 0]]
# A 3x3 map padded to 4x4, window 2, no shift: padding (-1) fills the last row and column.
GOLDEN_POSITIONS_3_2_0 = [[0, 1, 3, 4], [2, -1, 5, -1], [6, 7, -1, -1], [8, -1, -1, -1]]


def test_window_token_positions_match_golden():
  np.testing.assert_array_equal(visualize.window_token_positions(4, 2, 1), GOLDEN_POSITIONS_4_2_1)
  np.testing.assert_array_equal(visualize.window_token_positions(3, 2, 0), GOLDEN_POSITIONS_3_2_0)


def test_token_attention_places_windows_and_drops_padding():
  rng = np.random.default_rng(0)
  attention = rng.random((4, 2, 4, 4)).astype(np.float32)  # [windows, heads, n, n]
  full = visualize.token_attention(attention, grid=3, window=2, shift=0)
  assert full.shape == (2, 9, 9)
  # Window 1 holds tokens 2 and 5 at window slots 0 and 2 (GOLDEN_POSITIONS_3_2_0).
  assert full[1, 5, 2] == attention[1, 1, 2, 0] and full[0, 2, 5] == attention[1, 0, 0, 2]
  assert full[0, 0, 2] == 0  # Tokens 0 and 2 share no window.
  assert np.count_nonzero(full) == 2 * (16 + 4 + 4 + 1)  # Valid token pairs of each window, per head.


def test_mass_mask_keeps_the_fewest_tokens_holding_the_threshold():
  maps = np.array([[[0.05, 0.5], [0.15, 0.3]], [[0.7, 0.1], [0.1, 0.1]]])
  np.testing.assert_array_equal(visualize.mass_mask(maps, 0.6), [[[0, 1], [0, 1]], [[1, 0], [0, 0]]])


def test_match_regions_is_the_cosine_argmax_ranked_by_similarity():
  rng = np.random.default_rng(1)
  f1, f2 = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
  pairs, similarity = visualize.match_regions(f1, f2, top_k=4)
  cosine = [[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in f2] for a in f1]
  best = [(max(row), i, int(np.argmax(row))) for i, row in enumerate(cosine)]
  expected = sorted(best, reverse=True)[:4]
  np.testing.assert_array_equal(pairs, [[i, j] for _, i, j in expected])
  np.testing.assert_allclose(similarity, [s for s, _, _ in expected], rtol=1e-12)


def test_mirrored_fraction_and_drawn_lines():
  found = visualize.Correspondences(
    pairs=np.array([[0, 2], [4, 4], [5, 3], [6, 6]]), similarity=np.ones(4), grid=3
  )
  assert (
    found.mirrored_fraction() == 0.75
  )  # (0,0)->(0,2), (1,1)->(1,1), (1,2)->(1,0) mirror; (2,0)->(2,0) not.
  view = np.zeros((30, 30, 3), np.uint8)
  drawn = visualize.draw_correspondences(
    view, view, visualize.Correspondences(np.array([[3, 3]]), np.ones(1), 3)
  )
  assert drawn.shape == (30, 65, 3)
  # Token 3 is the centre of row 1, column 0: (5, 15) in view 1 and (35 + 5, 15) in view 2.
  np.testing.assert_array_equal(drawn[15, 22], visualize.LINE_COLOUR)
  np.testing.assert_array_equal(drawn[2, 22], 0)
  assert np.all(drawn[:10, 30:35] == 255)  # The white margin between the views.


def test_augmented_view_is_flipped_grayscale_and_load_image_centre_crops(tmp_path):
  image = np.zeros((40, 40, 3), np.uint8)
  image[:, :10] = 200  # A bright band on the left moves to the right.
  view = visualize.augmented_view(image, seed=3)
  assert view.shape == image.shape and np.all(view[..., 0] == view[..., 1])
  assert view[:, 30:].mean() > view[:, :30].mean() + 50
  wide = np.zeros((50, 100, 3), np.uint8)
  wide[:, 10:90] = 255  # Covers the central square of a 2:1 image with room for bicubic's support.
  Image.fromarray(wide).save(tmp_path / "wide.png")
  loaded = visualize.load_image(tmp_path / "wide.png", 20)
  assert loaded.shape == (20, 20, 3) and loaded.min() >= 250


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  """64px model: the last block sees an 8x8 map in four 4x4 windows shifted by 2."""
  model = build_backbone(
    "swin_tiny", embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, image_size=64
  )
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  path = tmp_path_factory.mktemp("tiny") / "export"
  export.save_backbone(path, model, params)
  return path


def assert_support(maps, rows, cols):
  inside = np.zeros(maps.shape[1:], bool)
  inside[rows, cols] = True
  assert np.all(maps[:, inside] > 1e-6) and np.all(maps[:, ~inside] < 1e-30)


def test_attention_maps_are_softmax_rows_inside_the_query_window(tiny_export):
  model, params = export.load_backbone(tiny_export)
  image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  maps = visualize.attention_maps(model, params, image)
  assert maps.shape == (4, 8, 8)
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1, rtol=1e-5)  # No padding: the whole softmax row.
  # Rolled by -2, the centre token (4, 4) lies in the window of rows and columns 2..5, one shift region.
  assert_support(maps, rows=slice(2, 6), cols=slice(2, 6))
  # Token (4, 0) shares its rolled window with columns 6, 7 of another shift region: masked (-100) away.
  assert_support(visualize.attention_maps(model, params, image, query=32), rows=slice(2, 6), cols=slice(0, 2))
  mean = visualize.attention_maps(model, params, image, query="mean")
  np.testing.assert_allclose(mean.sum(axis=(1, 2)), 1, rtol=1e-5)
  with pytest.raises(ValueError, match="token index"):
    visualize.attention_maps(model, params, image, query=64)


def test_cli_writes_pngs_of_the_expected_size(tiny_export, tmp_path, capsys):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 80, 3), np.uint8)).save(tmp_path / "photo.jpg")
  out = tmp_path / "vis"
  visualize.main(
    [
      "--pretrained",
      str(tiny_export),
      "--image",
      str(tmp_path / "photo.jpg"),
      "--out",
      str(out),
      "--top-k",
      "5",
    ]
  )
  assert "Wrote 7 PNGs" in capsys.readouterr().out
  sizes = {
    "image.png": (64, 64),
    "attention_heads.png": (4 * 64 + 3 * 2, 64),
    "correspondence.png": (133, 64),
    **{f"attention_head{h:02d}.png": (64, 64) for h in range(4)},
  }
  assert sorted(p.name for p in out.iterdir()) == sorted(sizes)
  for name, size in sizes.items():
    with Image.open(out / name) as png:
      assert png.size == size and png.mode == "RGB"
      assert np.asarray(png).std() > 5  # Not a blank canvas.


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
  """A 2-block ViT with 3 heads and patch 8 on 32 px: a 4x4 patch grid."""
  model = build_backbone("vit_tiny", embed_dim=24, depth=2, num_heads=3, patch_size=8, image_size=32)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  path = tmp_path_factory.mktemp("vit") / "export"
  export.save_backbone(path, model, params)
  return path


def test_vit_attention_is_the_cls_row_over_the_patches(vit_export):
  model, params = export.load_backbone(vit_export)
  image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8)
  maps = visualize.attention_maps(model, params, image)
  assert maps.shape == (3, 4, 4)
  _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable="intermediates"))(
    params, jnp.asarray(visualize.normalize_images(image[None]))
  )
  attention = np.asarray(state["intermediates"]["blocks_1"]["attn"]["attention"][0][0])  # [heads, 17, 17]
  np.testing.assert_array_equal(maps, attention[:, 0, 1:].reshape(3, 4, 4))
  np.testing.assert_allclose(maps.sum(axis=(1, 2)) + attention[:, 0, 0], 1, rtol=1e-5)  # The CLS row.
  centre = visualize.attention_maps(model, params, image, query="center")
  np.testing.assert_array_equal(centre, attention[:, 1 + 10, 1:].reshape(3, 4, 4))  # Token (2, 2).
  swin = build_backbone("swin_tiny", embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, image_size=32)
  swin_params = jax.jit(swin.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  with pytest.raises(ValueError, match="no CLS token"):
    visualize.attention_maps(swin, swin_params, image, query="cls")


def test_cli_on_a_vit_writes_one_panel_per_head_and_correspondences(vit_export, tmp_path, capsys):
  photo = np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)
  Image.fromarray(photo).save(tmp_path / "photo.png")
  out = tmp_path / "vis"
  visualize.main(["--pretrained", str(vit_export), "--image", str(tmp_path / "photo.png"), "--out", str(out)])
  assert "Wrote 6 PNGs" in capsys.readouterr().out
  assert sorted(p.name for p in out.iterdir()) == sorted(
    [
      "image.png",
      "attention_heads.png",
      "correspondence.png",
      *(f"attention_head{h:02d}.png" for h in range(3)),
    ]
  )
  with Image.open(out / "correspondence.png") as png:
    assert png.size == (2 * 32 + 5, 32)
