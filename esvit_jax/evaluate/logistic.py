"""Multinomial logistic regression by full-batch L-BFGS, its C search and the transfer protocol's metrics.

CLIP's linear probe, as Microsoft's toolkit runs it, fits scikit-learn's LogisticRegression(C, lbfgs,
max_iter=1000) on frozen features for each C of a 97-point grid that a parametric binary search visits,
then refits at the best C. `fit` minimises the same objective with optax's L-BFGS inside one compiled loop
and stops by scipy's L-BFGS-B rules, so a search costs seconds on an accelerator instead of hours on a CPU.
The features may be sharded on their first axis: the sums over examples become cross-device reductions.
"""

from collections.abc import Callable
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from esvit_jax import errors

GRID = np.logspace(-6, 6, 97)  # The C values of the search (C = inverse regularisation strength).
METRICS = ("accuracy", "mean_per_class")
MEMORY = 10  # L-BFGS history, optax's default and scipy's (maxcor).
MAX_LINESEARCH_STEPS = 50  # scikit-learn passes maxls=50 to scipy.
FTOL = 64 * np.finfo(np.float64).eps  # scikit-learn's relative-reduction tolerance for lbfgs.
_START_POINTS = 7  # The search starts on C = 1e-6, 1e-4, ..., 1e6.


@flax.struct.dataclass
class Fit:
  """A fitted classifier and how its optimisation ended."""

  weights: jax.Array  # [D, K]
  bias: jax.Array  # [K]
  iterations: jax.Array  # L-BFGS iterations run.
  converged: jax.Array  # The stopping rule was met before max_iter.


def objective(
  params: tuple[jax.Array, jax.Array], x: jax.Array, targets: jax.Array, weights: jax.Array, c: jax.Array
) -> jax.Array:
  """scikit-learn's multinomial objective: sum_i w_i CE(x_i W + b, y_i) / n + ||W||^2 / (2 C n).

  Args:
    params: (W [D, K], b [K]); the bias is not penalised.
    x: features [N, D].
    targets: one-hot labels times the row weights, [N, K].
    weights: row weights [N] (0 for padding rows); n is their sum.
    c: the inverse regularisation strength C.

  Returns:
    The scalar objective, in x's dtype.
  """
  w, b = params
  logits = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST) + b
  n = jnp.sum(weights)
  cross_entropy = jnp.sum(weights * jax.nn.logsumexp(logits, axis=-1)) - jnp.sum(targets * logits)
  return cross_entropy / n + jnp.sum(w * w) / (2 * c * n)


def _max_abs(tree) -> jax.Array:
  return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)]))


def fit(
  x: jax.Array,
  labels: jax.Array,
  weights: jax.Array,
  c: float | jax.Array,
  *,
  num_classes: int,
  max_iter: int = 1000,
  tol: float = 1e-4,
) -> Fit:
  """Fits scikit-learn's LogisticRegression(C=c, solver='lbfgs', max_iter, tol) from zeros.

  Stops as scipy's L-BFGS-B does for scikit-learn: when max|gradient| <= tol, when the relative reduction
  (f_k - f_k+1) / max(|f_k|, |f_k+1|, 1) <= 64 float64 eps, or after max_iter iterations. Compiled once
  per shape, dtype and num_classes: c, max_iter and tol are traced. Two classes are fitted as
  scikit-learn's binomial model: the symmetric two-class softmax with C / 2 has the same objective,
  gradients and decisions.

  Args:
    x: features [N, D], float32 (float64 with x64), possibly sharded on the first axis.
    labels: int classes [N] (any value on padding rows).
    weights: [N], 1 for examples and 0 for padding rows, which do not count.
    c: the inverse regularisation strength C.
    num_classes: K.
    max_iter: the most L-BFGS iterations.
    tol: the gradient max-norm at which the fit has converged.

  Returns:
    The Fit: weights [D, K], bias [K], iterations run and whether the stopping rule was met.
  """
  dtype = jnp.asarray(x).dtype
  return _fit(
    x,
    labels,
    weights,
    jnp.asarray(c, dtype),
    jnp.asarray(max_iter, jnp.int32),
    jnp.asarray(tol, dtype),
    num_classes=num_classes,
  )


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fit(
  x: jax.Array,
  labels: jax.Array,
  weights: jax.Array,
  c: jax.Array,
  max_iter: jax.Array,
  tol: jax.Array,
  *,
  num_classes: int,
) -> Fit:
  """fit, compiled: the arguments are arrays, so new values of c, max_iter or tol reuse the program."""
  dtype = x.dtype
  weights = weights.astype(dtype)
  x = jnp.where(weights[:, None] > 0, x, 0)  # Padding rows are zeroed, whatever they hold.
  targets = jax.nn.one_hot(labels, num_classes, dtype=dtype) * weights[:, None]
  c = c / 2 if num_classes == 2 else c
  value_fn = functools.partial(objective, x=x, targets=targets, weights=weights, c=c)
  solver = optax.lbfgs(
    memory_size=MEMORY,
    linesearch=optax.scale_by_zoom_linesearch(
      max_linesearch_steps=MAX_LINESEARCH_STEPS, initial_guess_strategy="one"
    ),
  )
  params = (jnp.zeros((x.shape[1], num_classes), dtype), jnp.zeros((num_classes,), dtype))
  value, grad = jax.value_and_grad(value_fn)(params)

  def keep_going(carry):
    *_, iteration, stop = carry
    return (iteration < max_iter) & ~stop

  def iterate(carry):
    params, state, value, grad, iteration, _ = carry
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
    params = optax.apply_updates(params, updates)
    new_value, new_grad = otu.tree_get(state, "value"), otu.tree_get(state, "grad")
    stalled = value - new_value <= FTOL * jnp.maximum(jnp.maximum(jnp.abs(value), jnp.abs(new_value)), 1)
    stop = (_max_abs(new_grad) <= tol) | stalled
    return params, state, new_value, new_grad, iteration + 1, stop

  start = (params, solver.init(params), value, grad, jnp.asarray(0, jnp.int32), _max_abs(grad) <= tol)
  (w, b), _, _, _, iterations, stop = jax.lax.while_loop(keep_going, iterate, start)
  return Fit(weights=w, bias=b, iterations=iterations, converged=stop)


def predict(fitted: Fit, x: jax.Array) -> jax.Array:
  """The classes of x under a fitted classifier.

  Args:
    fitted: what fit returned.
    x: features [N, D].

  Returns:
    int [N], the argmax of x W + b.
  """
  logits = jnp.dot(x, fitted.weights, precision=jax.lax.Precision.HIGHEST) + fitted.bias
  return jnp.argmax(logits, axis=-1)


def _best(indices: list[int], scores: dict[int, float]) -> int:
  """The first index of the strictly highest score: ties go to the earlier one."""
  best = indices[0]
  for index in indices[1:]:
    if scores[index] > scores[best]:
      best = index
  return best


def search(score: Callable[[int], float], grid_size: int = 97) -> tuple[int, dict[int, float]]:
  """The protocol's parametric binary search for the best grid index (CLIP; Microsoft's toolkit).

  Scores 7 evenly spaced indices (C = 1e-6, 1e-4, ..., 1e6 on GRID), then, for spans of half their
  spacing halved down to 1, the peak and its neighbours at that span (clipped to the grid). The peak is
  the first strict maximum in the order scored (start points ascending; then left, peak, right), so ties
  go to the smaller C, the stronger regularisation. Each index is scored once.

  Args:
    score: index into the grid -> validation score (higher is better).
    grid_size: the grid's length; (grid_size - 1) / 6 must be a power of two (97: 16).

  Returns:
    The best index, and {index: score} of every index scored, in the order scored.
  """
  spacing = (grid_size - 1) // (_START_POINTS - 1)
  if spacing < 1 or spacing * (_START_POINTS - 1) != grid_size - 1 or spacing & (spacing - 1):
    raise ValueError(f"A grid of {grid_size} points has no 7 start points a power of two apart.")
  scores: dict[int, float] = {}

  def peak_of(indices: list[int]) -> int:
    for index in indices:
      if index not in scores:
        scores[index] = float(score(index))
    return _best(indices, scores)

  peak = peak_of(list(range(0, grid_size, spacing)))
  span = spacing // 2
  while span:
    peak = peak_of([max(peak - span, 0), peak, min(peak + span, grid_size - 1)])
    span //= 2
  return peak, scores


def score(metric: str, labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
  """A transfer metric in %: top-1 accuracy, or the mean per-class recall (balanced accuracy).

  Args:
    metric: one of METRICS; 'mean_per_class' averages the recall of the classes present in labels.
    labels: int true classes [N].
    predicted: int predicted classes [N].
    num_classes: K; classes are 0..K-1.

  Returns:
    The score in %.
  """
  labels, predicted = np.asarray(labels), np.asarray(predicted)
  correct = labels == predicted
  if metric == "accuracy":
    return 100.0 * float(np.mean(correct))
  if metric == "mean_per_class":
    total = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=correct, minlength=num_classes)
    present = total > 0
    return 100.0 * float(np.mean(hits[present] / total[present]))
  raise errors.UserError(f"Transfer metric {metric!r} is unknown; use one of {METRICS}.")
