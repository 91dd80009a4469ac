"""The fine-tuning optimizer against MAE's recipe (util/lr_decay.param_groups_lrd, util/lr_sched, torch's
AdamW and clip_grad_norm_), rewritten in torch and numpy in this test, and layer tables worked out by hand."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from esvit_jax import optim
from esvit_jax.models import build_backbone

NUM_CLASSES = 10


def shape(*dims):
  return jax.ShapeDtypeStruct(dims, jnp.float32)


def finetune_shapes(name, image_size=32, **overrides):
  """The fine-tuned params as shape structs: {'backbone', 'fc_norm', 'head'}."""
  model = build_backbone(name, **overrides)
  images = jnp.zeros((1, image_size, image_size, 3))
  backbone = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  dim = model.num_features
  return {
    "backbone": backbone,
    "fc_norm": {"scale": shape(dim), "bias": shape(dim)},
    "head": {"kernel": shape(dim, NUM_CLASSES), "bias": shape(NUM_CLASSES)},
  }


def by_name(tree):
  return {
    "/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def exponents_by_prefix(names, prefixes):
  """name -> the exponent of the one prefix it starts with."""
  matches = {name: [e for p, e in prefixes.items() if name.startswith(p)] for name in names}
  assert all(len(m) == 1 for m in matches.values()), {n: m for n, m in matches.items() if len(m) != 1}
  return {name: m[0] for name, m in matches.items()}


def test_vit_tiny_layer_scales_by_hand():
  params = finetune_shapes("vit_tiny", num_heads=12)
  scales = by_name(optim.layer_scales(params, 0.85))
  assert optim.num_layers(params) == 14
  assert round(scales["backbone/patch_embed/proj/kernel"], 4) == 0.1209
  assert scales["backbone/cls_token"] == scales["backbone/pos_embed"] == pytest.approx(0.85**13)
  assert scales["backbone/blocks_0/attn/qkv/kernel"] == pytest.approx(0.85**12)
  assert scales["backbone/blocks_11/mlp/fc2/bias"] == pytest.approx(0.85)
  assert scales["backbone/norm/scale"] == scales["fc_norm/bias"] == scales["head/kernel"] == 1.0
  prefixes = {
    "backbone/patch_embed/": 13,
    "backbone/cls_token": 13,
    "backbone/pos_embed": 13,
    **{f"backbone/blocks_{i}/": 12 - i for i in range(12)},
    "backbone/norm/": 0,
    "fc_norm/": 0,
    "head/": 0,
  }
  expected = {name: 0.85**e for name, e in exponents_by_prefix(scales, prefixes).items()}
  assert scales == pytest.approx(expected, rel=1e-12)


def test_swin_tiny_layer_scales_by_hand():
  params = finetune_shapes("swin_tiny", image_size=64)
  scales = by_name(optim.layer_scales(params, 0.85))
  assert optim.num_layers(params) == 14  # 2 + 2 + 6 + 2 blocks, the embedding and the head.
  prefixes = {
    "backbone/patch_embed/": 13,
    "backbone/layers_0/blocks_0/": 12,
    "backbone/layers_0/blocks_1/": 11,
    "backbone/layers_0/downsample/": 11,
    "backbone/layers_1/blocks_0/": 10,
    "backbone/layers_1/blocks_1/": 9,
    "backbone/layers_1/downsample/": 9,
    "backbone/layers_2/blocks_0/": 8,
    "backbone/layers_2/blocks_1/": 7,
    "backbone/layers_2/blocks_2/": 6,
    "backbone/layers_2/blocks_3/": 5,
    "backbone/layers_2/blocks_4/": 4,
    "backbone/layers_2/blocks_5/": 3,
    "backbone/layers_2/downsample/": 3,
    "backbone/layers_3/blocks_0/": 2,
    "backbone/layers_3/blocks_1/": 1,
    "backbone/norm/": 0,
    "fc_norm/": 0,
    "head/": 0,
  }
  expected = {name: 0.85**e for name, e in exponents_by_prefix(scales, prefixes).items()}
  assert scales == pytest.approx(expected, rel=1e-12)
  assert by_name(optim.layer_ids(params))["backbone/layers_2/downsample/reduction/kernel"] == 10


def test_unknown_layouts_are_refused_with_their_names():
  head = {"kernel": shape(4, 2), "bias": shape(2)}
  with pytest.raises(ValueError, match="under 'backbone'"):
    optim.layer_ids({"encoder": {"blocks_0": {"kernel": shape(4, 4)}}, "head": head})
  with pytest.raises(ValueError, match=r"ViT \(blocks_i\) and Swin.*\['stem'\]"):
    optim.layer_scales({"backbone": {"stem": {"kernel": shape(4, 4)}}, "head": head}, 0.75)
  vit = {"blocks_0": {"kernel": shape(4, 4)}, "dist_token": shape(1, 1, 4)}
  with pytest.raises(ValueError, match="dist_token"):
    optim.layer_ids({"backbone": vit, "head": head})


def decayed(params):
  return {name for name, on in by_name(optim.finetune_decay_mask(params)).items() if on}


def test_decay_mask_of_vit_spares_biases_norms_tokens_and_positions():
  params = finetune_shapes("vit_tiny", depth=2, num_heads=3)
  block = ["attn/qkv/kernel", "attn/proj/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel"]
  assert decayed(params) == {
    "backbone/patch_embed/proj/kernel",
    *(f"backbone/blocks_{i}/{name}" for i in range(2) for name in block),
    "head/kernel",
  }


def test_decay_mask_of_swin_spares_relative_position_tables():
  params = finetune_shapes("swin_tiny", image_size=64, depths=(1, 1), num_heads=(3, 6))
  assert by_name(params)["backbone/layers_0/blocks_0/attn/relative_position_bias_table"].shape == (169, 3)
  block = ["attn/qkv/kernel", "attn/proj/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel"]
  assert decayed(params) == {
    "backbone/patch_embed/proj/kernel",
    *(f"backbone/layers_{s}/blocks_0/{name}" for s in range(2) for name in block),
    "backbone/layers_0/downsample/reduction/kernel",
    "head/kernel",
  }


def finetune_config(**overrides):
  config = ml_collections.ConfigDict(
    dict(
      lr=2.5e-2,
      batch_size=512,  # Peak lr 0.05.
      min_lr=1e-3,
      epochs=3,
      warmup_epochs=1,
      weight_decay=0.05,
      adam_betas=(0.9, 0.95),
      clip_grad=5.0,
      layer_decay=0.75,
    )
  )
  config.update(overrides)
  return config


def mae_learning_rate(config, step, steps_per_epoch):
  """util/lr_sched.adjust_learning_rate at iteration `step` (epoch = step / steps_per_epoch)."""
  epoch = step / steps_per_epoch
  peak = config.lr * config.batch_size / 256
  if epoch < config.warmup_epochs:
    return peak * epoch / config.warmup_epochs
  progress = (epoch - config.warmup_epochs) / (config.epochs - config.warmup_epochs)
  return config.min_lr + (peak - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_learning_rate_warms_up_from_zero_then_follows_the_cosine():
  config = finetune_config(lr=5e-4, batch_size=1024, min_lr=1e-6, epochs=100, warmup_epochs=5)
  schedule = optim.finetune_learning_rate(config, steps_per_epoch=10)
  steps = [0, 1, 25, 50, 51, 525, 998, 999]
  expected = [mae_learning_rate(config, s, 10) for s in steps]
  assert expected[3] == pytest.approx(2e-3) and expected[5] == pytest.approx((2e-3 + 1e-6) / 2)
  np.testing.assert_allclose(  # Measured: 6.6e-8 relative at most.
    [float(schedule(s)) for s in steps], expected, rtol=2e-7, atol=0
  )


def torch_name(name):
  """Our path as MAE's timm-style parameter name: blocks_3/attn/... -> blocks.3.attn...."""
  return name.removeprefix("backbone/").replace("blocks_", "blocks.").replace("/", ".")


def mae_layer_id(name, num_layers):
  """util/lr_decay.get_layer_id_for_vit."""
  if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  if name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  return num_layers


def torch_reference(params, grads_per_step, config, steps_per_epoch, depth):
  """main_finetune's optimizer: param_groups_lrd, AdamW, per-iteration lr, clip_grad_norm_."""
  named = {torch_name(n): torch.tensor(np.array(p), requires_grad=True) for n, p in by_name(params).items()}
  num_layers = depth + 1
  scales = [config.layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
  groups = {}
  for name, p in named.items():
    no_decay = p.ndim == 1 or name in ("pos_embed", "cls_token")
    layer = mae_layer_id(name, num_layers)
    group = groups.setdefault(
      (layer, no_decay),
      {"params": [], "weight_decay": 0.0 if no_decay else config.weight_decay, "lr_scale": scales[layer]},
    )
    group["params"].append(p)
  optimizer = torch.optim.AdamW(list(groups.values()), betas=tuple(config.adam_betas), eps=1e-8)
  for step, grads in enumerate(grads_per_step):
    lr = mae_learning_rate(config, step, steps_per_epoch)
    for group in optimizer.param_groups:
      group["lr"] = lr * group["lr_scale"]
    for name, g in by_name(grads).items():
      named[torch_name(name)].grad = torch.tensor(np.array(g))
    torch.nn.utils.clip_grad_norm_(list(named.values()), config.clip_grad)
    optimizer.step()
  return {name: p.detach().numpy() for name, p in named.items()}


def random_like(tree, rng, scale=1.0):
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32), tree)


def run_steps(optimizer, params, grads_per_step):
  update = jax.jit(optimizer.update)
  state = optimizer.init(params)
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_four_steps_equal_maes_torch_optimizer():
  steps_per_epoch, depth = 2, 3
  shapes = finetune_shapes("vit_tiny", image_size=8, depth=depth, embed_dim=8, num_heads=2, patch_size=4)
  rng = np.random.default_rng(0)
  params = random_like(shapes, rng)
  # Global norms 169, 17, 84, 1.7 against clip 5: clipped on the first three steps, not on the last.
  grads_per_step = [random_like(shapes, rng, scale) for scale in (1.0, 0.1, 0.5, 0.01)]
  config = finetune_config()
  optimizer = optim.make_finetune_optimizer(config, steps_per_epoch=steps_per_epoch, params=shapes)
  ours, _ = run_steps(optimizer, params, grads_per_step)
  reference = torch_reference(params, grads_per_step, config, steps_per_epoch, depth)
  assert set(reference) == {torch_name(n) for n in by_name(ours)}
  for name, p in by_name(ours).items():
    start = by_name(params)[name]
    # Measured: 4.8e-7 at most (float32 rounding of parameters ~1), 1.2e-5 of the largest move of a tensor.
    np.testing.assert_allclose(p, reference[torch_name(name)], rtol=1e-6, atol=1e-6, err_msg=name)
    assert np.abs(p - start).max() > 0.02, name  # Every tensor moved (at least 0.03 measured).


def test_each_update_scales_with_its_layer_factor():
  shapes = finetune_shapes("vit_tiny", image_size=8, depth=2, embed_dim=8, num_heads=2, patch_size=4)
  rng = np.random.default_rng(1)
  params, grads = random_like(shapes, rng), random_like(shapes, rng)
  flat, decayed = (
    optim.make_finetune_optimizer(
      finetune_config(warmup_epochs=0, clip_grad=0.0, layer_decay=decay), steps_per_epoch=2, params=shapes
    )
    for decay in (1.0, 0.6)
  )  # No warm-up: lr = peak at step 0.
  ratios = jax.tree.map(
    lambda a, b: np.array(a) / np.array(b),
    jax.jit(decayed.update)(grads, decayed.init(params), params)[0],
    jax.jit(flat.update)(grads, flat.init(params), params)[0],
  )
  expected = {"backbone/patch_embed/proj/kernel": 0.6**3, "backbone/blocks_0/attn/qkv/bias": 0.6**2}
  expected |= {"backbone/blocks_1/mlp/fc2/kernel": 0.6, "backbone/norm/scale": 1.0, "head/kernel": 1.0}
  for name, ratio in by_name(ratios).items():
    np.testing.assert_allclose(ratio, by_name(optim.layer_scales(shapes, 0.6))[name], rtol=1e-6, err_msg=name)
  for name, factor in expected.items():
    np.testing.assert_allclose(by_name(ratios)[name], factor, rtol=1e-6, err_msg=name)


def first_moment(state):
  def is_adam(node):
    return isinstance(node, optax.ScaleByAdamState)

  return next(s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s)).mu


@pytest.mark.parametrize(
  ("clip_grad", "clipped"),
  [(1.0, (3 / 5, 4 / 5)), (10.0, (3.0, 4.0)), (0.0, (3.0, 4.0))],
  ids=["over", "under", "off"],
)
def test_clipping_scales_all_gradients_by_their_global_norm(clip_grad, clipped):
  shapes = finetune_shapes("vit_tiny", image_size=8, depth=1, embed_dim=8, num_heads=2, patch_size=4)
  params = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)
  grads = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  grads["head"]["kernel"][0, 0] = 3.0  # Two tensors of norms 3 and 4: global norm 5.
  grads["backbone"]["cls_token"][0, 0, 1] = 4.0
  config = finetune_config(clip_grad=clip_grad, adam_betas=(0.9, 0.999))
  optimizer = optim.make_finetune_optimizer(config, steps_per_epoch=2, params=shapes)
  _, state = run_steps(optimizer, params, [grads])
  mu = first_moment(state)  # (1 - b1) * the clipped gradient after one step.
  np.testing.assert_allclose(mu["head"]["kernel"][0, 0] / 0.1, clipped[0], rtol=1e-6)
  np.testing.assert_allclose(mu["backbone"]["cls_token"][0, 0, 1] / 0.1, clipped[1], rtol=1e-6)
