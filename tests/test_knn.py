"""Weighted k-NN voting against a brute-force numpy vote; sharded bank equals a one-device bank; the
evaluations' matmul precision setting."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esvit_jax import errors, tasks, train_step
from esvit_jax.configs import knn as knn_config
from esvit_jax.configs import linear_probe as linear_config
from esvit_jax.evaluate import knn, linear
from esvit_jax.models import vit
from tests.configs import tiny

NUM_CLASSES = 6


def make_batches(rng, num_examples, batch, dim, centres):
  """Noisy class clusters, L2-normalised, cut into padded batches like the evaluation pipeline's. The
  padding rows hold the features of class 1's centre labelled 0, as a padded image has features too: a
  vote that counted them would go wrong."""
  labels = rng.integers(0, NUM_CLASSES, num_examples)
  feats = centres[labels] + 1.2 * rng.normal(size=(num_examples, dim))
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  num_batches = -(-num_examples // batch)
  pad = num_batches * batch - num_examples
  padding = np.tile(centres[1] / np.linalg.norm(centres[1]), (pad, 1))
  feats = np.concatenate([feats, padding]).astype(np.float32)
  labels = np.concatenate([labels, np.zeros(pad, int)]).astype(np.int32)
  mask = np.arange(num_batches * batch) < num_examples
  return (
    [
      {"image": feats[i : i + batch], "label": labels[i : i + batch], "mask": mask[i : i + batch]}
      for i in range(0, num_batches * batch, batch)
    ],
    feats[:num_examples],
    labels[:num_examples],
  )


def brute_force(train_f, train_l, test_f, test_l, k, temperature):
  top1 = top5 = 0
  for x, y in zip(test_f, test_l, strict=False):
    sims = train_f @ x
    nearest = np.argsort(-sims, kind="stable")[:k]
    scores = np.zeros(NUM_CLASSES)
    for i in nearest:
      scores[train_l[i]] += np.exp(sims[i] / temperature)
    order = np.argsort(-scores, kind="stable")
    top1 += order[0] == y
    top5 += y in order[:5]
  return 100 * top1 / len(test_l), 100 * top5 / len(test_l)


@pytest.mark.parametrize("num_devices", [8, 1])
def test_knn_matches_brute_force(num_devices):
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(NUM_CLASSES, 16))
  train_batches, train_f, train_l = make_batches(rng, 203, 32, 16, centres)
  test_batches, test_f, test_l = make_batches(rng, 77, 16, 16, centres)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",))
  identity = jax.jit(lambda x: x)
  train = knn.extract_features(identity, train_batches, mesh)
  test = knn.extract_features(identity, test_batches, mesh)
  results = knn.knn_classify(
    train, test, num_classes=NUM_CLASSES, ks=(1, 10, 20, 100), temperature=0.07, mesh=mesh, chunk_size=24
  )
  accuracies = set()
  for k in (1, 10, 20, 100):
    top1, top5 = brute_force(train_f, train_l, test_f, test_l, k, 0.07)
    assert results[f"knn_top1_k{k}"] == pytest.approx(top1)
    assert results[f"knn_top5_k{k}"] == pytest.approx(top5)
    accuracies.add(round(top1, 3))
  assert len(accuracies) > 1  # The data makes k matter, so a vote that ignores k would fail.


def test_k_larger_than_bank_is_clamped():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(NUM_CLASSES, 8))
  train_batches, train_f, train_l = make_batches(rng, 30, 16, 8, centres)
  test_batches, test_f, test_l = make_batches(rng, 10, 16, 8, centres)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  identity = jax.jit(lambda x: x)
  results = knn.knn_classify(
    knn.extract_features(identity, train_batches, mesh),
    knn.extract_features(identity, test_batches, mesh),
    num_classes=NUM_CLASSES,
    ks=(200,),
    mesh=mesh,
  )
  assert results["knn_top1_k30"] == pytest.approx(brute_force(train_f, train_l, test_f, test_l, 30, 0.07)[0])


def test_knn_features_are_the_l2_normalised_pooled_backbone_features():
  """pooled_features divides the backbone's pooled output of the normalised images by its L2 norm."""
  backbone = train_step.build_model(tiny.get_config()).backbone
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  params = jax.jit(backbone.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  normalised = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  pooled = jax.jit(backbone.apply)({"params": params}, jnp.asarray(normalised, jnp.float32))[0]
  pooled = np.asarray(pooled, np.float64)
  features = jax.jit(lambda x: knn.pooled_features(backbone, params, x, jnp.float32))(images)
  assert np.abs(np.linalg.norm(pooled, axis=-1) - 1).min() > 0.1  # The backbone's own norms are not 1.
  error = np.abs(features - pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)).max()
  print("pooled_features - numpy L2-normalised pooled features:", error)
  assert error < 5e-7  # Measured: 1.5e-7.


def test_mean_patch_knn_features_are_the_l2_normalised_mean_of_the_patch_tokens():
  """features='mean_patch' (MAE's global pool) averages a ViT's final-norm patch tokens, not its CLS."""
  backbone = vit.VisionTransformer(embed_dim=32, depth=2, num_heads=4, patch_size=8, image_size=32)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  params = jax.jit(backbone.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  normalised = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  regions = np.asarray(jax.jit(backbone.apply)({"params": params}, jnp.asarray(normalised, jnp.float32))[1])
  mean = regions.astype(np.float64).mean(axis=1)
  features = jax.jit(lambda x: knn.pooled_features(backbone, params, x, jnp.float32, "mean_patch"))(images)
  error = np.abs(features - mean / np.linalg.norm(mean, axis=-1, keepdims=True)).max()
  assert error < 5e-7
  with pytest.raises(errors.UserError, match="mean_patch"):
    knn.pooled_features(backbone, params, images, jnp.float32, "patches")


def lower_evaluation(config, workdir) -> list[str]:
  """Stands in for an evaluation task: the StableHLO of what the tasks compile, lowered where they would
  be (inside tasks.run): the k-NN similarity and top-k, a backbone's k-NN features, the probe's step."""
  del config, workdir
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  similarity = jax.jit(
    lambda test, bank, labels, mask: knn._global_top_k(  # pylint: disable=protected-access
      test, bank, labels, mask, 5, mesh
    )
  )
  texts = [
    similarity.lower(
      jnp.zeros((4, 16)), jnp.zeros((2, 8, 16)), jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), bool)
    ).as_text()
  ]
  backbone = train_step.build_model(tiny.get_config()).backbone
  images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  params = jax.eval_shape(lambda: backbone.init(jax.random.key(0), images.astype(jnp.float32)))["params"]
  features = jax.jit(lambda p, x: knn.pooled_features(backbone, p, x, jnp.float32))
  texts.append(features.lower(params, images).as_text())
  probe = linear.Probe(lambda x: x, 16, 5, linear.make_optimizer(linear_config.get_config(), 10), mesh)
  batch = {
    "image": jax.ShapeDtypeStruct((8, 16), jnp.float32),
    "label": jax.ShapeDtypeStruct((8,), jnp.int32),
  }
  texts.append(probe.train.lower(probe.abstract_state, batch).as_text())
  return texts


@pytest.mark.parametrize("task", ["knn", "linear_probe"])
@pytest.mark.parametrize("precision,expected", [(None, "HIGHEST"), ("default", "DEFAULT")])
def test_evaluation_matmul_precision_setting_reaches_every_compiled_matmul(
  monkeypatch, task, precision, expected
):
  config = (knn_config if task == "knn" else linear_config).get_config()
  if precision:
    config.matmul_precision = precision  # Else the configs' default, 'highest'.
  monkeypatch.setitem(tasks.TASKS, task, "tests.test_knn:lower_evaluation")
  for text in tasks.run(config, "unused"):
    ops = [line for line in text.splitlines() if re.search(r"stablehlo\.(dot_general|convolution)", line)]
    assert ops
    for op in ops:
      assert set(re.findall(r"\b(DEFAULT|HIGH|HIGHEST)\b", op)) == {expected}, op


def test_unknown_matmul_precision_is_a_user_error():
  config = knn_config.get_config()
  config.matmul_precision = "fastest"
  with pytest.raises(errors.UserError, match="Matmul precision 'fastest' is unknown"):
    tasks.run(config, "unused")
