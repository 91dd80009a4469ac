"""The transfer protocol's classifier: logistic regression equal to scikit-learn's, its C search, its metrics.

References are scikit-learn 1.9.1 (LogisticRegression, accuracy_score, balanced_accuracy_score) and a
search written here from the toolkit's description. Fits run in float64 (x64 is switched on per test).
"""

import warnings

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from sklearn import linear_model, metrics

from esvit_jax import errors, sharding
from esvit_jax.evaluate import logistic

N, D, K = 2000, 32, 5


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def overlapping_classes(
  n: int = N, d: int = D, k: int = K, seed: int = 0, spread: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
  """Class means (spread times unit normals) plus unit noise: the classes overlap and C changes the fit."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  return rng.normal(size=(k, d))[labels] * spread + rng.normal(size=(n, d)), labels


def sklearn_fit(x, labels, c, tol=1e-10, max_iter=1000):
  return linear_model.LogisticRegression(C=c, tol=tol, max_iter=max_iter).fit(x, labels)


def ours(x, labels, c, num_classes=K, **kwargs) -> logistic.Fit:
  return logistic.fit(x, labels, np.ones(len(labels)), c, num_classes=num_classes, **kwargs)


def centred(bias) -> np.ndarray:
  bias = np.asarray(bias)
  return bias - bias.mean()


def numpy_gradient(x, labels, weights, bias, c) -> np.ndarray:
  """The gradient of scikit-learn's objective, written out: X^T (softmax - onehot) / n + W / (C n); b's."""
  logits = x @ weights + bias
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  residual = (probs - np.eye(weights.shape[1])[labels]) / len(x)
  return np.concatenate([(x.T @ residual + weights / (c * len(x))).ravel(), residual.sum(axis=0)])


@pytest.mark.parametrize("c", [1e-3, 1.0, 1e3])
def test_fit_equals_sklearn_logistic_regression(x64, c):
  x, labels = overlapping_classes()
  reference = sklearn_fit(x, labels, c)
  fitted = ours(x, labels, c, tol=1e-10)
  assert fitted.weights.dtype == np.float64 and bool(fitted.converged)
  # Measured: at most 7e-7 relative on the coefficients, 3.4e-6 on the centred bias.
  scale = np.abs(reference.coef_).max()
  np.testing.assert_allclose(np.asarray(fitted.weights), reference.coef_.T, rtol=0, atol=2e-6 * scale)
  np.testing.assert_allclose(centred(fitted.bias), centred(reference.intercept_), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(logistic.predict(fitted, x)), reference.predict(x))


@pytest.mark.parametrize("c", [1e-3, 1e3])
def test_two_classes_fit_sklearns_binomial_model(x64, c):
  """scikit-learn fits one coefficient vector for two classes; our two columns differ by exactly it."""
  x, labels = overlapping_classes()
  labels = (labels > 1).astype(np.int32)
  reference = sklearn_fit(x, labels, c)
  fitted = ours(x, labels, c, num_classes=2, tol=1e-10)
  weights, bias = np.asarray(fitted.weights), np.asarray(fitted.bias)
  # Measured: 8e-8 relative.
  scale = np.abs(reference.coef_).max()
  np.testing.assert_allclose(weights[:, 1] - weights[:, 0], reference.coef_[0], rtol=0, atol=1e-6 * scale)
  np.testing.assert_allclose(bias[1] - bias[0], reference.intercept_[0], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(logistic.predict(fitted, x)), reference.predict(x))


@pytest.mark.parametrize("tol", [1e-10, 1e-4])
def test_padding_rows_of_weight_zero_do_not_count(x64, tol):
  """As many padding rows as examples: counted, they would halve the gradient and move the stopping point."""
  x, labels = overlapping_classes()
  rng = np.random.default_rng(1)
  garbage = rng.normal(scale=100.0, size=(N, D))
  garbage[:2, :3] = np.nan, np.inf, -np.inf
  padded_x = np.concatenate([x, garbage])
  padded_labels = np.concatenate([labels, rng.integers(-1, K + 1, N)])
  weights = np.concatenate([np.ones(N), np.zeros(N)])
  padded = logistic.fit(padded_x, padded_labels, weights, 1.0, num_classes=K, tol=tol)
  plain = ours(x, labels, 1.0, tol=tol)
  assert int(padded.iterations) == int(plain.iterations)
  # Measured: 3e-9 (more rows sum in another order, and the stopping point moves with the roundings).
  np.testing.assert_allclose(np.asarray(padded.weights), np.asarray(plain.weights), rtol=0, atol=1e-8)
  np.testing.assert_allclose(np.asarray(padded.bias), np.asarray(plain.bias), rtol=0, atol=1e-8)


@pytest.mark.parametrize("c", [1e-3, 1.0, 1e3])
def test_default_tol_stops_where_sklearn_stops(x64, c):
  x, labels = overlapping_classes()
  reference = sklearn_fit(x, labels, c, tol=1e-4)
  fitted = ours(x, labels, c)
  # Measured: the same count (9, 21, 23); the line searches differ (optax's zoom, scipy's dcsrch).
  assert abs(int(fitted.iterations) - int(reference.n_iter_[0])) <= 2
  assert bool(fitted.converged)
  weights, bias = np.asarray(fitted.weights), np.asarray(fitted.bias)
  assert np.abs(numpy_gradient(x, labels, weights, bias, c)).max() <= 1e-4
  np.testing.assert_array_equal(np.asarray(logistic.predict(fitted, x)), reference.predict(x))


def test_max_iter_caps_the_iterations_and_reports_no_convergence(x64):
  x, labels = overlapping_classes()
  fitted = ours(x, labels, 1e3, max_iter=3)
  assert int(fitted.iterations) == 3 and not bool(fitted.converged)
  assert np.abs(numpy_gradient(x, labels, *map(np.asarray, (fitted.weights, fitted.bias)), 1e3)).max() > 1e-4


def test_a_new_c_tol_or_max_iter_does_not_recompile(x64):
  x, labels = overlapping_classes(n=256, d=8, k=3)
  ours(x, labels, 1.0, num_classes=3)
  compiled = logistic._fit._cache_size()
  for c in (1e-2, 10.0, np.float64(3.0), np.float32(1e3)):
    ours(x, labels, c, num_classes=3, tol=1e-6, max_iter=50)
  assert logistic._fit._cache_size() == compiled


def test_fit_sharded_over_8_devices_equals_one_device(x64):
  x, labels = overlapping_classes()
  batch = NamedSharding(sharding.make_mesh(), P("data"))
  assert len(jax.devices()) == 8
  sharded = logistic.fit(
    *(jax.device_put(v, batch) for v in (x, labels, np.ones(N))), 1.0, num_classes=K, tol=1e-10
  )
  assert len(sharded.weights.sharding.device_set) == 8
  single = ours(x, labels, 1.0, tol=1e-10)
  assert int(sharded.iterations) == int(single.iterations)
  # Measured: 3e-9 (the sums over examples add up in another order, as with padding rows).
  np.testing.assert_allclose(np.asarray(sharded.weights), np.asarray(single.weights), rtol=0, atol=1e-8)
  np.testing.assert_allclose(np.asarray(sharded.bias), np.asarray(single.bias), rtol=0, atol=1e-8)


def reference_search(score_of_c) -> tuple[float, list[float]]:
  """The toolkit's sweep, written from its description: the chosen C and every C scored, in order."""
  grid = list(np.logspace(-6, 6, num=97))
  scores = {}
  for c in np.logspace(-6, 6, num=7):
    scores[grid.index(c)] = score_of_c(c)
  peak = max(scores, key=lambda i: (scores[i], -i))  # Highest score; of equal ones, the smallest C.
  for span in [8, 4, 2, 1]:
    candidates = [max(peak - span, 0), peak, min(peak + span, 96)]
    for i in candidates:
      if i not in scores:
        scores[i] = score_of_c(grid[i])
    best = candidates[0]
    for i in candidates:
      if scores[i] > scores[best]:
        best = i
    peak = best
  return grid[peak], [grid[i] for i in scores]


def test_search_picks_the_c_of_the_reference_protocol_run_with_sklearn(x64):
  """Few examples in many dimensions: too weak a penalty overfits, too strong underfits."""
  x, labels = overlapping_classes(n=600, d=64, k=4, seed=3, spread=0.2)
  train, val = slice(0, 150), slice(150, None)

  def sklearn_score(c):
    predicted = sklearn_fit(x[train], labels[train], c).predict(x[val])
    return metrics.balanced_accuracy_score(labels[val], predicted)

  def our_score(index):
    fitted = ours(x[train], labels[train], logistic.GRID[index], num_classes=4, tol=1e-10)
    return logistic.score("mean_per_class", labels[val], np.asarray(logistic.predict(fitted, x[val])), 4)

  best, scores = logistic.search(our_score)
  assert best == 33, scores  # Measured: an interior optimum (val scores 25% to 64.6%), all 15 scored.
  assert len(scores) == 15
  assert logistic.GRID[best] == reference_search(sklearn_score)[0]


def counted(score):
  calls = []

  def scored(index):
    calls.append(index)
    return score(index)

  return scored, calls


@pytest.mark.parametrize("target", range(97))
def test_search_finds_the_peak_of_every_unimodal_score(target):
  scored, calls = counted(lambda i: -abs(i - target))
  best, scores = logistic.search(scored)
  assert best == target
  assert len(calls) == len(set(calls)) == len(scores) <= 15
  assert list(scores)[:7] == [0, 16, 32, 48, 64, 80, 96] and list(scores) == calls
  reference_c, reference_order = reference_search(lambda c: -abs(list(logistic.GRID).index(c) - target))
  assert logistic.GRID[best] == reference_c and list(logistic.GRID[calls]) == reference_order


def test_search_ties_go_to_the_smaller_c():
  best, scores = logistic.search(lambda i: float(40 <= i <= 60))  # A plateau: the left edge wins.
  assert best == 40 and scores[48] == scores[56] == 1.0
  best, scores = logistic.search(lambda i: 0.5)
  assert best == 0 and list(scores) == [0, 16, 32, 48, 64, 80, 96, 8, 4, 2, 1]


@pytest.mark.parametrize(
  ("score", "end", "after_start"), [(lambda i: -i, 0, [8, 4, 2, 1]), (lambda i: i, 96, [88, 92, 94, 95])]
)
def test_search_clips_at_the_ends_of_the_grid(score, end, after_start):
  scored, calls = counted(score)
  best, _ = logistic.search(scored)
  assert best == end and calls == [0, 16, 32, 48, 64, 80, 96] + after_start


def test_grid_is_the_protocols():
  assert logistic.GRID.shape == (97,)
  np.testing.assert_array_equal(logistic.GRID[::16], np.logspace(-6, 6, 7))
  assert logistic.GRID[0] == 1e-6 and logistic.GRID[96] == 1e6


def test_metrics_equal_sklearns_on_unbalanced_classes():
  rng = np.random.default_rng(0)
  labels = rng.choice(6, size=500, p=[0.5, 0.2, 0.15, 0.1, 0.05, 0.0])  # Class 5 never occurs.
  predicted = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 6, 500))
  assert logistic.score("accuracy", labels, predicted, 6) == pytest.approx(
    100 * metrics.accuracy_score(labels, predicted), abs=1e-12
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns that predictions hold a class absent from labels.
    balanced = metrics.balanced_accuracy_score(labels, predicted)
  assert logistic.score("mean_per_class", labels, predicted, 6) == pytest.approx(100 * balanced, abs=1e-12)


def test_metrics_on_a_hand_case():
  labels, predicted = np.array([0, 0, 0, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 0])
  assert logistic.score("accuracy", labels, predicted, 4) == pytest.approx(100 * 4 / 6)
  assert logistic.score("mean_per_class", labels, predicted, 4) == pytest.approx(
    100 * (2 / 3 + 1 + 1 / 2) / 3
  )


def test_an_unknown_metric_names_the_known_ones():
  with pytest.raises(errors.UserError, match="accuracy.*mean_per_class"):
    logistic.score("top5", np.zeros(3, int), np.zeros(3, int), 2)
