"""MAE and D-MAE at the model level: parameter counts, masking, the fixed sin-cos tables, the reconstruction
and attention losses, the official initialisation, and an independent PyTorch MAE (timm-style blocks,
MAE's forward_encoder / forward_decoder / forward_loss with a given ids_shuffle) on the same weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from esvit_jax import losses, mae_step, sharding
from esvit_jax.configs import mae_tiny, mae_tiny_distill
from esvit_jax.models import mae, vit
from tests.configs import mae_tiny as mae_tiny_test_config
from tests.test_convert import relative_error
from tests.test_vit import TorchBlock

# A small MAE for the comparisons: 16 patches of 8 px (4 visible), 4 heads of 12, a 2-head decoder.
SMALL = dict(embed_dim=48, depth=2, num_heads=4, patch_size=8, image_size=32)
SMALL_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def float32_config(module):
  config = module.get_config()
  config.compute_dtype = "float32"
  return config


def num_values(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def leaf_names(tree):
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def small_mae(**fields):
  encoder = vit.VisionTransformer(**SMALL, drop_path_rate=0.0, weight_init="xavier", fixed_pos_embed=True)
  return mae.MaskedAutoencoder(encoder, **{**SMALL_DECODER, **fields})


def ids_of_permutations(seed, batch, num_patches):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.stack([rng.permutation(num_patches) for _ in range(batch)]).astype(np.int32))


def randomized(params, seed):
  """Every leaf redrawn at unit scale (kernels 1 / sqrt(fan_in)): zero biases and unit norms hide layouts."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    noise = rng.standard_normal(leaf.shape)
    name = path[-1].key
    if name == "kernel":
      noise = noise / math.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "scale":
      noise = 1 + 0.3 * noise
    elif name == "bias":
      noise = 0.3 * noise
    out.append(jnp.asarray(noise, jnp.float32))
  return jax.tree_util.tree_unflatten(tree, out)


# ----------------------------------------------------------------------------------------------------
# Parameter counts.


def test_mae_tiny_parameter_counts_and_fixed_tables_outside_params():
  def init_shapes(config):
    model = mae_step.build_model(config)
    images, ids = jnp.zeros((1, 224, 224, 3)), jnp.arange(196, dtype=jnp.int32)[None]
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images, ids)["params"]

  params = init_shapes(float32_config(mae_tiny))
  assert num_values(params["encoder"]) == 5_486_592
  assert num_values({k: v for k, v in params.items() if k != "encoder"}) == 205_152
  # The fixed tables are constants of the computation: 197 x 192 and 197 x 96 values, no leaf.
  assert vit.sincos_pos_embed(192, 14).size == 37_824 and vit.sincos_pos_embed(96, 14).size == 18_912
  assert not [name for name in leaf_names(params) if "pos_embed" in name]
  distill = init_shapes(float32_config(mae_tiny_distill))
  extra = {k: v.shape for k, v in distill.items() if k not in params}
  assert extra == {"attn_adapter11": (12, 12)}
  assert num_values(distill) - num_values(params) == 144


# ----------------------------------------------------------------------------------------------------
# Masking.


def mae_mask(ids_shuffle, keep):
  """MAE's random_masking: ones, the first `keep` zeroed, gathered by ids_restore = argsort(ids_shuffle)."""
  mask = np.ones(ids_shuffle.shape, np.float32)
  mask[:, :keep] = 0
  return np.take_along_axis(mask, np.argsort(ids_shuffle, axis=1), axis=1)


def test_masking_keeps_49_of_196_patches_per_image_and_masks_differ():
  ids = np.asarray(mae.random_ids_shuffle(jax.random.key(3), jnp.arange(8, dtype=jnp.int32), 196))
  keep = mae.num_kept(196, 0.75)
  assert keep == 49 and ids.dtype == np.int32
  np.testing.assert_array_equal(np.sort(ids, axis=1), np.broadcast_to(np.arange(196), ids.shape))
  mask = np.asarray(mae.patch_mask(jnp.asarray(ids), keep))
  np.testing.assert_array_equal(mask.sum(axis=1), np.full(8, 147.0))
  np.testing.assert_array_equal(np.take_along_axis(mask, ids[:, :49], axis=1), 0.0)
  np.testing.assert_array_equal(np.take_along_axis(mask, ids[:, 49:], axis=1), 1.0)
  np.testing.assert_array_equal(mask, mae_mask(ids, keep))
  assert len({m.tobytes() for m in mask}) == 8


def test_masks_depend_on_the_position_only_and_sharded_equals_one_device():
  key = jax.random.key(7)
  positions = jnp.arange(16, 24, dtype=jnp.int32)
  single = np.asarray(mae.random_ids_shuffle(key, positions, 196))
  # The same positions in another order and another batch: the same rankings.
  order = np.array([5, 2, 7])
  np.testing.assert_array_equal(mae.random_ids_shuffle(key, positions[order], 196), single[order])
  assert not np.array_equal(mae.random_ids_shuffle(key, positions + 8, 196), single)
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  placed = jax.device_put(positions, sharding.batch_sharding(mesh))
  jitted = jax.jit(mae.random_ids_shuffle, static_argnums=2)(key, placed, 196)
  assert len(jitted.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(jitted), single)


# ----------------------------------------------------------------------------------------------------
# Fixed sin-cos tables.


def sincos_reference(dim, grid):
  """MAE's get_2d_sincos_pos_embed, written per token: with q = dim / 4 and w_j = 10000^(-j / q), the patch
  at (row r, column c) has sin(c w_j), cos(c w_j), sin(r w_j), cos(r w_j) in channel blocks of q; CLS: 0."""
  quarter = dim // 4
  omega = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)
  table = np.zeros((1 + grid * grid, dim))
  for r in range(grid):
    for c in range(grid):
      table[1 + r * grid + c] = np.concatenate(
        [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]
      )
  return table


def test_sincos_tables_equal_maes_formula():
  for dim, grid in ((192, 14), (96, 14), (48, 4), (32, 7)):
    table = vit.sincos_pos_embed(dim, grid)
    assert table.shape == (1 + grid * grid, dim) and table.dtype == np.float32
    np.testing.assert_allclose(table, sincos_reference(dim, grid), rtol=0, atol=1e-6)
  table = vit.sincos_pos_embed(192, 14)
  np.testing.assert_array_equal(table[0], 0.0)
  # Token (row 0, column 1): hand values of sin(1), sin(10000^(-1/48)), sin(0).
  np.testing.assert_allclose(table[2, [0, 1, 96]], [0.841471, 0.734822, 0.0], atol=1e-6)
  # The first half of the channels encodes the column, the second the row.
  grid = table[1:].reshape(14, 14, 192)
  np.testing.assert_array_equal(grid[:, :, :96], np.broadcast_to(grid[:1, :, :96], (14, 14, 96)))
  np.testing.assert_array_equal(grid[:, :, 96:], np.broadcast_to(grid[:, :1, 96:], (14, 14, 96)))


# ----------------------------------------------------------------------------------------------------
# Reconstruction loss.


def test_loss_with_zero_prediction_is_767_768_var_over_var_plus_eps_on_masked_patches():
  rng = np.random.default_rng(0)
  # 2 images of 2 x 2 patches of 16 px (P = 768), each patch of its own std near 3e-3 (variance ~1e-5):
  # there a biased variance or another eps changes the loss well beyond float32 rounding.
  stds = rng.uniform(2e-3, 4.5e-3, (2, 2, 2))
  images = 0.3 + rng.standard_normal((2, 32, 32, 3)) * np.kron(stds, np.ones((16, 16)))[..., None]
  mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], np.float32)
  per_patch, per_patch_biased = np.zeros((2, 4)), np.zeros((2, 4))
  for b in range(2):
    for i in range(2):
      for j in range(2):
        pixels = images[b, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16].reshape(-1)
        var, var_biased = pixels.var(ddof=1), pixels.var()
        per_patch[b, 2 * i + j] = 767 / 768 * var / (var + 1e-6)
        per_patch_biased[b, 2 * i + j] = var_biased / (var_biased + 1e-6)
  expected = (per_patch * mask).sum() / mask.sum()
  images32 = jnp.asarray(images, jnp.float32)
  loss = losses.reconstruction_loss(jnp.zeros((2, 4, 768)), images32, jnp.asarray(mask), 16)
  np.testing.assert_allclose(float(loss), expected, rtol=5e-7)  # 1.2e-7 measured.
  # What the check tells apart: a biased variance, and the mean of per-image means.
  assert abs((per_patch_biased * mask).sum() / mask.sum() - expected) > 1e-4 * expected
  assert abs((per_patch * mask).sum(1) / mask.sum(1) - expected).mean() > 1e-3
  # Only the masked patches count.
  pred = np.zeros((2, 4, 768), np.float32)
  pred[0, 1] = pred[1, 3] = 5.0
  same = losses.reconstruction_loss(jnp.asarray(pred), images32, jnp.asarray(mask), 16)
  assert float(same) == float(loss)
  pred[1, 2] = 5.0
  assert float(losses.reconstruction_loss(jnp.asarray(pred), images32, jnp.asarray(mask), 16)) > 5.0


# ----------------------------------------------------------------------------------------------------
# The reference: MAE in PyTorch (timm pre-norm blocks, qkv bias, LayerNorm eps 1e-6, exact GELU).


class TorchMae(nn.Module):
  """MAE's MaskedAutoencoderViT with its forward_encoder / forward_decoder / forward_loss, masking with a
  given ids_shuffle (as MAE-Lite's forward accepts)."""

  def __init__(
    self, embed_dim, depth, num_heads, patch_size, image_size, decoder_dim, decoder_depth, decoder_heads
  ):
    super().__init__()
    self.patch = patch_size
    grid = image_size // patch_size
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    table = torch.tensor(sincos_reference(embed_dim, grid), dtype=torch.float32)[None]
    self.pos_embed = nn.Parameter(table, requires_grad=False)
    self.blocks = nn.ModuleList([TorchBlock(embed_dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
    table = torch.tensor(sincos_reference(decoder_dim, grid), dtype=torch.float32)[None]
    self.decoder_pos_embed = nn.Parameter(table, requires_grad=False)
    self.decoder_blocks = nn.ModuleList(
      [TorchBlock(decoder_dim, decoder_heads) for _ in range(decoder_depth)]
    )
    self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * 3)

  def patchify(self, imgs):
    p = self.patch
    h = w = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * 3)

  def random_masking(self, x, mask_ratio, ids_shuffle):
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_masked = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

  def forward_encoder(self, imgs, mask_ratio, ids_shuffle):
    x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
    x, mask, ids_restore = self.random_masking(x, mask_ratio, ids_shuffle)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
    for block in self.decoder_blocks:
      x = block(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  def forward_loss(self, imgs, pred, mask, norm_pix_loss):
    target = self.patchify(imgs)
    if norm_pix_loss:
      mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def forward(self, imgs, ids_shuffle, mask_ratio=0.75, norm_pix_loss=True):
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, ids_shuffle)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(imgs, pred, mask, norm_pix_loss), pred, mask


def torch_state_dict(params):
  """Our MAE params under the official names: 'encoder/' dropped, blocks_i -> blocks.i, Dense kernels
  [in, out] -> weight [out, in], the patch kernel HWIO -> OIHW, LayerNorm scale -> weight."""
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [p.key for p in path if p.key != "encoder"]
    value = np.asarray(leaf)
    for prefix in ("blocks_", "decoder_blocks_"):
      names = [n.replace(prefix, prefix[:-1] + ".") if n.startswith(prefix) else n for n in names]
    if names[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      names[-1] = "weight"
    elif names[-1] == "scale":
      names[-1] = "weight"
    state[".".join(names)] = torch.tensor(value.copy())
  return state


def test_loss_prediction_mask_and_attention_logits_equal_pytorch_mae_on_the_same_weights_and_mask():
  model = small_mae()
  images = jnp.asarray(np.random.default_rng(1).standard_normal((3, 32, 32, 3)), jnp.float32)
  ids = ids_of_permutations(2, 3, 16)
  params = randomized(jax.jit(model.init)(jax.random.PRNGKey(0), images, ids)["params"], seed=3)
  reference = TorchMae(**SMALL, **SMALL_DECODER).eval()
  missing, unexpected = reference.load_state_dict(torch_state_dict(params), strict=False)
  assert sorted(missing) == ["decoder_pos_embed", "pos_embed"] and not unexpected
  (pred, mask), state = model.apply({"params": params}, images, ids, mutable=["intermediates"])
  torch_images = torch.tensor(np.asarray(images).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    torch_loss, torch_pred, torch_mask = reference(
      torch_images, torch.tensor(np.asarray(ids), dtype=torch.int64)
    )
    torch_loss_pixels = reference.forward_loss(torch_images, torch_pred, torch_mask, norm_pix_loss=False)
  np.testing.assert_array_equal(mask, torch_mask.numpy())
  assert pred.shape == (3, 16, 192)
  assert relative_error(pred, torch_pred.numpy()) < 1e-6  # 4.6e-7 measured.
  # The last encoder block's pre-softmax logits (CLS and the 4 visible patches), as D-MAE reads them.
  logits = state["intermediates"]["encoder"]["blocks_1"]["attn"]["attention_logits"][0]
  assert relative_error(logits, reference.blocks[1].attn.logits.numpy()) < 1.5e-6  # 7.1e-7 measured.
  loss = losses.reconstruction_loss(pred, images, mask, 8)
  np.testing.assert_allclose(float(loss), float(torch_loss), rtol=1e-6)  # 2e-7 measured.
  loss = losses.reconstruction_loss(pred, images, mask, 8, norm_pix=False)
  np.testing.assert_allclose(float(loss), float(torch_loss_pixels), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Attention distillation.


def test_attention_distillation_loss_mixes_student_heads_onto_the_teachers():
  rng = np.random.default_rng(4)
  student, teacher = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((2, 3, 5, 5))
  mix = rng.standard_normal((4, 3))
  mixed = np.zeros((2, 3, 5, 5))
  for t in range(3):
    for s in range(4):
      mixed[:, t] += mix[s, t] * student[:, s]
  expected = np.mean((mixed - teacher) ** 2)
  args = [jnp.asarray(a, jnp.float32) for a in (student, teacher, mix)]
  np.testing.assert_allclose(float(losses.attention_distillation_loss(*args)), expected, rtol=5e-7)
  # No gradient to the teacher.
  teacher_grad = jax.grad(losses.attention_distillation_loss, argnums=1)(*args)
  np.testing.assert_array_equal(teacher_grad, 0.0)


def test_distillation_loss_is_zero_with_the_student_as_teacher_and_the_identity_mix():
  config = mae_tiny_test_config.get_config()
  config.distill.update(enabled=True, blocks=(2,), teacher_heads=config.model.num_heads)
  mesh = sharding.make_mesh()
  plain = mae_step.MaePretraining(config, mesh, steps_per_epoch=1)
  state = plain.create_state(jax.random.PRNGKey(0))
  teacher = (plain.backbone, plain.backbone_params(state))
  pretraining = mae_step.MaePretraining(config, mesh, steps_per_epoch=1, teacher=teacher)
  heads, grid = config.model.num_heads, config.crop_size // config.model.patch_size
  images = jnp.asarray(np.random.default_rng(5).standard_normal((2, 32, 32, 3)), jnp.float32)
  ids = ids_of_permutations(6, 2, grid * grid)
  params = dict(state.params)
  params["attn_adapter1"] = jnp.eye(heads)
  loss_fn = jax.jit(pretraining.loss_fn)
  _, aux = loss_fn(params, images, ids, teacher[1], jax.random.PRNGKey(1))
  assert float(aux["distill_loss"]) < 1e-12
  params["attn_adapter1"] = jax.random.uniform(jax.random.PRNGKey(2), (heads, heads), minval=-0.5, maxval=0.5)
  _, aux = loss_fn(params, images, ids, teacher[1], jax.random.PRNGKey(1))
  assert float(aux["distill_loss"]) > 1e-3


def test_sown_attention_logits_are_the_pre_softmax_scaled_logits():
  model = mae_step.build_model(float32_config(mae_tiny_distill))
  images, ids = jnp.zeros((2, 224, 224, 3)), jnp.tile(jnp.arange(196, dtype=jnp.int32), (2, 1))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, ids)

  def block_12(variables):
    _, state = model.apply(variables, images, ids, mutable=["intermediates"])
    return state["intermediates"]["encoder"]["blocks_11"]["attn"]["attention_logits"][0]

  assert jax.eval_shape(block_12, shapes).shape == (2, 12, 50, 50)
  # On the small model: no softmax rows (they do not sum to 1), and their softmax is the sown attention.
  small = small_mae()
  images = jnp.asarray(np.random.default_rng(8).standard_normal((2, 32, 32, 3)), jnp.float32)
  ids = ids_of_permutations(9, 2, 16)
  params = randomized(jax.jit(small.init)(jax.random.PRNGKey(0), images, ids)["params"], seed=10)
  _, state = small.apply({"params": params}, images, ids, mutable=["intermediates"])
  attn = state["intermediates"]["encoder"]["blocks_1"]["attn"]
  logits, attention = attn["attention_logits"][0], attn["attention"][0]
  assert logits.shape == (2, 4, 5, 5)
  assert np.abs(np.asarray(logits).sum(-1) - 1).min() > 1e-2
  np.testing.assert_allclose(jax.nn.softmax(logits, axis=-1), attention, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# Initialisation.


def assert_uniform(values, limit, std_rtol=0.02):
  """Drawn from U(+-limit): none beyond, the largest close to it, the std limit / sqrt(3)."""
  values = np.asarray(values).reshape(-1)
  assert np.abs(values).max() <= limit * (1 + 1e-6)  # float32 rounding of the bound.
  assert np.abs(values).max() > limit * (1 - 20 / values.size)
  np.testing.assert_allclose(values.std(), limit / math.sqrt(3), rtol=std_rtol)


def test_mae_initialisation_is_the_official_one():
  model = mae_step.build_model(float32_config(mae_tiny_distill))
  images, ids = jnp.zeros((1, 224, 224, 3)), jnp.arange(196, dtype=jnp.int32)[None]
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images, ids)["params"]
  encoder = params["encoder"]
  # The fused qkv as one [192, 576] matrix: limit sqrt(6 / 768) (three separate ones: sqrt(6 / 384)).
  qkv = np.stack([encoder[f"blocks_{i}"]["attn"]["qkv"]["kernel"] for i in range(12)])
  assert qkv.shape == (12, 192, 576)
  assert_uniform(qkv, math.sqrt(6 / 768), std_rtol=0.005)
  # The patch projection xavier on its flattened [768, 192] view; its bias torch's Conv2d default.
  proj = encoder["patch_embed"]["proj"]
  assert_uniform(proj["kernel"], math.sqrt(6 / 960), std_rtol=0.01)
  assert_uniform(proj["bias"], 1 / math.sqrt(768), std_rtol=0.15)
  # Every Dense layer xavier-uniform with zero bias; LayerNorms 1 and 0.
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    if "patch_embed" in name:
      continue
    if name.endswith("['kernel']"):
      assert_uniform(leaf, math.sqrt(6 / sum(leaf.shape)), std_rtol=0.1)
    elif name.endswith("['bias']"):
      np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
    elif name.endswith("['scale']"):
      np.testing.assert_array_equal(leaf, 1.0, err_msg=name)
  # The head mix: the default of a bias-free 12 -> 12 1 x 1 convolution, U(+-1 / sqrt(12)).
  assert_uniform(params["attn_adapter11"], 1 / math.sqrt(12), std_rtol=0.15)


def test_cls_and_mask_tokens_are_normal_0_02_not_truncated():
  model = small_mae(decoder_dim=96)

  def tokens(key):
    ids = jnp.arange(16, dtype=jnp.int32)[None]
    params = model.init(key, jnp.zeros((1, 32, 32, 3)), ids)["params"]
    return params["encoder"]["cls_token"].reshape(-1), params["mask_token"].reshape(-1)

  cls, mask_token = jax.jit(jax.vmap(tokens))(jax.random.split(jax.random.PRNGKey(0), 128))
  for values in (np.asarray(cls).reshape(-1), np.asarray(mask_token).reshape(-1)):
    assert values.size >= 6144
    np.testing.assert_allclose(values.std(), 0.02, rtol=0.03)
    assert abs(values.mean()) < 0.02 * 4 / math.sqrt(values.size)
    # 4.55% of a normal lies beyond 2 std; none would with trunc_normal's cut there.
    assert 0.035 < np.mean(np.abs(values) > 0.04) < 0.056
