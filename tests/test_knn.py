"""Weighted k-NN voting against a brute-force numpy vote; sharded bank equals a one-device bank."""
import jax
import numpy as np
import pytest

from esvit_jax.evaluate import knn

NUM_CLASSES = 6


def make_batches(rng, num_examples, batch, dim, centres):
  """Noisy class clusters, L2-normalised, cut into padded batches like the evaluation pipeline's."""
  labels = rng.integers(0, NUM_CLASSES, num_examples)
  feats = centres[labels] + 1.2 * rng.normal(size=(num_examples, dim))
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  num_batches = -(-num_examples // batch)
  pad = num_batches * batch - num_examples
  feats = np.concatenate([feats, np.zeros((pad, dim))]).astype(np.float32)
  labels = np.concatenate([labels, np.zeros(pad, int)]).astype(np.int32)
  mask = np.arange(num_batches * batch) < num_examples
  return [{"image": feats[i:i + batch], "label": labels[i:i + batch], "mask": mask[i:i + batch]}
          for i in range(0, num_batches * batch, batch)], feats[:num_examples], labels[:num_examples]


def brute_force(train_f, train_l, test_f, test_l, k, temperature):
  top1 = top5 = 0
  for x, y in zip(test_f, test_l):
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
  results = knn.knn_classify(train, test, num_classes=NUM_CLASSES, ks=(1, 10, 20, 100), temperature=0.07,
                             mesh=mesh, chunk_size=24)
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
  results = knn.knn_classify(knn.extract_features(identity, train_batches, mesh),
                             knn.extract_features(identity, test_batches, mesh),
                             num_classes=NUM_CLASSES, ks=(200,), mesh=mesh)
  assert results["knn_top1_k30"] == pytest.approx(brute_force(train_f, train_l, test_f, test_l, 30, 0.07)[0])
