"""Swin backbone: constants against hand-written golden arrays, blocks against a numpy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from esvit_jax import models
from esvit_jax.models import swin

# ----------------------------------------------------------------------------------------------------
# Golden constants, written out by hand from the definitions of the official Swin.

# idx[i, j] = (dy + 1) * 3 + (dx + 1) for tokens (0,0), (0,1), (1,0), (1,1).
GOLDEN_INDEX_WS2 = [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
# idx[i, j] = (dy + 2) * 5 + (dx + 2) for the 9 tokens of a 3x3 window, row-major.
GOLDEN_INDEX_WS3 = [
  [12, 11, 10, 7, 6, 5, 2, 1, 0],
  [13, 12, 11, 8, 7, 6, 3, 2, 1],
  [14, 13, 12, 9, 8, 7, 4, 3, 2],
  [17, 16, 15, 12, 11, 10, 7, 6, 5],
  [18, 17, 16, 13, 12, 11, 8, 7, 6],
  [19, 18, 17, 14, 13, 12, 9, 8, 7],
  [22, 21, 20, 17, 16, 15, 12, 11, 10],
  [23, 22, 21, 18, 17, 16, 13, 12, 11],
  [24, 23, 22, 19, 18, 17, 14, 13, 12],
]
# Region ids per window (tokens row-major) of a 4x4 map, window 2, shift 1: the slices (0:-2), (-2:-1),
# (-1:) cut rows and columns into 3 bands each; id = 3 * row_band + col_band.
GOLDEN_REGIONS_WS2_SHIFT1 = [[0, 0, 0, 0], [1, 2, 1, 2], [3, 3, 6, 6], [4, 5, 7, 8]]
# A 5x5 map padded to 6x6, window 3, shift 1: bands rows 0-2, rows 3-4, row 5 (same for columns).
GOLDEN_REGIONS_WS3_SHIFT1 = [
  [0, 0, 0, 0, 0, 0, 0, 0, 0],
  [1, 1, 2, 1, 1, 2, 1, 1, 2],
  [3, 3, 3, 3, 3, 3, 6, 6, 6],
  [4, 4, 5, 4, 4, 5, 7, 7, 8],
]


def masks_from_regions(regions):
  regions = np.asarray(regions)
  return np.where(regions[:, :, None] == regions[:, None, :], 0.0, -100.0)


def test_relative_position_index_matches_golden():
  np.testing.assert_array_equal(swin.relative_position_index(2), GOLDEN_INDEX_WS2)
  np.testing.assert_array_equal(swin.relative_position_index(3), GOLDEN_INDEX_WS3)


@pytest.mark.parametrize("size", [4, 3])  # 3 is padded up to 4: the mask is built on the padded map.
def test_shift_mask_ws2_matches_golden(size):
  mask = swin.shifted_window_mask(size, size, window_size=2, shift=1)
  np.testing.assert_array_equal(mask, masks_from_regions(GOLDEN_REGIONS_WS2_SHIFT1))


def test_shift_mask_ws3_padded_matches_golden():
  mask = swin.shifted_window_mask(5, 5, window_size=3, shift=1)
  np.testing.assert_array_equal(mask, masks_from_regions(GOLDEN_REGIONS_WS3_SHIFT1))


def test_window_and_shift_schedule_follows_224_construction():
  # Only stages whose 224 resolution fits in one window lose their shift.
  w7 = swin.block_windows(224, 4, (2, 2, 6, 2), 7)
  assert w7[:3] == [[(7, 0), (7, 3)], [(7, 0), (7, 3)], [(7, 0), (7, 3)] * 3]
  assert w7[3] == [(7, 0), (7, 0)]
  w14 = swin.block_windows(224, 4, (2, 2, 6, 2), 14)
  assert w14[:2] == [[(14, 0), (14, 7)], [(14, 0), (14, 7)]]
  assert w14[2] == [(14, 0)] * 6 and w14[3] == [(7, 0), (7, 0)]


# ----------------------------------------------------------------------------------------------------
# A numpy reference of one block, written from the official block's maths (loops where the code uses einops).


def np_layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def np_dense(x, p):
  return x @ p["kernel"] + p.get("bias", 0.0)


def np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_window_attention(windows, p, ws, heads, mask):
  """windows: [nW, N, C] for one image; mask: [nW, N, N] or None."""
  n_windows, n, c = windows.shape
  d = c // heads
  qkv = np_dense(windows, p["qkv"]).reshape(n_windows, n, 3, heads, d)
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [nW, heads, N, d]
  attn = (q * d**-0.5) @ k.transpose(0, 1, 3, 2)
  bias = np.zeros((heads, n, n))
  for i in range(n):
    for j in range(n):
      dy, dx = i // ws - j // ws, i % ws - j % ws
      bias[:, i, j] = p["relative_position_bias_table"][(dy + ws - 1) * (2 * ws - 1) + dx + ws - 1]
  attn = attn + bias
  if mask is not None:
    attn = attn + mask[:, None]
  out = np_softmax(attn) @ v
  return np_dense(out.transpose(0, 2, 1, 3).reshape(n_windows, n, c), p["proj"])


def np_region_mask(hp, wp, ws, shift):
  def band(i, size):
    return 0 if i < size - ws else (1 if i < size - shift else 2)

  ids = np.array([[3 * band(r, hp) + band(c, wp) for c in range(wp)] for r in range(hp)])
  win = ids.reshape(hp // ws, ws, wp // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
  return np.where(win[:, :, None] == win[:, None, :], 0.0, -100.0)


def np_swin_block(x, p, ws, shift, heads):
  """x: [H, W, C] one image."""
  h, w, c = x.shape
  hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
  y = np.zeros((hp, wp, c))
  y[:h, :w] = np_layer_norm(x, p["norm1"])  # Zero padding after norm1; padded tokens not masked.
  if shift:
    y = np.roll(y, (-shift, -shift), axis=(0, 1))
  windows = y.reshape(hp // ws, ws, wp // ws, ws, c).transpose(0, 2, 1, 3, 4).reshape(-1, ws * ws, c)
  mask = np_region_mask(hp, wp, ws, shift) if shift else None
  windows = np_window_attention(windows, p["attn"], ws, heads, mask)
  y = windows.reshape(hp // ws, wp // ws, ws, ws, c).transpose(0, 2, 1, 3, 4).reshape(hp, wp, c)
  if shift:
    y = np.roll(y, (shift, shift), axis=(0, 1))
  x = x + y[:h, :w]
  hidden = np_gelu(np_dense(np_layer_norm(x, p["norm2"]), p["mlp"]["fc1"]))
  return x + np_dense(hidden, p["mlp"]["fc2"])


def randomize(params, key):
  """Random values everywhere (init zeros biases and ones LayerNorms, which would hide mistakes)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  noise = [0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
  return jax.tree.unflatten(tree, noise)


def to_numpy(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# Input std 1e-3 (variance 1e-6, the size of eps): LayerNorm's eps 1e-6 and 1e-5 then differ by 2x.
@pytest.mark.parametrize(
  "size,ws,shift,std", [(6, 4, 2, 1.0), (5, 4, 0, 1.0), (8, 4, 2, 1.0), (3, 7, 3, 1.0), (6, 4, 2, 1e-3)]
)
def test_swin_block_matches_numpy_reference(size, ws, shift, std):
  block = swin.SwinBlock(num_heads=2, window_size=ws, shift=shift)
  x = std * jax.random.normal(jax.random.key(0), (2, size, size, 8))
  params = randomize(block.init(jax.random.key(1), x)["params"], jax.random.key(2))
  out = block.apply({"params": params}, x)
  p = to_numpy(params)
  for b in range(2):
    ref = np_swin_block(np.asarray(x[b], np.float64), p, ws, shift, heads=2)
    np.testing.assert_allclose(out[b], ref, rtol=0, atol=1.5e-6)  # Measured 4.8e-7 on 2026-12-03 (CPU).


def test_window_attention_matches_numpy_reference():
  attn = swin.WindowAttention(dim=12, num_heads=3, window_size=3)
  windows = jax.random.normal(jax.random.key(0), (2, 4, 9, 12))
  mask = masks_from_regions(GOLDEN_REGIONS_WS3_SHIFT1).astype(np.float32)
  params = randomize(attn.init(jax.random.key(1), windows, mask)["params"], jax.random.key(2))
  out = attn.apply({"params": params}, windows, mask)
  for b in range(2):
    ref = np_window_attention(np.asarray(windows[b], np.float64), to_numpy(params), 3, 3, mask)
    np.testing.assert_allclose(out[b], ref, rtol=0, atol=1.5e-6)  # Measured 3.6e-7 on 2026-12-03 (CPU).


def test_patch_embedding_is_a_4x4_stride_4_convolution_then_layer_norm_with_eps_1e_6():
  """Each token is the dot product of one 4x4 patch (row-major pixels) with the kernel, plus the bias, then
  LayerNorm. The convolution is scaled down so that the tokens' variance over channels is a few 1e-6, the
  size of eps: eps 1e-5 instead of 1e-6 would change the output by about half."""
  embed = swin.PatchEmbed(embed_dim=8, patch_size=4)
  images = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  params = randomize(embed.init(jax.random.key(1), images)["params"], jax.random.key(2))
  params["proj"] = jax.tree.map(lambda a: 1e-3 * a, params["proj"])
  out = embed.apply({"params": params}, images)
  p = to_numpy(params)
  kernel = p["proj"]["kernel"].reshape(48, 8)  # [kh, kw, in, out]: pixel (i, j), channel c at (4i + j) 3 + c.
  x = np.asarray(images, np.float64)
  tokens = np.zeros((2, 3, 3, 8))
  for y in range(3):
    for x_ in range(3):
      patch = x[:, 4 * y : 4 * y + 4, 4 * x_ : 4 * x_ + 4].reshape(2, 48)
      tokens[:, y, x_] = patch @ kernel + p["proj"]["bias"]
  assert 1e-6 < tokens.var(-1).mean() < 1e-5
  # Measured 3.6e-7 on 2026-12-03 (CPU, float32); eps 1e-5 moves the output by 0.6, dropping the norm by 1.9.
  np.testing.assert_allclose(out, np_layer_norm(tokens, p["norm"]), rtol=0, atol=1e-6)


def test_mlp_uses_the_exact_erf_gelu():
  """Pre-activations spread over [-4, 4], where the tanh approximation is up to 5e-4 off the erf form."""
  mlp = swin.Mlp(hidden_dim=64)
  x = jax.random.normal(jax.random.key(0), (16, 8))
  params = randomize(mlp.init(jax.random.key(1), x)["params"], jax.random.key(2))
  out = mlp.apply({"params": params}, x)
  p = to_numpy(params)
  ref = np_dense(np_gelu(np_dense(np.asarray(x, np.float64), p["fc1"])), p["fc2"])
  # Measured 9.5e-7 on 2026-12-03 (CPU, float32); the tanh form moves the output by 7e-4.
  np.testing.assert_allclose(out, ref, rtol=0, atol=3e-6)


@pytest.mark.parametrize("size", [6, 5])
def test_patch_merging_order_and_odd_padding(size):
  merge = swin.PatchMerging()
  x = jax.random.normal(jax.random.key(0), (1, size, size, 4))
  params = randomize(merge.init(jax.random.key(1), x)["params"], jax.random.key(2))
  out = merge.apply({"params": params}, x)
  xp = np.zeros((6, 6, 4))
  xp[:size, :size] = np.asarray(x[0])
  x0, x1, x2, x3 = xp[0::2, 0::2], xp[1::2, 0::2], xp[0::2, 1::2], xp[1::2, 1::2]
  p = to_numpy(params)
  ref = np_dense(np_layer_norm(np.concatenate([x0, x1, x2, x3], -1), p["norm"]), p["reduction"])
  np.testing.assert_allclose(out[0], ref, rtol=0, atol=1e-6)  # Measured 2.4e-7 on 2026-12-03 (CPU).


# ----------------------------------------------------------------------------------------------------
# The whole backbone.

OFFICIAL_PARAM_COUNTS_M = {
  ("swin_tiny", 7): 27.52,
  ("swin_small", 7): 48.84,
  ("swin_base", 7): 86.74,
  ("swin_tiny", 14): 27.57,
  ("swin_small", 14): 48.97,
  ("swin_base", 14): 86.92,
}


def count_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,window", sorted(OFFICIAL_PARAM_COUNTS_M))
def test_variant_shapes_and_param_counts(name, window):
  model = models.build_backbone(name, window_size=window)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert round(count_params(variables["params"]) / 1e6, 2) == OFFICIAL_PARAM_COUNTS_M[(name, window)]
  dim = 1024 if name == "swin_base" else 768
  for size, tokens in ((224, 49), (96, 9)):
    pooled, regions = jax.eval_shape(model.apply, variables, jnp.zeros((2, size, size, 3)))
    assert pooled.shape == (2, dim) and regions.shape == (2, tokens, dim)
  probe = jax.eval_shape(
    lambda v, x: model.apply(v, x, 4, method="last_blocks"), variables, jnp.zeros((2, 224, 224, 3))
  )
  assert probe.shape == (2, 3072 if name == "swin_base" else 2304)


def test_swin_tiny_local_crop_forward_and_windows():
  model = models.build_backbone("swin_tiny")
  images = jax.random.normal(jax.random.key(1), (1, 96, 96, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  norm = randomize(variables["params"]["norm"], jax.random.key(3))
  variables = {"params": {**variables["params"], "norm": norm}}
  (pooled, regions), state = jax.jit(
    lambda v, x: model.apply(v, x, mutable="intermediates", capture_intermediates=True)
  )(variables, images)
  # The regions are the last block's 3x3 output, row-major, through the final LayerNorm; pooled their mean.
  last_block = np.asarray(state["intermediates"]["layers_3"]["blocks_1"]["__call__"][0], np.float64)
  expected = np_layer_norm(last_block.reshape(1, 9, 768), to_numpy(norm))
  np.testing.assert_allclose(regions, expected, rtol=0, atol=1e-6)  # Measured 2.4e-7 on 2026-12-03 (CPU).
  np.testing.assert_allclose(pooled, expected.mean(1), rtol=0, atol=5e-7)
  # 96px: stage 3 (6x6) is padded to one 7x7 window and keeps its shift; stage 1 (24 -> 28) has 16 windows.
  attn = state["intermediates"]["layers_2"]["blocks_1"]["attn"]["attention"][0]
  assert attn.shape == (1, 1, 12, 49, 49)
  assert state["intermediates"]["layers_0"]["blocks_0"]["attn"]["attention"][0].shape == (1, 16, 3, 49, 49)


TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, image_size=32)


def test_last_blocks_pools_blocks_and_norms_last_stage():
  model = models.build_backbone("swin_tiny", **TINY)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  last_blocks = jax.jit(lambda v, x, n: model.apply(v, x, n, method="last_blocks"), static_argnums=2)
  pooled, _ = jax.jit(model.apply)(variables, images)
  np.testing.assert_allclose(last_blocks(variables, images, 1), pooled, rtol=1e-5, atol=1e-6)
  three = last_blocks(variables, images, 3)
  assert three.shape == (2, 16 + 32 + 32)
  _, state = jax.jit(lambda v, x: model.apply(v, x, mutable="intermediates", capture_intermediates=True))(
    variables, images
  )
  stage0_last = state["intermediates"]["layers_0"]["blocks_1"]["__call__"][0]
  np.testing.assert_allclose(three[:, :16], stage0_last.mean((1, 2)), rtol=1e-5, atol=1e-6)


def test_drop_path_is_linear_per_block_and_student_only():
  model = models.build_backbone("swin_tiny", **{**TINY, "depths": (2, 3)}, drop_path_rate=0.4)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  bound = model.bind(variables)
  rates = [r for stage in bound.layers for r in stage.drop_path_rates]
  np.testing.assert_allclose(rates, np.linspace(0, 0.4, 5))
  apply = jax.jit(model.apply, static_argnames="train")
  teacher_1, _ = apply(variables, images, train=False)
  teacher_2, _ = apply(variables, images, train=False)
  student, _ = apply(variables, images, train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(teacher_1, teacher_2)
  assert not np.allclose(student, teacher_1)


def test_drop_path_drops_whole_samples_and_keeps_expectation():
  x = jnp.ones((20000, 3, 2))
  y = swin.DropPath(0.25).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y[:, 0, 0] != 0)
  assert np.all((y == 0).all(axis=(1, 2)) | np.isclose(y, 1 / 0.75).all(axis=(1, 2)))
  assert abs(kept.mean() - 0.75) < 0.01 and abs(float(y.mean()) - 1.0) < 0.02


LINEARS = {"attn": ("qkv", "proj"), "mlp": ("fc1", "fc2")}


def test_official_initialisation():
  model = models.build_backbone("swin_tiny", **TINY)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  block = params["layers_1"]["blocks_0"]
  assert abs(float(jnp.std(block["mlp"]["fc1"]["kernel"])) - 0.02) < 0.002
  assert abs(float(jnp.std(block["attn"]["relative_position_bias_table"])) - 0.02) < 0.006
  np.testing.assert_array_equal(block["mlp"]["fc1"]["bias"], 0)
  np.testing.assert_array_equal(block["norm1"]["scale"], 1)
  # torch's trunc_normal_(std=0.02) cuts at +-2 absolute (100 std), so 4.55% of the weights lie beyond
  # 2 std (none would with a cut at +-2 std); 12,288 weights: the fraction's std is 0.2%.
  kernels = np.concatenate([np.ravel(block[m][n]["kernel"]) for m, ns in LINEARS.items() for n in ns])
  assert abs(np.mean(np.abs(kernels) > 0.04) - 0.0455) < 0.01 and np.abs(kernels).max() < 2
  conv = params["patch_embed"]["proj"]
  bound = 1 / np.sqrt(3 * 4 * 4)
  for leaf in (conv["kernel"], conv["bias"]):
    assert float(jnp.abs(leaf).max()) <= bound and float(jnp.abs(leaf).max()) > 0.8 * bound


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jit_finite_and_compiles_once_per_resolution(dtype):
  model = models.build_backbone("swin_tiny", **TINY, dtype=dtype)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=2)  # One trace per crop resolution, none after.
  def forward(variables, images):
    return model.apply(variables, images)

  for _ in range(2):
    for size in (32, 16):
      pooled, regions = forward(variables, jax.random.normal(jax.random.key(1), (2, size, size, 3)))
      assert pooled.dtype == jnp.float32 and np.all(np.isfinite(regions))


def test_rejects_non_square_and_unknown_names():
  model = models.build_backbone("swin_tiny", **TINY)
  with pytest.raises(ValueError, match="square"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 16, 3)))
  with pytest.raises(ValueError, match="swin_tiny"):
    models.build_backbone("swin_huge")
