"""Weighted k-NN classification on frozen features (DINO protocol).

Features come out of the sharded model batch by batch and stay where they were computed: the memory
bank is [num_batches, global_batch, D] sharded on the batch axis, so no device ever holds the whole train
split. Each test chunk is compared with every device's part of the bank, each device keeps its own top-k,
and the candidates of all devices are merged into the global top-k.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from esvit_jax import console, errors, export, sharding
from esvit_jax.data import multicrop, normalize, sources
from esvit_jax.evaluate import results as results_lib

Batch = Mapping[str, np.ndarray]


FEATURES = ("pooled", "mean_patch")  # config.features of the k-NN: what is compared.


def frozen_features(backbone, params, images: jax.Array, dtype, features: str = "pooled") -> jax.Array:
  """A frozen backbone's feature of uint8 images, as it comes out (not normalised), float32.

  Args:
    backbone: the backbone module (any of the registry).
    params: its parameters.
    images: uint8 [B, H, W, 3].
    dtype: the compute dtype the images are normalised to.
    features: 'pooled', the backbone's pooled final-norm feature (a ViT's CLS token, a Swin's mean
      token), or 'mean_patch', the mean of its final-norm patch tokens (MAE's global pool).

  Returns:
    float32 [B, D].
  """
  if features not in FEATURES:
    raise errors.UserError(f"Features {features!r} are unknown; use one of {FEATURES}.")
  pooled, regions = backbone.apply({"params": params}, normalize.normalize_images(images, dtype), train=False)
  return (pooled if features == "pooled" else regions.mean(axis=1)).astype(jnp.float32)


def pooled_features(backbone, params, images: jax.Array, dtype, features: str = "pooled") -> jax.Array:
  """The k-NN feature of uint8 images: frozen_features, L2-normalised.

  Args:
    backbone: the backbone module.
    params: its parameters.
    images: uint8 [B, H, W, 3].
    dtype: the compute dtype the images are normalised to.
    features: 'pooled' or 'mean_patch', as for frozen_features.

  Returns:
    float32 [B, D], L2-normalised rows.
  """
  pooled = frozen_features(backbone, params, images, dtype, features)
  return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True).clip(1e-12)


def pixel_features(images: jax.Array, size: int) -> jax.Array:
  """The raw-pixel k-NN feature: uint8 [B, H, W, 3] block-averaged to size x size, each image mean-centred.

  Args:
    images: uint8 images whose height and width are multiples of size.
    size: side of the averaged image.

  Returns:
    float32 [B, size * size * 3], L2-normalised rows.
  """
  b, h, w, c = images.shape
  if h % size or w % size:
    raise errors.UserError(f"Images of {h}x{w} px cannot be block-averaged to {size} px.")
  x = images.astype(jnp.float32).reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))
  x = x.reshape(b, -1)
  x = x - x.mean(axis=-1, keepdims=True)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def extract_features(
  forward: Callable[[jax.Array], jax.Array],
  batches: Iterable[Batch],
  mesh: jax.sharding.Mesh,
  keys: Sequence[str] = ("label", "mask"),
) -> tuple[jax.Array, ...]:
  """Runs `forward` over host-local batches {'image', 'label', 'mask', ...} of every host.

  Every host must provide the same number of batches.

  Args:
    forward: global uint8 images [B, H, W, 3] (sharded on the batch axis) -> features [B, D].
    batches: this host's batches; 'mask' is False for padding rows.
    mesh: the mesh whose 'data' axis the batch is sharded on.
    keys: the batch entries returned beside the features, stacked likewise.

  Returns:
    features [num_batches, B, D], then each of `keys` [num_batches, B] (by default labels and mask), all
    sharded on the batch axis (B is the global batch).
  """
  batch_sharding = NamedSharding(mesh, P("data"))
  features, stacks = [], [[] for _ in keys]
  for batch in batches:
    features.append(
      forward(jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch["image"])))
    )
    for stack, key in zip(stacks, keys, strict=True):
      stack.append(jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[key])))
  if not features:
    raise ValueError("No batches to extract features from.")
  stack = jax.jit(lambda xs: jnp.stack(xs), out_shardings=NamedSharding(mesh, P(None, "data")))
  return stack(features), *(stack(s) for s in stacks)


def weighted_vote(
  similarities: jax.Array, neighbour_labels: jax.Array, num_classes: int, temperature: float
) -> jax.Array:
  """Class scores sum_i exp(sim_i / T) * onehot(label_i) over the neighbours: [n, k] -> [n, classes].

  Args:
    similarities: cosine similarities of each query's k neighbours, [n, k].
    neighbour_labels: the neighbours' int labels, [n, k].
    num_classes: number of classes.
    temperature: T; smaller favours the nearest neighbours.

  Returns:
    The scores, [n, num_classes], in the dtype of similarities.
  """
  weights = jnp.exp(similarities / temperature)
  return jnp.einsum("nk,nkc->nc", weights, jax.nn.one_hot(neighbour_labels, num_classes, dtype=weights.dtype))


def _global_top_k(
  test: jax.Array,
  bank: jax.Array,
  bank_labels: jax.Array,
  bank_mask: jax.Array,
  k: int,
  mesh: jax.sharding.Mesh,
) -> tuple[jax.Array, jax.Array]:
  """Top-k cosine similarities of each test row over the whole sharded bank, and their labels."""

  def local_then_merge(test, bank, labels, mask):
    bank, labels, mask = bank.reshape(-1, bank.shape[-1]), labels.reshape(-1), mask.reshape(-1)
    sims = jnp.where(mask[None, :], test @ bank.T, -jnp.inf)
    sims, index = jax.lax.top_k(sims, min(k, sims.shape[-1]))
    sims = jax.lax.all_gather(sims, "data", axis=1, tiled=True)
    labels = jax.lax.all_gather(labels[index], "data", axis=1, tiled=True)
    sims, index = jax.lax.top_k(sims, k)
    return sims, jnp.take_along_axis(labels, index, axis=1)

  return jax.shard_map(
    local_then_merge,
    mesh=mesh,
    in_specs=(P(), P(None, "data"), P(None, "data"), P(None, "data")),
    out_specs=(P(), P()),
    check_vma=False,
  )(test, bank, bank_labels, bank_mask)


def knn_classify(
  train: tuple[jax.Array, jax.Array, jax.Array],
  test: tuple[jax.Array, jax.Array, jax.Array],
  *,
  num_classes: int,
  ks: Sequence[int] = (10, 20, 100, 200),
  temperature: float = 0.07,
  mesh: jax.sharding.Mesh,
  chunk_size: int = 256,
) -> dict[str, float]:
  """Top-1 and top-5 accuracy (in %) of the weighted k-NN vote for every k, on L2-normalised features.

  train and test are (features, labels, mask) as returned by extract_features. Test rows are processed
  chunk_size at a time inside one compiled loop, so only one chunk's similarities exist at once.

  Args:
    train: the memory bank (features, labels, mask).
    test: the queries (features, labels, mask).
    num_classes: number of classes; top-5 is reported only when there are at least 5.
    ks: numbers of neighbours (each capped at the number of train examples).
    temperature: the vote's temperature (weighted_vote).
    mesh: the mesh the features are sharded over (axis 'data').
    chunk_size: test rows compared with the bank at once.

  Returns:
    {'knn_top1_k{k}': %, 'knn_top5_k{k}': %} for every k.
  """
  bank, bank_labels, bank_mask = train
  num_train = int(jax.device_get(jnp.sum(bank_mask)))
  ks = sorted({min(k, num_train) for k in ks})

  @jax.jit
  def correct_counts(features, labels, mask):
    features, labels, mask = (x.reshape(-1, *x.shape[2:]) for x in (features, labels, mask))
    pad = -features.shape[0] % chunk_size
    chunks = [
      jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk_size, *x.shape[1:])
      for x in (features, labels, mask)
    ]

    def chunk_counts(chunk):
      features, labels, mask = chunk
      sims, neighbours = _global_top_k(features, bank, bank_labels, bank_mask, ks[-1], mesh)
      counts = []
      for k in ks:
        ranked = jnp.argsort(
          -weighted_vote(sims[:, :k], neighbours[:, :k], num_classes, temperature), axis=-1
        )
        hits = ranked[:, :5] == labels[:, None]
        counts.append(jnp.stack([(hits[:, 0] & mask).sum(), (hits.any(axis=1) & mask).sum()]))
      return jnp.stack(counts)

    return jax.lax.map(chunk_counts, chunks).sum(axis=0), mask.sum()

  counts, num_test = jax.device_get(correct_counts(*test))
  results = {}
  for (top1, top5), k in zip(counts, ks, strict=False):
    results[f"knn_top1_k{k}"] = 100.0 * float(top1) / float(num_test)
    if num_classes >= 5:
      results[f"knn_top5_k{k}"] = 100.0 * float(top5) / float(num_test)
  return results


def evaluate_split_pair(
  forward: Callable[[jax.Array], jax.Array],
  config,
  mesh: jax.sharding.Mesh,
  *,
  source,
  ks: Sequence[int],
  temperature: float,
  max_train: int | None = None,
  max_test: int | None = None,
) -> dict[str, float]:
  """k-NN accuracy of `forward` features: config.train_split as the memory bank, config.eval_split as queries.

  forward maps uint8 images [B, C, C, 3] (global, sharded) to L2-normalised features [B, D]. Images go
  through the evaluation transform (resize config.eval_resize, centre crop config.eval_crop_size).

  Args:
    forward: the feature function, as above.
    config: the evaluation config (splits, eval_batch_size, eval_resize, eval_crop_size).
    mesh: the mesh to shard the batches over (axis 'data').
    source: the sources.Source to read both splits from (it gives num_classes).
    ks: numbers of neighbours.
    temperature: the vote's temperature.
    max_train: use only the first max_train train examples (None: all).
    max_test: use only the first max_test eval examples (None: all).

  Returns:
    The accuracies of knn_classify.
  """

  def features_of(split, max_examples):
    ds, _ = multicrop.eval_dataset(
      config, split, batch_size=config.eval_batch_size, source=source, max_examples=max_examples
    )
    return extract_features(forward, ds.as_numpy_iterator(), mesh)

  return knn_classify(
    features_of(config.train_split, max_train),
    features_of(config.eval_split, max_test),
    num_classes=source.num_classes,
    ks=ks,
    temperature=temperature,
    mesh=mesh,
  )


def evaluate_pixels(
  config,
  mesh: jax.sharding.Mesh,
  *,
  source,
  ks: Sequence[int],
  temperature: float,
  max_train: int | None = None,
  max_test: int | None = None,
) -> dict[str, float]:
  """k-NN accuracy on raw pixels, the baseline that learned features must beat, through evaluate_split_pair.

  Each image goes through the evaluation transform at twice config.eval_crop_size (resize and crop both
  2C: a square image is kept whole), is 2 x 2 averaged to C px and mean-centred (pixel_features).

  Args:
    config: the evaluation config, as for evaluate_split_pair.
    mesh: the mesh to shard the batches over (axis 'data').
    source: the sources.Source to read both splits from.
    ks: numbers of neighbours.
    temperature: the vote's temperature.
    max_train: use only the first max_train train examples (None: all).
    max_test: use only the first max_test eval examples (None: all).

  Returns:
    The accuracies of knn_classify.
  """
  size = config.eval_crop_size
  pixel_config = config.copy_and_resolve_references()
  pixel_config.eval_resize = pixel_config.eval_crop_size = 2 * size
  forward = jax.jit(functools.partial(pixel_features, size=size))
  return evaluate_split_pair(
    forward,
    pixel_config,
    mesh,
    source=source,
    ks=ks,
    temperature=temperature,
    max_train=max_train,
    max_test=max_test,
  )


def run(config, workdir: str) -> dict[str, float]:
  """configs/knn.py: k-NN of a pretrained backbone's teacher features; writes workdir/results.json.

  Args:
    config: a configs/knn.py config; config.pretrained names an export directory or pretraining workdir.
    workdir: where results.json is written.

  Returns:
    The accuracies of knn_classify.
  """
  if not config.pretrained:
    raise errors.UserError("Set --config.pretrained to an export directory or a pretraining workdir.")
  mesh = sharding.make_mesh()
  dtype = jnp.dtype(config.compute_dtype)
  model, params = export.load_pretrained(config.pretrained, dtype=dtype, sharding=sharding.replicated(mesh))
  source = sources.get_source(
    config.dataset,
    data_dir=config.data_dir,
    manual_dir=config.manual_dir,
    splits=(config.train_split, config.eval_split),
    labels=True,
  )

  num_train, num_test = (
    min(source.num_examples(split), limit or source.num_examples(split))
    for split, limit in (
      (config.train_split, config.max_train_examples),
      (config.eval_split, config.max_eval_examples),
    )
  )
  console.detail(
    f"{type(model).__name__} from {config.pretrained}; {source.describe()}: {num_train:,} "
    f"{config.train_split} images as the memory bank, {num_test:,} {config.eval_split} images as queries"
  )
  features = jax.jit(lambda images: pooled_features(model, params, images, dtype, config.features))
  metrics = evaluate_split_pair(
    features,
    config,
    mesh,
    source=source,
    ks=config.ks,
    temperature=config.temperature,
    max_train=config.max_train_examples,
    max_test=config.max_eval_examples,
  )
  results_lib.write(workdir, metrics, config)
  console.say(results_table(metrics, config.temperature))
  return metrics


def results_table(metrics: Mapping[str, float], temperature: float) -> str:
  """The k-NN accuracies as a table for the console: one row per k, top-1 and top-5.

  Args:
    metrics: what knn_classify returns.
    temperature: the vote's temperature, for the title.

  Returns:
    The title and the table, as text.
  """
  ks = sorted(int(name.rpartition("_k")[2]) for name in metrics if name.startswith("knn_top1_k"))
  rows = [
    [k, f"{metrics[f'knn_top1_k{k}']:.2f}%"]
    + ([f"{metrics[f'knn_top5_k{k}']:.2f}%"] if f"knn_top5_k{k}" in metrics else [])
    for k in ks
  ]
  header = ["k", "top-1", "top-5"][: len(rows[0]) if rows else 2]
  return f"k-NN accuracy (weighted vote, T={temperature}):\n" + console.table(header, rows)
