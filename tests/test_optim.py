"""The optimizer against the official torch recipe (AdamW param groups, clip_gradients,
cancel_gradients_last_layer, per-step lr / wd), rewritten in torch in this test."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from esvit_jax import optim
from esvit_jax.configs import common

STEPS_PER_EPOCH = 4
EPOCHS = 3
SHAPES = {
  "backbone": {
    "patch_embed": {"kernel": (2, 2, 3, 4), "bias": (4,)},
    "norm": {"scale": (4,), "bias": (4,)},
    "attn": {"relative_position_bias_table": (9, 2)},
  },
  "view_head": {"mlp_0": {"kernel": (4, 5), "bias": (5,)}, "last_layer": {"kernel": (5, 6), "scale": (1, 6)}},
  "region_head": {"last_layer": {"kernel": (5, 6), "scale": (1, 6)}},
}


def small_config():
  config = common.pretrain_config("swin_tiny", drop_path_rate=0.1)
  config.epochs, config.warmup_epochs, config.batch_size, config.lr = EPOCHS, 1, 256, 0.05
  return config  # peak lr 0.05, clip 3.0, last layer frozen during epoch 0.


def random_params(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda shape: rng.normal(size=shape).astype(np.float32), SHAPES, is_leaf=lambda x: isinstance(x, tuple)
  )


def official_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0):
  warmup_iters = warmup_epochs * niter
  warmup = np.linspace(0, base, warmup_iters) if warmup_epochs > 0 else np.array([])
  iters = np.arange(epochs * niter - warmup_iters)
  return np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def flat_with_names(tree):
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def torch_reference(params, grads_per_step, config, start=0):
  """main_esvit.train_one_epoch's optimizer part, in torch, from iteration `start` with a new AdamW."""
  named = {name: torch.tensor(np.array(p), requires_grad=True) for name, p in flat_with_names(params).items()}
  # utils.get_params_groups: no decay on biases and 1-D tensors.
  no_decay = [p for n, p in named.items() if n.endswith("['bias']") or p.ndim == 1]
  decay = [p for p in named.values() if all(p is not q for q in no_decay)]
  optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
  lr = official_cosine_scheduler(
    config.lr * config.batch_size / 256,
    config.min_lr,
    EPOCHS,
    STEPS_PER_EPOCH,
    warmup_epochs=config.warmup_epochs,
  )
  wd = official_cosine_scheduler(config.weight_decay, config.weight_decay_end, EPOCHS, STEPS_PER_EPOCH)
  history = []
  for it, grads in enumerate(grads_per_step, start=start):
    for i, group in enumerate(optimizer.param_groups):
      group["lr"] = lr[it]
      if i == 0:
        group["weight_decay"] = wd[it]
    for name, g in flat_with_names(grads).items():
      named[name].grad = torch.tensor(np.array(g))
    for p in named.values():  # utils.clip_gradients
      clip_coef = config.clip_grad / (p.grad.norm(2) + 1e-6)
      if clip_coef < 1:
        p.grad.mul_(clip_coef)
    if it // STEPS_PER_EPOCH < config.freeze_last_layer_epochs:  # utils.cancel_gradients_last_layer
      for name, p in named.items():
        if "last_layer" in name:
          p.grad = None
    optimizer.step()
    history.append({name: p.detach().numpy().copy() for name, p in named.items()})
  return history


def test_matches_official_torch_optimizer():
  config = small_config()
  params = random_params(0)
  rng = np.random.default_rng(1)
  # Gradient scales straddle the clip norm 3.0.
  grads_per_step = [
    jax.tree.map(lambda p: (rng.normal(size=p.shape) * rng.choice([0.1, 5.0])).astype(np.float32), params)
    for _ in range(EPOCHS * STEPS_PER_EPOCH)
  ]
  expected = torch_reference(params, grads_per_step, config)

  tx = optim.make_optimizer(config, steps_per_epoch=STEPS_PER_EPOCH)
  update = jax.jit(tx.update)
  state, current = tx.init(params), params
  for it, grads in enumerate(grads_per_step):
    updates, state = update(grads, state, current)
    current = optax.apply_updates(current, updates)
    for name, value in flat_with_names(current).items():
      np.testing.assert_allclose(value, expected[it][name], rtol=2e-5, atol=2e-6, err_msg=f"step {it} {name}")


def test_last_layer_frozen_in_first_epoch():
  config = small_config()
  params = random_params(2)
  tx = optim.make_optimizer(config, steps_per_epoch=STEPS_PER_EPOCH)
  update = jax.jit(tx.update)
  state, current = tx.init(params), params
  grads = jax.tree.map(jnp.ones_like, params)
  for it in range(2 * STEPS_PER_EPOCH):
    updates, state = update(grads, state, current)
    current = optax.apply_updates(current, updates)
    frozen = it < STEPS_PER_EPOCH
    for name, value in flat_with_names(current).items():
      changed = not np.array_equal(value, flat_with_names(params)[name])
      # Step 0 has lr 0 (the warm-up starts at 0), so nothing moves yet.
      assert changed == (it > 0 and not (frozen and "last_layer" in name)), (it, name)
    for name, moment in flat_with_names(state).items():
      if "last_layer" in name and (".mu" in name or ".nu" in name):
        assert np.any(moment != 0) != frozen, (it, name)


def test_clip_by_tensor_norm():
  grads = {"big": np.full((4, 4), 2.0, np.float32), "small": np.array([0.3, -0.4], np.float32)}
  clipped, _ = optim.clip_by_tensor_norm(3.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(clipped["big"], grads["big"] * 3.0 / (8.0 + 1e-6), rtol=1e-6)  # ||big|| = 8
  np.testing.assert_array_equal(clipped["small"], grads["small"])  # ||small|| = 0.5 < 3


def test_decay_mask_and_freeze_labels():
  params = random_params(3)
  mask = flat_with_names(optim.decay_mask(params))
  assert [name for name, decayed in mask.items() if decayed] == [
    "['backbone']['attn']['relative_position_bias_table']",
    "['backbone']['patch_embed']['kernel']",
    "['region_head']['last_layer']['kernel']",
    "['region_head']['last_layer']['scale']",
    "['view_head']['last_layer']['kernel']",
    "['view_head']['last_layer']['scale']",
    "['view_head']['mlp_0']['kernel']",
  ]
  labels = flat_with_names(optim.freeze_labels(params))
  assert {name for name, label in labels.items() if label == "last_layer"} == {
    name for name in labels if "['last_layer']" in name
  }


def test_restarted_optimizer_matches_torch_continuing_with_a_fresh_adamw():
  """A converted official checkpoint continues at step 6 (epoch 1) with a new optimizer, as torch would."""
  config, start = small_config(), 6
  params = random_params(2)
  rng = np.random.default_rng(3)
  grads_per_step = [
    jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    for _ in range(EPOCHS * STEPS_PER_EPOCH - start)
  ]
  expected = torch_reference(params, grads_per_step, config, start=start)
  tx = optim.make_optimizer(config, steps_per_epoch=STEPS_PER_EPOCH)
  state = optim.restarted_at(tx.init(params), start, config, steps_per_epoch=STEPS_PER_EPOCH)
  current = params
  for it, grads in enumerate(grads_per_step):
    updates, state = tx.update(grads, state, current)
    current = optax.apply_updates(current, updates)
    for name, value in flat_with_names(current).items():
      np.testing.assert_allclose(
        value, expected[it][name], rtol=2e-5, atol=2e-6, err_msg=f"step {start + it} {name}"
      )
