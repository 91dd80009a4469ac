"""Weighted k-NN classification on frozen features (DINO protocol, esvit_spec.md section 5.2).

Features come out of the sharded model batch by batch and stay where they were computed: the memory
bank is [num_batches, global_batch, D] sharded on the batch axis, so no device ever holds the whole train
split. Each test chunk is compared with every device's part of the bank, each device keeps its own top-k,
and the candidates of all devices are merged into the global top-k.
"""
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from esvit_jax import export
from esvit_jax import sharding
from esvit_jax.data import multicrop
from esvit_jax.data import normalize
from esvit_jax.data import sources
from esvit_jax.evaluate import results as results_lib

Batch = Mapping[str, np.ndarray]


def pooled_features(backbone, params, images: jax.Array, dtype) -> jax.Array:
  """The k-NN feature: the backbone's pooled final-norm feature of uint8 images, L2-normalised, float32."""
  pooled, _ = backbone.apply({"params": params}, normalize.normalize_images(images, dtype), train=False)
  pooled = pooled.astype(jnp.float32)
  return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True).clip(1e-12)


def extract_features(forward: Callable[[jax.Array], jax.Array], batches: Iterable[Batch],
                     mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs `forward` over host-local batches {'image', 'label', 'mask'} of every host.

  Returns features [num_batches, B, D], labels and mask [num_batches, B], all sharded on the batch axis
  (B is the global batch). Every host must provide the same number of batches.
  """
  batch_sharding = NamedSharding(mesh, P("data"))
  features, labels, masks = [], [], []
  for batch in batches:
    images, label, mask = (jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch[k]))
                           for k in ("image", "label", "mask"))
    features.append(forward(images))
    labels.append(label)
    masks.append(mask)
  if not features:
    raise ValueError("No batches to extract features from.")
  stacked = NamedSharding(mesh, P(None, "data"))
  stack = jax.jit(lambda xs: jnp.stack(xs), out_shardings=stacked)
  return stack(features), stack(labels), stack(masks)


def weighted_vote(similarities: jax.Array, neighbour_labels: jax.Array, num_classes: int,
                  temperature: float) -> jax.Array:
  """Class scores sum_i exp(sim_i / T) * onehot(label_i) over the neighbours: [n, k] -> [n, classes]."""
  weights = jnp.exp(similarities / temperature)
  return jnp.einsum("nk,nkc->nc", weights, jax.nn.one_hot(neighbour_labels, num_classes, dtype=weights.dtype))


def _global_top_k(test: jax.Array, bank: jax.Array, bank_labels: jax.Array, bank_mask: jax.Array, k: int,
                  mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
  """Top-k cosine similarities of each test row over the whole sharded bank, and their labels."""

  def local_then_merge(test, bank, labels, mask):
    bank, labels, mask = bank.reshape(-1, bank.shape[-1]), labels.reshape(-1), mask.reshape(-1)
    sims = jnp.where(mask[None, :], test @ bank.T, -jnp.inf)
    sims, index = jax.lax.top_k(sims, min(k, sims.shape[-1]))
    sims = jax.lax.all_gather(sims, "data", axis=1, tiled=True)
    labels = jax.lax.all_gather(labels[index], "data", axis=1, tiled=True)
    sims, index = jax.lax.top_k(sims, k)
    return sims, jnp.take_along_axis(labels, index, axis=1)

  return jax.shard_map(local_then_merge, mesh=mesh, in_specs=(P(), P(None, "data"), P(None, "data"), P(None, "data")),
                       out_specs=(P(), P()), check_vma=False)(test, bank, bank_labels, bank_mask)


def knn_classify(train: tuple[jax.Array, jax.Array, jax.Array], test: tuple[jax.Array, jax.Array, jax.Array], *,
                 num_classes: int, ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 mesh: jax.sharding.Mesh, chunk_size: int = 256) -> dict[str, float]:
  """Top-1 and top-5 accuracy (in %) of the weighted k-NN vote for every k, on L2-normalised features.

  train and test are (features, labels, mask) as returned by extract_features. Test rows are processed
  chunk_size at a time inside one compiled loop, so only one chunk's similarities exist at once.
  """
  bank, bank_labels, bank_mask = train
  num_train = int(jax.device_get(jnp.sum(bank_mask)))
  ks = sorted({min(k, num_train) for k in ks})

  @jax.jit
  def correct_counts(features, labels, mask):
    features, labels, mask = (x.reshape(-1, *x.shape[2:]) for x in (features, labels, mask))
    pad = -features.shape[0] % chunk_size
    chunks = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk_size, *x.shape[1:])
              for x in (features, labels, mask)]

    def chunk_counts(chunk):
      features, labels, mask = chunk
      sims, neighbours = _global_top_k(features, bank, bank_labels, bank_mask, ks[-1], mesh)
      counts = []
      for k in ks:
        ranked = jnp.argsort(-weighted_vote(sims[:, :k], neighbours[:, :k], num_classes, temperature), axis=-1)
        hits = ranked[:, :5] == labels[:, None]
        counts.append(jnp.stack([(hits[:, 0] & mask).sum(), (hits.any(axis=1) & mask).sum()]))
      return jnp.stack(counts)

    return jax.lax.map(chunk_counts, chunks).sum(axis=0), mask.sum()

  counts, num_test = jax.device_get(correct_counts(*test))
  results = {}
  for (top1, top5), k in zip(counts, ks):
    results[f"knn_top1_k{k}"] = 100.0 * float(top1) / float(num_test)
    if num_classes >= 5:
      results[f"knn_top5_k{k}"] = 100.0 * float(top5) / float(num_test)
  return results


def evaluate_split_pair(forward: Callable[[jax.Array], jax.Array], config, mesh: jax.sharding.Mesh, *,
                        source, ks: Sequence[int], temperature: float, max_train: int | None = None,
                        max_test: int | None = None) -> dict[str, float]:
  """k-NN accuracy of `forward` features: config.train_split as the memory bank, config.eval_split as queries.

  forward maps uint8 images [B, C, C, 3] (global, sharded) to L2-normalised features [B, D]. Images go
  through the evaluation transform (resize config.eval_resize, centre crop config.eval_crop_size).
  """
  def features_of(split, max_examples):
    ds, _ = multicrop.eval_dataset(config, split, batch_size=config.eval_batch_size, source=source,
                                   max_examples=max_examples)
    return extract_features(forward, ds.as_numpy_iterator(), mesh)

  return knn_classify(features_of(config.train_split, max_train), features_of(config.eval_split, max_test),
                      num_classes=source.num_classes, ks=ks, temperature=temperature, mesh=mesh)


def run(config, workdir: str) -> dict[str, float]:
  """configs/knn.py: k-NN of a pretrained backbone's teacher features; writes workdir/results.json."""
  if not config.pretrained:
    raise ValueError("Set --config.pretrained to an export directory or a pretraining workdir.")
  mesh = sharding.make_mesh()
  dtype = jnp.dtype(config.compute_dtype)
  model, params = export.load_pretrained(config.pretrained, dtype=dtype, sharding=sharding.replicated(mesh))
  source = sources.get_source(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)

  features = jax.jit(lambda images: pooled_features(model, params, images, dtype))
  metrics = evaluate_split_pair(features, config, mesh, source=source, ks=config.ks, temperature=config.temperature,
                                max_train=config.max_train_examples, max_test=config.max_eval_examples)
  results_lib.write(workdir, metrics, config)
  return metrics
