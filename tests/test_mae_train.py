"""MAE pretraining: its schedule and optimizer; runs end to end (metrics, export, resume, distillation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import checkpointing, export, mae_step, optim, schedules, train, writers
from esvit_jax.configs import mae_tiny
from esvit_jax.models import mae, vit
from tests.configs import mae_tiny as tiny
from tests.test_train import Crash, assert_trees_equal, losses

IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 4096  # 312 full batches of 4096, the last partial one dropped.


def test_mae_lite_learning_rate_and_weight_decay_schedules():
  config = mae_tiny.get_config()
  schedule = schedules.from_config(config, IMAGENET_STEPS_PER_EPOCH)
  total = schedules.total_steps(config, IMAGENET_STEPS_PER_EPOCH)
  warmup = 40 * IMAGENET_STEPS_PER_EPOCH
  assert (total, warmup) == (124_800, 12_480)
  peak = 1.5e-4 * 4096 / 256
  assert peak == pytest.approx(2.4e-3)

  def expected(step):  # Linear from 0 over the warm-up, then a cosine to 0, per step.
    if step < warmup:
      return peak * step / warmup
    return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))

  steps = [0, 1, 6_240, 12_479, 12_480, 12_481, 50_000, 68_640, 124_000, 124_799]
  got = np.asarray(jax.vmap(schedule.learning_rate)(jnp.asarray(steps)))
  np.testing.assert_allclose(got, [expected(s) for s in steps], rtol=2e-5, atol=1e-11)
  assert got[0] == 0.0 and got[4] == pytest.approx(peak)
  np.testing.assert_allclose(np.asarray(jax.vmap(schedule.weight_decay)(jnp.asarray(steps))), 0.05)


def test_mae_optimizer_is_adamw_095_with_decay_on_matrices_and_tokens_only():
  config = mae_tiny.get_config()
  config.lr, config.batch_size, config.warmup_epochs, config.total_steps = 256e-3, 256, 0, 100
  tx = optim.make_optimizer(config, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  params = {
    "mask_token": rng.normal(size=(1, 1, 4)),
    "dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
    "norm": {"scale": rng.normal(size=(4,))},
  }
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
  state = tx.init(jax.tree.map(jnp.asarray, params))
  new = params
  m = jax.tree.map(np.zeros_like, params)
  v = jax.tree.map(np.zeros_like, params)
  for t in (1, 2):  # Two steps of torch's AdamW (betas 0.9, 0.95, eps 1e-8, decoupled weight decay 0.05).
    lr = float(schedules.from_config(config, 10).learning_rate(t - 1))
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, jax.tree.map(jnp.asarray, new))
    got = jax.tree.map(lambda p, u: np.asarray(p + u), new, updates)
    m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
    v = jax.tree.map(lambda v, g: 0.95 * v + 0.05 * g * g, v, grads)
    decayed = {"mask_token": True, "dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}

    def torch_step(p, m, v, decay, lr=lr, t=t):
      p = p * (1 - lr * 0.05) if decay else p
      return p - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.95**t)) + 1e-8)

    new = jax.tree.map(torch_step, new, m, v, decayed)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, new)
    new = got


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mae_uninterrupted")
  return workdir, jax.device_get(train.train_and_evaluate(tiny.get_config(), str(workdir)))


def count_traces(monkeypatch) -> list[int]:
  """Counts how often the MAE loss is traced (a Python call of loss_fn happens only while tracing)."""
  real, traces = mae_step.MaePretraining.loss_fn, [0]

  def counted(self, *args):
    traces[0] += 1
    return real(self, *args)

  monkeypatch.setattr(mae_step.MaePretraining, "loss_fn", counted)
  return traces


@pytest.mark.slow
def test_mae_run_learns_exports_its_encoder_and_never_recompiles(tmp_path, monkeypatch):
  traces = count_traces(monkeypatch)
  config = tiny.get_config()
  config.total_steps, config.lr, config.log_every_steps = 40, 4e-2, 1
  state = train.train_and_evaluate(config, str(tmp_path))
  assert traces == [1], "the train step was traced again after the first step"
  got = losses(tmp_path)
  assert sorted(got) == list(range(1, 41))
  assert np.mean([got[s] for s in range(36, 41)]) < 0.9 * np.mean([got[s] for s in range(1, 6)])
  # The position tables are constants: not parameters (so never trained or decayed), and the export's
  # pos_embed is the sin-cos table after training.
  assert not any(
    "pos_embed" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)
  )
  model, params = export.load_pretrained(tmp_path / "export")
  assert isinstance(model, vit.VisionTransformer) and model.num_heads == config.model.num_heads
  np.testing.assert_array_equal(np.asarray(params["pos_embed"][0]), vit.sincos_pos_embed(32, 8))
  assert_trees_equal({k: v for k, v in params.items() if k != "pos_embed"}, state.params["encoder"])
  _, from_workdir = export.load_pretrained(tmp_path)
  assert_trees_equal(from_workdir, params)


@pytest.mark.slow
def test_interrupted_and_resumed_mae_run_equals_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
  reference_dir, reference = uninterrupted
  real = mae_step.MaePretraining.train_step

  def crashing(self):
    step_fn, calls = real(self), [0]

    def wrapped(state, batch):
      calls[0] += 1
      if calls[0] == 5:
        raise Crash()
      return step_fn(state, batch)

    return wrapped

  monkeypatch.setattr(mae_step.MaePretraining, "train_step", crashing)
  with pytest.raises(Crash):
    train.train_and_evaluate(tiny.get_config(), str(tmp_path))
  assert checkpointing.Checkpointer(tmp_path).all_steps() == [2, 4]
  monkeypatch.undo()
  resumed = jax.device_get(train.train_and_evaluate(tiny.get_config(), str(tmp_path)))
  expected, got = losses(reference_dir), losses(tmp_path)
  assert sorted(got) == sorted(expected) == list(range(1, 7))
  for step in range(1, 7):
    assert got[step] == pytest.approx(expected[step], rel=1e-6), step
  assert_trees_equal(resumed.params, reference.params)
  assert_trees_equal(resumed.opt_state, reference.opt_state)


@pytest.mark.slow
def test_distillation_run_adds_the_attention_loss_of_a_frozen_teacher(tmp_path):
  teacher = vit.VisionTransformer(embed_dim=48, depth=2, num_heads=3, patch_size=4, image_size=32)
  teacher_params = teacher.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
  export.save_backbone(tmp_path / "teacher", teacher, teacher_params)
  config = tiny.get_config()
  config.distill.update(enabled=True, teacher=str(tmp_path / "teacher"), blocks=(2,), teacher_heads=3)
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert state.params[mae.head_mix_name(2)].shape == (config.model.num_heads, 3)
  records = [r for r in writers.read_metrics(tmp_path / "run") if "distill_loss" in r]
  assert len(records) == 6
  for r in records:
    assert r["distill_loss"] > 0
    assert r["loss"] == pytest.approx(r["reconstruction_loss"] + r["distill_loss"], rel=1e-5)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(augment_on="host"), "MAE makes its crops in the train step"),
    (dict(interpolation="nearest"), "config.interpolation='nearest'"),
    (dict(mask_ratio=1.0), "leaves no patch visible"),
    (dict(crop_size=30), "config.crop_size=30 must be a positive multiple of the patch size 4"),
  ],
)
def test_invalid_mae_configs_fail_at_start_with_what_to_change(overrides, message, tmp_path):
  config = tiny.get_config()
  config.update(overrides)
  with pytest.raises(train.errors.UserError, match=message.replace("(", r"\(")):
    train.train_and_evaluate(config, str(tmp_path))


def test_distillation_without_a_teacher_says_how_to_give_one(tmp_path):
  config = tiny.get_config()
  config.distill.enabled = True
  with pytest.raises(train.errors.UserError, match="--config.distill.teacher=PATH"):
    train.train_and_evaluate(config, str(tmp_path))
