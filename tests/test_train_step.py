"""The jitted train step on a tiny EsViT: EMA teacher, centres, frozen last layer, sharding, learning.

Every step function is compiled once per module (they take most of the runtime): a float32 step on one
device is the reference; the same step on the 8 fake CPU devices, data-parallel and FSDP, must give the
same numbers; a bfloat16 step checks that training lowers the loss. These run in host mode (crops given);
the device-mode step (crops made from canvases inside the step) has its own reference on one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import losses, sharding, train_step
from esvit_jax.configs import common
from esvit_jax.data import device_augment

STEPS_PER_EPOCH = 4
BATCH = 8
CANVAS = 48
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def tiny_config(**overrides):
  """A one-stage Swin (a plain and a shifted block, 16 channels) with 64 prototypes on 32px globals and
  16px locals: small enough to compile in seconds."""
  config = common.pretrain_config("swin_tiny", drop_path_rate=0.1, window_size=4)
  config.model.update(
    embed_dim=16, depths=(2,), num_heads=(2,), image_size=32, out_dim=64, hidden_dim=32, bottleneck_dim=16
  )
  config.global_crop_size, config.local_crop_size, config.num_local_crops = 32, 16, 2
  config.batch_size, config.epochs, config.warmup_epochs, config.lr = BATCH, 10, 0, 0.1  # peak lr 3.1e-3
  config.compute_dtype = "float32"
  config.augment_on, config.canvas_size = "host", CANVAS
  config.update(overrides)
  return config


def host_batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "globals": rng.integers(0, 256, (BATCH, 2, 32, 32, 3), dtype=np.uint8),
    "locals": rng.integers(0, 256, (BATCH, 2, 16, 16, 3), dtype=np.uint8),
  }


def canvas_batch(seed=0):
  """Device-mode input: images of 24 to 48 px, each in the top-left corner of a zero canvas."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(24, CANVAS + 1, (BATCH, 2)).astype(np.int32)
  canvas = np.zeros((BATCH, CANVAS, CANVAS, 3), np.uint8)
  for row, (h, w) in zip(canvas, sizes, strict=False):
    row[:h, :w] = rng.integers(0, 256, (h, w, 3))
  return {"canvas": canvas, "image_size": sizes}


def run_steps(config, mesh, num_steps):
  """Host copies of the initial state and of the state and metrics after every step, and the final state."""
  state = train_step.create_train_state(config, mesh, jax.random.PRNGKey(0), steps_per_epoch=STEPS_PER_EPOCH)
  step = train_step.make_train_step(config, mesh, steps_per_epoch=STEPS_PER_EPOCH)
  batch = sharding.global_batch(canvas_batch() if config.augment_on == "device" else host_batch(), mesh)
  initial, states, metrics = jax.device_get(state), [], []
  with jax.transfer_guard("disallow"):  # Nothing may move between host and device inside the step.
    for _ in range(num_steps):
      state, step_metrics = step(state, batch)
      states.append(jax.device_get(state))
      metrics.append(jax.device_get(step_metrics))
  assert step._cache_size() == 1  # Compiled once: no recompilation after step 1.
  return initial, states, metrics, state


@pytest.fixture(scope="module", autouse=True)
def fast_compilation():
  """XLA's optimisation passes dominate this module's runtime; the tiny steps do not need them."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="module")
def single_device():
  return run_steps(tiny_config(), sharding.make_mesh(jax.devices()[:1]), num_steps=2)


def test_first_step_teacher_centres_and_metrics(single_device):
  initial, states, metrics, _ = single_device
  after, metrics = states[0], metrics[0]
  momentum = 0.996  # Momentum schedule at step 0.

  # The teacher starts as a copy of the student; both centres start at zero.
  jax.tree.map(np.testing.assert_array_equal, initial.teacher_params, initial.params)
  np.testing.assert_array_equal(initial.center, 0.0)
  np.testing.assert_array_equal(initial.region_center, 0.0)

  # Teacher = m * teacher + (1 - m) * student, with the updated student.
  expected_teacher = jax.tree.map(
    lambda t, s: momentum * t + (1 - momentum) * s, initial.teacher_params, after.params
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    after.teacher_params,
    expected_teacher,
  )
  # The student moved, except the last layers, frozen during epoch 0.
  for (path, before), value in zip(
    *[jax.tree_util.tree_flatten_with_path(initial.params)[0], jax.tree.leaves(after.params)], strict=False
  ):
    assert np.array_equal(before, value) == ("last_layer" in jax.tree_util.keystr(path)), path

  # Centres: 0.9 * 0 + 0.1 * mean of the teacher logits, the teacher fed the normalised globals.
  globals_ = (host_batch()["globals"] / 255.0 - MEAN) / STD
  teacher_out = jax.jit(train_step.build_model(tiny_config()).apply)(
    {"params": initial.teacher_params}, [jnp.asarray(globals_, jnp.float32)]
  )[0]
  np.testing.assert_allclose(
    after.center[0], 0.1 * teacher_out["view_logits"].mean((0, 1)), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
    after.region_center[0], 0.1 * teacher_out["region_logits"].mean((0, 1, 2)), rtol=1e-4, atol=1e-6
  )

  assert after.step == 1
  np.testing.assert_allclose(
    [metrics[k] for k in ("lr", "wd", "momentum", "teacher_temp")],
    [0.1 * BATCH / 256, 0.04, momentum, 0.04],
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    metrics["loss"], 0.5 * metrics["view_loss"] + 0.5 * metrics["region_loss"], rtol=1e-6
  )
  assert 0 < metrics["teacher_entropy"] < np.log(64) and metrics["grad_norm"] > 0
  dtypes = {
    v.dtype for v in jax.tree.leaves((after.params, after.teacher_params, after.opt_state, after.center))
  }
  assert dtypes == {np.dtype(np.float32), np.dtype(np.int32)}  # int32: optimizer step counts.


def test_second_step_loss_uses_the_centres_from_before_their_update(single_device):
  """Step 1's losses, recomputed from the state after step 0 (its student with the step's dropout key, its
  teacher, its centres), equal the step's metrics; with the centres this step writes they do not."""
  _, states, metrics, _ = single_device
  state, config = states[0], tiny_config()
  model = train_step.build_model(config)
  batch = host_batch()
  crops = [jnp.asarray((batch[k] / 255.0 - MEAN) / STD, jnp.float32) for k in ("globals", "locals")]
  dropout = jax.random.fold_in(state.rng, 1)

  @jax.jit
  def step_losses(centers):
    teacher = model.apply({"params": state.teacher_params}, crops[:1], train=False)[0]
    student = model.apply({"params": state.params}, crops, train=True, rngs={"dropout": dropout})
    _, aux = losses.esvit_loss(
      student, teacher, *centers, teacher_temp=0.04, student_temp=0.1, region_loss_weight=0.5
    )
    return aux["view_loss"], aux["region_loss"]

  before = step_losses((state.center, state.region_center))
  updated = step_losses((states[1].center, states[1].region_center))
  got = (metrics[1]["view_loss"], metrics[1]["region_loss"])
  print("step-1 losses, recomputed - step:", np.subtract(before, got), "with the new centres:", updated)
  np.testing.assert_allclose(before, got, rtol=1e-6)  # Measured: equal.
  for name, new, old in zip(("view", "region"), updated, got, strict=True):
    assert abs(new - old) > 1e-3 * abs(old), name  # The centres' update is visible in each loss.


@pytest.mark.parametrize("strategy", ["data", "fsdp"])
def test_sharded_step_matches_single_device(single_device, strategy):
  _, expected_states, expected_metrics, _ = single_device
  config = tiny_config(sharding=strategy, fsdp_min_size_mb=0.0)
  mesh = sharding.make_mesh()
  assert mesh.size == 8
  _, states, metrics, device_state = run_steps(config, mesh, num_steps=2)
  for ours, expected in zip(metrics, expected_metrics, strict=False):
    for key in expected:
      np.testing.assert_allclose(ours[key], expected[key], rtol=2e-5, err_msg=key)
  # atol 5e-5 (1.6% of one step's lr): Adam divides by sqrt(v), so for gradients near 0 it turns
  # reduction-order noise into visible differences of the update.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=5e-5), states[-1], expected_states[-1]
  )

  # The state after the steps is laid out as abstract_train_state (a checkpoint's restore target) says.
  abstract = train_step.abstract_train_state(config, mesh, steps_per_epoch=STEPS_PER_EPOCH)
  assert jax.tree.structure(abstract) == jax.tree.structure(device_state)
  for a, leaf in zip(jax.tree.leaves(abstract), jax.tree.leaves(device_state), strict=False):
    assert (a.shape, a.dtype) == (leaf.shape, leaf.dtype) and a.sharding.is_equivalent_to(
      leaf.sharding, leaf.ndim
    )
  specs = {leaf.sharding.spec for leaf in jax.tree.leaves(device_state.params)}
  if strategy == "data":
    assert specs == {jax.P()}
  else:  # The teacher and the Adam moments are split like the params.
    kernel = device_state.params["backbone"]["layers_0"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.P(None, "data")
    assert (
      device_state.teacher_params["backbone"]["layers_0"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding
      == kernel.sharding
    )
    assert sum(x.sharding.spec == jax.P(None, "data") for x in jax.tree.leaves(device_state.opt_state)) >= 2


def test_training_lowers_the_loss():
  """bfloat16 compute, 30 steps on one batch. Teacher and centres are held fixed (momenta 1) so that the
  target stays put: on a single batch, centring alone flattens the teacher and raises its entropy."""
  config = tiny_config(compute_dtype="bfloat16", momentum_teacher=1.0, center_momentum=1.0)
  initial, states, metrics, _ = run_steps(config, sharding.make_mesh(jax.devices()[:1]), num_steps=30)
  losses = [m["loss"] for m in metrics]
  assert np.mean(losses[-5:]) < losses[0] - 0.5, losses  # Nats; the floor is the teachers' entropy.
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(states[-1].params))

  def last_layer(state):
    return state.params["view_head"]["last_layer"]["kernel"]

  np.testing.assert_array_equal(last_layer(states[STEPS_PER_EPOCH - 1]), last_layer(initial))
  assert not np.array_equal(last_layer(states[STEPS_PER_EPOCH]), last_layer(initial))


def test_view_only_step_has_no_region_head():
  """Plain DINO (region_loss_weight 0), traced only: no region head, no region loss."""
  config = tiny_config(region_loss_weight=0.0)
  mesh = sharding.make_mesh()
  state = jax.eval_shape(
    lambda rng: train_step.create_train_state(config, mesh, rng, steps_per_epoch=STEPS_PER_EPOCH),
    jax.random.PRNGKey(0),
  )
  step = train_step.make_train_step(config, mesh, steps_per_epoch=STEPS_PER_EPOCH)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_batch())
  new_state, metrics = jax.eval_shape(step, state, batch)
  assert set(new_state.params) == {"backbone", "view_head"}
  assert set(metrics) == {
    "loss",
    "view_loss",
    "lr",
    "wd",
    "momentum",
    "teacher_temp",
    "teacher_entropy",
    "teacher_batch_entropy",
    "grad_norm",
    "teacher_embedding_std",
  }


@pytest.fixture(scope="module")
def device_mode():
  return run_steps(tiny_config(augment_on="device"), sharding.make_mesh(jax.devices()[:1]), num_steps=2)


def test_device_mode_step_draws_each_examples_crops_at_its_stream_position(device_mode):
  """The teacher sees device_augment.multicrop of the canvases at positions step * B + row: the centre
  update of each step equals the one computed here from those crops, and not from the other step's."""
  config = tiny_config(augment_on="device")
  initial, states, _, _ = device_mode
  teacher = jax.jit(
    lambda params, globals_: (
      train_step.build_model(config)
      .apply({"params": params}, [globals_], train=False)[0]["view_logits"]
      .mean((0, 1))
    )
  )
  crops = jax.jit(
    lambda positions: device_augment.multicrop(
      canvas_batch()["canvas"], canvas_batch()["image_size"], positions, config, jnp.float32
    )["globals"]
  )
  before = [initial] + states[:-1]
  for step in range(2):
    logits = teacher(before[step].teacher_params, crops(step * BATCH + jnp.arange(BATCH)))
    np.testing.assert_allclose(
      states[step].center[0], 0.9 * before[step].center[0] + 0.1 * logits, rtol=1e-4, atol=1e-6
    )
  other = teacher(before[1].teacher_params, crops(jnp.arange(BATCH)))  # Step 0's crops at step 1.
  assert not np.allclose(states[1].center[0], 0.9 * before[1].center[0] + 0.1 * other, rtol=1e-4, atol=1e-6)


def test_device_mode_sharded_step_matches_single_device(device_mode):
  """8 devices, each augmenting its own examples, give the one-device numbers (same tolerances as above)."""
  _, expected_states, expected_metrics, _ = device_mode
  _, states, metrics, _ = run_steps(tiny_config(augment_on="device"), sharding.make_mesh(), num_steps=2)
  for ours, expected in zip(metrics, expected_metrics, strict=False):
    for key in expected:
      np.testing.assert_allclose(ours[key], expected[key], rtol=2e-5, err_msg=key)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=5e-5), states[-1], expected_states[-1]
  )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_mode_step_output_is_finite(device_mode, dtype):
  if dtype == "float32":
    _, states, metrics, _ = device_mode
  else:
    _, states, metrics, _ = run_steps(
      tiny_config(augment_on="device", compute_dtype=dtype),
      sharding.make_mesh(jax.devices()[:1]),
      num_steps=1,
    )
  for step_metrics in metrics:
    assert all(np.isfinite(value) for value in step_metrics.values()), step_metrics
  assert metrics[-1]["loss"] > 0 and metrics[-1]["grad_norm"] > 0
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves((states[-1].params, states[-1].center)))
