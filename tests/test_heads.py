"""DINO head against a numpy reference; the EsViT wrapper's multi-crop grouping and outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from esvit_jax import models


def np_dino_head(x, p, num_layers=3):
  def gelu(z):
    return 0.5 * z * (1.0 + erf(z / np.sqrt(2.0)))

  for i in range(num_layers):
    x = x @ p[f"mlp_{i}"]["kernel"] + p[f"mlp_{i}"]["bias"]
    if i < num_layers - 1:
      x = gelu(x)
  x = x / max(np.linalg.norm(x), 1e-12)
  v = p["last_layer"]["kernel"]
  g = p["last_layer"]["scale"][0] if "scale" in p["last_layer"] else np.ones(v.shape[1])  # Frozen: g = 1.
  weight = g[:, None] * v.T / np.linalg.norm(v.T, axis=1, keepdims=True)  # torch layout [K, 256].
  return weight @ x


@pytest.mark.parametrize("norm_last_layer", [False, True])
def test_dino_head_matches_numpy_reference(norm_last_layer):
  """Inputs of std 3 spread the first GELU's inputs over [-4, 3], where the tanh form is up to 5e-4 off erf
  (1.7e-4 at the output); g is 1 and not a parameter with norm_last_layer."""
  head = models.DINOHead(out_dim=40, hidden_dim=24, bottleneck_dim=8, norm_last_layer=norm_last_layer)
  x = 3 * jax.random.normal(jax.random.key(0), (3, 12))
  params = head.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  assert ("scale" in params["last_layer"]) != norm_last_layer
  out = jax.jit(head.apply)({"params": params}, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for i in range(3):
    reference = np_dino_head(np.asarray(x[i], np.float64), p)
    np.testing.assert_allclose(out[i], reference, rtol=0, atol=5e-7)  # Measured 1.5e-7 on 2026-12-03 (CPU).


def test_dino_head_init_and_param_counts():
  head = models.DINOHead()
  params = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 768)))["params"]
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert round(count / 1e6, 2) == 23.14  # The official head's parameter count for C = 768.
  assert params["last_layer"]["kernel"].shape == (256, 65536) and params["last_layer"]["scale"].shape == (
    1,
    65536,
  )
  small = models.DINOHead(out_dim=4096, hidden_dim=64, bottleneck_dim=256)
  p = small.init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
  np.testing.assert_array_equal(p["last_layer"]["scale"], 1.0)  # weight_g filled with 1.
  bound = 1 / 16  # torch default Linear init of weight_v: U(+-1/sqrt(256)).
  assert 0.9 * bound < float(jnp.abs(p["last_layer"]["kernel"]).max()) <= bound
  assert abs(float(p["mlp_0"]["kernel"].std()) - 0.02) < 0.003
  frozen = models.DINOHead(out_dim=32, hidden_dim=16, bottleneck_dim=8, norm_last_layer=True)
  assert "scale" not in frozen.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]["last_layer"]


def tiny_model_config(**kw):
  return ml_collections.ConfigDict(
    dict(
      backbone="swin_tiny",
      embed_dim=16,
      depths=(1, 1),
      num_heads=(1, 2),
      window_size=4,
      image_size=32,
      drop_path_rate=0.1,
      out_dim=32,
      hidden_dim=16,
      bottleneck_dim=8,
      norm_last_layer=False,
      **kw,
    )
  )


@pytest.mark.parametrize("use_region_head", [True, False])
def test_esvit_runs_one_backbone_call_per_resolution(use_region_head):
  model = models.build_esvit(tiny_model_config(), use_region_head=use_region_head)
  globals_ = jax.random.normal(jax.random.key(0), (2, 2, 32, 32, 3))
  locals_ = jax.random.normal(jax.random.key(1), (2, 3, 16, 16, 3))
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(2), [globals_, locals_])
  assert set(variables["params"]) == {"backbone", "view_head"} | (
    {"region_head"} if use_region_head else set()
  )
  calls = []

  def count_backbone_calls(next_fun, args, kwargs, context):
    if context.module.name == "backbone" and context.method_name == "__call__":
      calls.append(args[0].shape)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(count_backbone_calls):
    outs = jax.jit(model.apply)(variables, [globals_, locals_])  # Intercepted while tracing.
  assert calls == [(4, 32, 32, 3), (6, 16, 16, 3)]  # One call per resolution, globals first.
  assert outs[0]["view_logits"].shape == (2, 2, 32) and outs[1]["view_logits"].shape == (2, 3, 32)
  # 32px -> 8x8 tokens -> 4x4 after merging; 16px -> 4 -> 2x2.
  assert outs[0]["region_features"].shape == (2, 2, 16, 32) and outs[1]["region_features"].shape == (
    2,
    3,
    4,
    32,
  )
  if use_region_head:
    assert outs[1]["region_logits"].shape == (2, 3, 4, 32)
  else:
    assert "region_logits" not in outs[1]
  # Output [b, n] is crop [b, n] through the backbone and heads, for every crop (the last one alone would
  # not tell batch-major from crop-major merging: both put it last). Crops are independent in evaluation
  # mode, so one call on the crops listed row-major ([b, n] at 3 b + n) gives each crop's own outputs.
  bound = model.bind(variables)
  pooled, regions = bound.backbone(locals_.reshape(6, 16, 16, 3))
  expected = {"view_logits": bound.view_head(pooled), "region_features": regions}
  if use_region_head:
    expected["region_logits"] = bound.region_head(regions)
  for key, value in expected.items():
    np.testing.assert_allclose(outs[1][key].reshape(value.shape), value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_esvit_bfloat16_outputs_are_float32_and_finite():
  model = models.build_esvit(tiny_model_config(), use_region_head=True, dtype=jnp.bfloat16)
  crops = [jax.random.normal(jax.random.key(0), (2, 2, 32, 32, 3))]
  variables = jax.jit(model.init)(jax.random.key(1), crops)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))  # float32 parameters.
  out = jax.jit(model.apply, static_argnames="train")(
    variables, crops, train=True, rngs={"dropout": jax.random.key(2)}
  )[0]
  assert out["view_logits"].dtype == jnp.float32 and out["region_logits"].dtype == jnp.float32
  assert np.all(np.isfinite(out["region_logits"]))
