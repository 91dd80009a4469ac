"""Fine-tuning (esvit_jax/evaluate/finetune.py, esvit_jax/models/classifier.py): the classifier's pooling and
head, the recipes, the export of the classifier, the train step (sharded, EMA, no recompilation) and the
task in the shared loop (results, export, exact resume)."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from esvit_jax import checkpointing, errors, export, models, sharding, writers
from esvit_jax.configs import finetune as finetune_config
from esvit_jax.configs import finetune_mae_base, finetune_mae_tiny
from esvit_jax.data import multicrop, sources
from esvit_jax.evaluate import finetune
from esvit_jax.models import classifier

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, image_size=16)
TINY_SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=2, image_size=16)


def vit(**overrides):
  return models.build_backbone("vit_tiny", **{**TINY_VIT, "drop_path_rate": 0.0, **overrides})


def swin(**overrides):
  return models.build_backbone("swin_tiny", **{**TINY_SWIN, "drop_path_rate": 0.0, **overrides})


def randomised(params, key=1):
  """Every leaf replaced by noise, so that LayerNorm scales and biases are not the identity."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(key), len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, x.shape) * 0.5 + 1.0 for k, x in zip(keys, leaves, strict=True)]
  )


def layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


IMAGES = np.asarray(jax.random.normal(jax.random.key(0), (3, 16, 16, 3)))


def test_mean_patch_pooling_reads_the_pre_norm_patch_tokens_through_a_fresh_norm():
  backbone = vit()
  model = classifier.Classifier(backbone, 5, "mean_patch", head_init_std=0.02)
  params = randomised(model.init(jax.random.key(0), IMAGES)["params"])
  assert "fc_norm" in params and "norm" not in params["backbone"]  # MAE drops the pretrained final norm.
  tokens = np.asarray(backbone.apply({"params": params["backbone"]}, IMAGES, method=backbone.tokens))
  assert tokens.shape == (3, 17, 32)
  pooled = layer_norm(tokens[:, 1:].mean(axis=1), params["fc_norm"]["scale"], params["fc_norm"]["bias"])
  expected = pooled @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  np.testing.assert_allclose(model.apply({"params": params}, IMAGES), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pooling", ["cls", "pooled"])
def test_cls_and_pooled_heads_read_the_backbones_pooled_feature(pooling):
  backbone = vit() if pooling == "cls" else swin()
  model = classifier.Classifier(backbone, 4, pooling, head_init_std=0.02)
  params = randomised(model.init(jax.random.key(0), IMAGES)["params"])
  assert set(params) == {"backbone", "head"}
  pooled, regions = backbone.apply({"params": params["backbone"]}, IMAGES)
  if pooling == "pooled":  # The Swin's pooled output is the mean of its final-norm tokens.
    np.testing.assert_allclose(pooled, np.asarray(regions).mean(axis=1), rtol=1e-5, atol=1e-6)
  expected = np.asarray(pooled) @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  np.testing.assert_allclose(model.apply({"params": params}, IMAGES), expected, rtol=2e-5, atol=2e-5)


def test_a_swin_has_no_cls_token_to_pool():
  for pooling in ("cls", "mean_patch"):
    with pytest.raises(errors.UserError, match="needs a ViT"):
      classifier.Classifier(swin(), 4, pooling).init(jax.random.key(0), IMAGES)
  with pytest.raises(errors.UserError, match="use one of"):
    classifier.check_pooling(vit(), "max")


def test_the_head_starts_at_zero_or_with_small_normal_weights():
  wide = vit(embed_dim=64, num_heads=2)
  zero = classifier.Classifier(wide, 1000, "cls").init(jax.random.key(0), IMAGES)["params"]["head"]
  assert not np.any(zero["kernel"]) and not np.any(zero["bias"])
  small = classifier.Classifier(wide, 1000, "cls", 2e-5).init(jax.random.key(0), IMAGES)["params"]["head"]
  assert np.std(small["kernel"]) == pytest.approx(2e-5, rel=0.02) and not np.any(small["bias"])


def test_eval_resize_follows_the_crop_ratio():
  assert finetune.eval_resize(finetune_config.get_config()) == 256  # 224 / 0.875, as timm's crop_pct.
  assert finetune.eval_resize(finetune_config.small_data_config(32)) == 36  # 9 / 8 of the crop.


def test_recipes_carry_the_published_values():
  tiny, base, swin_recipe = (
    finetune_mae_tiny.get_config(),
    finetune_mae_base.get_config(),
    finetune_config.get_config(),
  )
  assert (tiny.epochs, tiny.batch_size, tiny.lr, tiny.warmup_epochs, tiny.layer_decay) == (
    300,
    1024,
    1e-3,
    5,
    0.85,
  )
  assert (tiny.drop_path_rate, tiny.mixup_alpha, tiny.cutmix_alpha, tiny.label_smoothing) == (
    0.0,
    0.2,
    0.0,
    0.0,
  )
  assert (tiny.randaugment, tiny.reprob, tiny.pooling, tiny.min_lr) == (
    "rand-m10-mstd0.5-inc1",
    0.0,
    "mean_patch",
    1e-6,
  )
  assert (base.epochs, base.lr, base.layer_decay, base.drop_path_rate) == (100, 5e-4, 0.65, 0.1)
  assert (base.mixup_alpha, base.cutmix_alpha, base.label_smoothing, base.reprob) == (0.8, 1.0, 0.1, 0.25)
  assert (base.randaugment, base.pooling) == ("rand-m9-mstd0.5-inc1", "mean_patch")
  assert (swin_recipe.layer_decay, swin_recipe.warmup_epochs, swin_recipe.clip_grad) == (0.9, 20, 5.0)
  assert swin_recipe.lr * swin_recipe.batch_size / 256 == pytest.approx(1.25e-3 * 2048 / 512)
  for config in (tiny, base, swin_recipe):
    assert (config.crop_size, config.eval_crop_size, config.eval_crop_ratio) == (224, 224, 0.875)
    assert (tuple(config.adam_betas), config.weight_decay, config.interpolation) == (
      (0.9, 0.999),
      0.05,
      "bicubic",
    )


def test_a_classifier_export_loads_with_its_head_or_as_a_backbone(tmp_path):
  for pooling, backbone in (("cls", vit()), ("mean_patch", vit()), ("pooled", swin())):
    model = classifier.Classifier(backbone, 3, pooling, 0.02)
    params = randomised(model.init(jax.random.key(0), IMAGES)["params"])
    path = tmp_path / pooling
    export.save_backbone(path, backbone, params, source="test", classifier=model)
    assert json.loads((path / "model.json").read_text())["classifier"] == {
      "num_classes": 3,
      "pooling": pooling,
    }
    loaded, loaded_params = export.load_pretrained(path, classifier=True)
    np.testing.assert_array_equal(
      loaded.apply({"params": loaded_params}, IMAGES), model.apply({"params": params}, IMAGES)
    )
    if pooling == "mean_patch":  # No final norm: a backbone alone would give features it never had.
      with pytest.raises(errors.UserError, match="classifier=True"):
        export.load_pretrained(path)
      continue
    alone, alone_params = export.load_pretrained(path)
    np.testing.assert_array_equal(
      alone.apply({"params": alone_params}, IMAGES)[0],
      backbone.apply({"params": params["backbone"]}, IMAGES)[0],
    )
  plain = tmp_path / "plain"
  export.save_backbone(plain, vit(), vit().init(jax.random.key(0), IMAGES)["params"])
  with pytest.raises(errors.UserError, match="without a classifier head"):
    export.load_pretrained(plain, classifier=True)


# ---------------------------------------------------------------------------------------------------------
# The train step and the task, on a small image folder of two classes.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Two classes, horizontal and vertical stripes (what RandAugment's colour and geometry ops keep)."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for split, count in (("train", 32), ("val", 8)):
    for label, name in enumerate(("horizontal", "vertical")):
      directory = root / split / name
      directory.mkdir(parents=True)
      for i in range(count):
        height, width = 20 + i % 5, 24
        stripes = (np.arange(height)[:, None] // 3 % 2) * np.ones((1, width))
        stripes = stripes if label == 0 else (np.arange(width)[None, :] // 3 % 2) * np.ones((height, 1))
        pixels = 40 + 160 * stripes[..., None] + rng.normal(0, 20, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(directory / f"{i}.png")
  return f"folder:{root}"


def tiny_config(dataset, **overrides):
  config = finetune_config.small_data_config(16)
  config.update(dataset=dataset, eval_split="val", canvas_size=32, batch_size=16, eval_batch_size=16)
  config.update(epochs=2, warmup_epochs=1, log_every_steps=2, keep_ckpts=10, lr=1e-2, ema_decay=0.9)
  config.update(mixup_alpha=0.2, cutmix_alpha=1.0, reprob=0.25, randaugment="rand-m9-mstd0.5-inc1")
  config.update(pooling="mean_patch", drop_path_rate=0.1, pretrained="unused")
  config.update(**overrides)
  return config


def first_batches(config, n):
  source = sources.get_source(config.dataset, splits=(config.train_split,), labels=True)
  dataset = multicrop.labelled_canvases(config, config.train_split, source=source)
  batches = [b for _, b in zip(range(n), dataset.as_numpy_iterator(), strict=False)]
  for b in batches:
    b.pop("skipped_files")
  return batches, source.num_classes


def run_steps(config, mesh, batches, num_classes, backbone_params):
  """(the Finetuning, its state at step 0, the params after each step, the final state, the step function)."""
  tuning = finetune.Finetuning(config, mesh, vit(), num_classes, steps_per_epoch=4)
  state = tuning.create_state(jax.random.PRNGKey(0), backbone_params)
  start, params, step = jax.device_get(state), [], tuning.train_step()
  for batch in batches:
    state, _ = step(state, sharding.global_batch(batch, mesh))
    params.append(jax.device_get(state.params))
  return tuning, start, params, jax.device_get(state), step


def test_steps_sharded_equal_one_device_keep_an_ema_and_compile_once(folder):
  config = tiny_config(folder)
  batches, num_classes = first_batches(config, 3)
  pretrained = randomised(vit().init(jax.random.key(0), IMAGES)["params"], key=2)
  _, start, params, one, _ = run_steps(
    config, sharding.make_mesh(jax.devices()[:1]), batches, num_classes, pretrained
  )
  *_, eight, step = run_steps(config, sharding.make_mesh(), batches, num_classes, pretrained)
  assert len(jax.devices()) == 8 and step._cache_size() == 1  # Three steps, one compilation.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), eight.params, one.params)
  assert int(one.step) == 3

  # The pretrained backbone was loaded, its final norm left out (mean_patch pooling).
  flat_start = flax.traverse_util.flatten_dict(start.params["backbone"])
  flat_pretrained = flax.traverse_util.flatten_dict(pretrained)
  assert set(flat_pretrained) - set(flat_start) == {("norm", "scale"), ("norm", "bias")}
  for key, value in flat_start.items():
    np.testing.assert_array_equal(value, flat_pretrained[key])

  # The EMA follows ema <- d ema + (1 - d) params after each step, from the starting weights.
  ema = start.params
  for after_step in params:
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, after_step)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one.ema_params, ema)


class Crash(Exception):
  """Stands for a process killed in the middle of a step."""


def crash_after(monkeypatch, calls):
  """Makes the task's train step raise Crash after `calls` steps."""
  real = finetune.Finetuning.train_step

  def make(self):
    step_fn, count = real(self), [0]

    def wrapped(state, batch):
      count[0] += 1
      if count[0] > calls:
        raise Crash()
      return step_fn(state, batch)

    return wrapped

  monkeypatch.setattr(finetune.Finetuning, "train_step", make)


@pytest.fixture(scope="module")
def pretrained_export(tmp_path_factory):
  path = tmp_path_factory.mktemp("pretrained") / "export"
  export.save_backbone(path, vit(), randomised(vit().init(jax.random.key(0), IMAGES)["params"], key=3))
  return str(path)


@pytest.mark.slow
def test_the_task_lowers_the_loss_writes_results_and_exports_and_resumes_exactly(
  folder, pretrained_export, tmp_path, monkeypatch
):
  config = tiny_config(folder, pretrained=pretrained_export, epochs=3)
  reference = finetune.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
  record = json.loads((tmp_path / "uninterrupted" / "results.json").read_text())
  assert record["metrics"] == reference and reference["epochs"] == 3
  losses = {r["step"]: r["loss"] for r in writers.read_metrics(tmp_path / "uninterrupted") if "loss" in r}
  assert sorted(losses) == [2, 4, 6, 8, 10, 12]
  assert np.mean([losses[10], losses[12]]) < np.mean([losses[2], losses[4]])
  assert (tmp_path / "uninterrupted" / "curves.png").exists()
  for name in ("export", "export_ema"):
    model, params = export.load_pretrained(tmp_path / "uninterrupted" / name, classifier=True)
    assert model.num_classes == 2 and model.pooling == "mean_patch" and "fc_norm" in params

  workdir = str(tmp_path / "resumed")
  crash_after(monkeypatch, 6)  # Checkpoints after each epoch of 4 steps: the run resumes from step 4.
  with pytest.raises(Crash):
    finetune.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(workdir).all_steps() == [4]
  monkeypatch.undo()
  assert finetune.train_and_evaluate(config, workdir) == reference
  resumed = {r["step"]: r["loss"] for r in writers.read_metrics(workdir) if "loss" in r}
  for step in losses:
    assert resumed[step] == pytest.approx(losses[step], rel=1e-6), step
  _, final = export.load_pretrained(tmp_path / "resumed" / "export", classifier=True)
  _, expected = export.load_pretrained(tmp_path / "uninterrupted" / "export", classifier=True)
  jax.tree.map(np.testing.assert_array_equal, final, expected)


def test_top1_and_top5_count_the_labels_among_the_highest_logits(folder):
  tuning = finetune.Finetuning(tiny_config(folder), sharding.make_mesh(), vit(), 7, steps_per_epoch=4)
  # Row i ranks its label i % 7th (0: the highest logit), so that every rank 0..6 is counted or not.
  perms = np.stack([np.random.default_rng(i).permutation(7) for i in range(16)])
  logits = np.zeros((16, 7), np.float32)
  np.put_along_axis(logits, perms, -np.arange(7, dtype=np.float32)[None], axis=1)
  labels = perms[np.arange(16), np.arange(16) % 7]
  tuning.eval_model = type(
    "Fixed", (), {"apply": staticmethod(lambda variables, images: jnp.asarray(logits))}
  )
  mask = np.arange(16) < 13  # The last three rows are padding.
  batch = {"image": np.zeros((16, 16, 16, 3), np.uint8), "label": labels, "mask": mask}
  scores = tuning.accuracy({}, iter([batch]))
  rank = (logits > logits[np.arange(16), labels][:, None]).sum(axis=1)  # Logits above the label's.
  assert scores["top1"] == pytest.approx(100 * np.sum((rank == 0) & mask) / 13)
  assert scores["top5"] == pytest.approx(100 * np.sum((rank < 5) & mask) / 13)
  assert (scores["top1"], scores["top5"]) == pytest.approx((100 * 2 / 13, 100 * 10 / 13))
