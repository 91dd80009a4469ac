"""The train loop's input pipelines: multi-crop pretraining, evaluation, and linear-probe training.

All emit uint8 images (what the PIL pipeline holds before ToTensor); the train step normalises on device,
which moves 4x fewer bytes from host to device than float32. Pretraining has two modes (config.augment_on):
'device' ships each decoded image in a fixed canvas and the train step makes the crops
(data/device_augment.py); 'host' makes the crops here with the PIL-exact TensorFlow ops (data/augment.py).

Training streams are infinite and exactly resumable. Global batch k holds the examples at positions
[k * B, (k + 1) * B) of the global stream, where epoch e is a permutation (seeded by (config.seed, e)) cut
to steps_per_epoch * B examples (the remainder is dropped, as torch's drop_last does); host i reads rows
[i * b, (i + 1) * b) of each global batch (b = B / processes). Each example's augmentation is drawn from a
stateless seed of (config.seed, its global position), so parallel maps are reproducible, a stream
restarted at start_step continues with exactly batch start_step (the records before it are skipped
undecoded), and, for sources with random access (demo, folders, TFDS datasets stored as ArrayRecord, whose
skipped records are not even read), the global batches are the same for any number of hosts, so a
checkpoint can resume on another number of hosts. TFDS datasets stored only as TFRecord are read as
per-host slices of their files (sources.TfdsRecordSource): there a resume must keep the number of hosts.
A resume must keep config.seed and config.batch_size.

A file that cannot be decoded takes, in its batch, the place of a copy of a good example of the same
batch (so the batch keeps its size and the stream its positions); every batch carries 'skipped_files', an
int32 scalar: how many of this host's examples in the batch were such files (0-d, so sharding.global_batch
keeps it as host-local metadata; summed over steps it is the host's count of bad files).
"""

from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf

from esvit_jax import errors
from esvit_jax.data import augment, constants, sources

AUGMENT_ON = ("device", "host")  # Where the pretraining crops are made (config.augment_on).
GLOBAL_BLUR_PROB = constants.GLOBAL_BLUR_PROB
GLOBAL_SOLARIZE_PROB = constants.GLOBAL_SOLARIZE_PROB
LOCAL_BLUR_PROB = constants.LOCAL_BLUR_PROB


def steps_per_epoch(
  config: ml_collections.ConfigDict, num_examples: int, batch_size: int | None = None
) -> int:
  """Full global batches (config.batch_size unless given, over all hosts) in a pass over num_examples.

  Args:
    config: the run's config (its batch_size).
    num_examples: examples in the pass.
    batch_size: the global batch size, if not config.batch_size.

  Returns:
    num_examples // batch_size; raises errors.UserError if that is 0.
  """
  batch_size = batch_size or config.batch_size
  if num_examples < batch_size:
    raise errors.UserError(f"The split has {num_examples} examples, fewer than one batch of {batch_size}")
  return num_examples // batch_size


def host_batch_size(batch_size: int, shard: sources.HostShard) -> int:
  """This host's share of a global batch.

  Args:
    batch_size: the global batch size.
    shard: this host's shard.

  Returns:
    batch_size // process_count; raises errors.UserError if it does not divide.
  """
  if batch_size % shard.process_count:
    raise errors.UserError(f"Batch size {batch_size} does not split over {shard.process_count} processes")
  return batch_size // shard.process_count


def multicrop_views(image: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict) -> dict:
  """DataAugmentationDINO on one decoded image: {'globals': uint8 [2, G, G, 3], 'locals': [N, L, L, 3]}.

  Global crop 1 is always blurred, global crop 2 blurred with p 0.1 and solarised with p 0.2, the local
  crops blurred with p 0.5; all share the flip, colour jitter and grayscale steps (augment.dino_views).

  Args:
    image: decoded image, uint8 [H, W, 3].
    seed: int [2] stateless seed of this example.
    config: global_crop_size, local_crop_size, num_local_crops, global_crop_scale, local_crop_scale,
      color_jitter, blur_sigma.

  Returns:
    {'globals': uint8 [2, G, G, 3], 'locals': uint8 [N, L, L, 3]}.
  """
  seed_global, seed_local = augment.split_seed(seed, 2)
  n = config.num_local_crops
  jitter = dict(zip(constants.JITTER_STRENGTH, config.color_jitter, strict=False))
  return {
    "globals": augment.dino_views(
      image,
      seed_global,
      config.global_crop_size,
      config.global_crop_scale,
      GLOBAL_BLUR_PROB,
      GLOBAL_SOLARIZE_PROB,
      jitter,
      config.blur_sigma,
    ),
    "locals": augment.dino_views(
      image,
      seed_local,
      config.local_crop_size,
      config.local_crop_scale,
      (LOCAL_BLUR_PROB,) * n,
      (0.0,) * n,
      jitter,
      config.blur_sigma,
    ),
  }


def canvas_view(image: tf.Tensor, canvas_size: int) -> dict:
  """One decoded image in a fixed canvas, for crops made on the device: {'canvas': uint8 [S, S, 3] with the
  image in its top-left corner and zeros elsewhere, 'image_size': int32 [2], its (height, width)}.

  An image larger than the canvas is first shrunk, aspect kept, until its longer side is S, by area
  averaging (a box filter as wide as the scale: antialiased, and 6x cheaper on the host than TensorFlow's
  antialiased bicubic, measured on 1200 x 1600 JPEGs). After the decoder's DCT scaling
  (sources.decode_image) it is at most about twice S; images that fit (ImageNet's typical 500 x 375 in
  512) are not touched.

  Args:
    image: decoded image, uint8 [h, w, 3].
    canvas_size: the canvas side S.

  Returns:
    {'canvas': uint8 [S, S, 3], 'image_size': int32 [2]}.
  """
  shape = tf.shape(image)[:2]
  longer = tf.reduce_max(shape)

  def shrink():
    scale = canvas_size / tf.cast(longer, tf.float64)
    size = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float64) * scale), tf.int32), 1)
    resized = tf.image.resize(image, size, method="area")
    return tf.cast(tf.round(resized), tf.uint8)  # An average of uint8 pixels: no clipping needed.

  image = tf.cond(longer > canvas_size, shrink, lambda: image)
  return {
    "canvas": tf.image.pad_to_bounding_box(image, 0, 0, canvas_size, canvas_size),
    "image_size": tf.shape(image, out_type=tf.int32)[:2],
  }


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return ds.with_options(options)


def _count_bad(ok: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(tf.cast(tf.logical_not(ok), tf.int32))


def _replace_bad_rows(batch: dict) -> dict:
  """Rows with ok=False take a copy of a good row of the batch (all rows stay if none is good)."""
  ok = batch.pop("ok")
  good = tf.cast(tf.where(ok)[:, 0], tf.int32)
  rows = tf.range(tf.shape(ok)[0])
  fill = tf.gather(good, rows % tf.maximum(tf.size(good), 1))
  source_row = tf.where(ok | (tf.size(good) == 0), rows, fill)
  out = {k: tf.gather(v, source_row) for k, v in batch.items()}
  out["skipped_files"] = _count_bad(ok)
  return out


def training_batches(
  config: ml_collections.ConfigDict,
  source: sources.Source,
  split: str,
  batch_size: int,
  start_step: int,
  shard: sources.HostShard,
  transform: Callable[[dict, tf.Tensor], dict],
  max_side: int | None = None,
) -> tf.data.Dataset:
  """Infinite, resumable host batches of transform(decoded example, its seed) (see the module doc).

  Args:
    config: the run's config (seed, shuffle_buffer, batch_size).
    source: the dataset.
    split: the split to read.
    batch_size: the global batch size (over all hosts).
    start_step: how many batches were already consumed: the stream starts with batch start_step.
    shard: this host's shard.
    transform: (decoded example {'image', 'label', ...}, int64 [2] seed) -> the example's features.
    max_side: passed to source.load (large JPEGs may be decoded shrunk, longer side >= max_side).

  Returns:
    Batches of batch_size // process_count rows of transform's features, plus 'skipped_files' int32 [].
  """
  host_batch = host_batch_size(batch_size, shard)
  steps = steps_per_epoch(config, source.num_examples(split), batch_size)
  first_epoch, step_in_epoch = divmod(start_step, steps)

  def epoch(e):
    return source.epoch_records(
      split,
      e,
      shard=shard,
      seed=config.seed,
      shuffle=True,
      shuffle_buffer=config.shuffle_buffer,
      host_batch=host_batch,
    ).take(steps * host_batch)

  records = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
  records = records.skip(step_in_epoch * host_batch)
  positions = tf.data.Dataset.range(start_step * host_batch, np.iinfo(np.int64).max)
  records = tf.data.Dataset.zip(records, positions).map(lambda r, p: {**r, "position": p})

  def augment_one(example):
    step, row = example["position"] // host_batch, example["position"] % host_batch
    seed = sources.stream_seed(
      config.seed, (step * shard.process_count + shard.process_index) * host_batch + row
    )
    return {**transform(example, seed), "ok": example["ok"]}

  ds = source.load(records, split, max_side=max_side)
  ds = ds.map(augment_one, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(host_batch, drop_remainder=True).map(_replace_bad_rows)
  return _options(ds.prefetch(tf.data.AUTOTUNE))


def _source(config, source):
  return source or sources.get_source(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)


def pretrain_dataset(
  config: ml_collections.ConfigDict,
  *,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  source: sources.Source | None = None,
) -> tf.data.Dataset:
  """Infinite pretraining batches of config.train_split for this host.

  Elements, with b = config.batch_size // process_count: with config.augment_on 'host', the crops,
  'globals' uint8 [b, 2, G, G, 3] and 'locals' uint8 [b, N, L, L, 3]; with 'device', each image decoded
  once in its canvas, 'canvas' uint8 [b, S, S, 3] and 'image_size' int32 [b, 2] (canvas_view, S =
  config.canvas_size); both with 'skipped_files' int32 []. start_step is the number of batches this host
  has consumed.

  Args:
    config: the run's config (dataset, train_split, batch_size, augment_on, crop settings, seed).
    start_step: batches already consumed (to resume).
    process_index: this host's index (default jax.process_index()).
    process_count: the number of hosts (default jax.process_count()).
    source: the dataset, if already opened (default: config.dataset).

  Returns:
    The dataset of the elements above.
  """
  shard = sources.HostShard.current(process_index, process_count)
  if config.augment_on == "device":

    def transform(example, seed):
      del seed  # The device draws the crops from (config.seed, global position).
      return canvas_view(example["image"], config.canvas_size)

    max_side = config.canvas_size
  else:

    def transform(example, seed):
      return multicrop_views(example["image"], seed, config)

    max_side = None
  return training_batches(
    config,
    _source(config, source),
    config.train_split,
    config.batch_size,
    start_step,
    shard,
    transform,
    max_side=max_side,
  )


def train_classification_dataset(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  crop_size: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  source: sources.Source | None = None,
) -> tf.data.Dataset:
  """Infinite labelled batches for the linear probe: RandomResizedCrop(crop_size, config.crop_scale,
  bilinear, as eval_linear.py) + horizontal flip. Elements: 'image' uint8 [b, C, C, 3], 'label' int32
  [b], 'skipped_files' int32 []; batch_size is global.

  Args:
    config: the run's config (dataset, crop_scale, seed, shuffle_buffer).
    split: the split to read.
    batch_size: the global batch size.
    crop_size: the crop side C.
    start_step: batches already consumed (to resume).
    process_index: this host's index (default jax.process_index()).
    process_count: the number of hosts (default jax.process_count()).
    source: the dataset, if already opened (default: config.dataset).

  Returns:
    The dataset of the elements above.
  """
  shard = sources.HostShard.current(process_index, process_count)

  def transform(example, seed):
    image = augment.inception_crop(example["image"], seed, crop_size, scale=config.crop_scale)
    return {"image": image, "label": example["label"]}

  return training_batches(config, _source(config, source), split, batch_size, start_step, shard, transform)


def labelled_canvases(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  source: sources.Source | None = None,
) -> tf.data.Dataset:
  """Infinite labelled batches for crops made on the device (fine-tuning): each image decoded once in its
  canvas (canvas_view). Elements: 'canvas' uint8 [b, S, S, 3], 'image_size' int32 [b, 2], 'label' int32
  [b], 'skipped_files' int32 []; b = config.batch_size // process_count, S = config.canvas_size.

  Args:
    config: the run's config (dataset, batch_size, canvas_size, seed, shuffle_buffer).
    split: the split to read.
    start_step: batches already consumed (to resume).
    process_index: this host's index (default jax.process_index()).
    process_count: the number of hosts (default jax.process_count()).
    source: the dataset, if already opened (default: config.dataset).

  Returns:
    The dataset of the elements above.
  """
  shard = sources.HostShard.current(process_index, process_count)

  def transform(example, seed):
    del seed  # The device draws the crops from (config.seed, global position).
    label = tf.cast(example["label"], tf.int32)
    return {**canvas_view(example["image"], config.canvas_size), "label": label}

  return training_batches(
    config,
    _source(config, source),
    split,
    config.batch_size,
    start_step,
    shard,
    transform,
    max_side=config.canvas_size,
  )


def eval_dataset(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  source: sources.Source | None = None,
  max_examples: int | None = None,
) -> tuple[tf.data.Dataset, int]:
  """One pass over this host's part of split (of its first max_examples examples if given; sources keep
  a fixed shuffled order, so these mix the classes): Resize(config.eval_resize, bicubic) and
  CenterCrop(config.eval_crop_size), no shuffle.

  Args:
    config: the run's config (dataset, eval_resize, eval_crop_size, seed).
    split: the split to read.
    batch_size: the global batch size.
    process_index: this host's index (default jax.process_index()).
    process_count: the number of hosts (default jax.process_count()).
    source: the dataset, if already opened (default: config.dataset).
    max_examples: read only the split's first max_examples examples (None: all).

  Returns:
    (dataset, num_batches); every host yields num_batches batches of batch_size // process_count
    rows: 'image' uint8 [b, C, C, 3], 'label' int32 [b], 'mask' bool [b] (False on padding rows and on
    files that could not be decoded), 'skipped_files' int32 [] (how many of those files the batch holds).
  """
  shard = sources.HostShard.current(process_index, process_count)
  source = _source(config, source)
  host_batch = host_batch_size(batch_size, shard)
  num_examples = min(source.num_examples(split), max_examples or np.iinfo(np.int64).max)
  num_batches = -(-shard.largest(num_examples) // host_batch)
  crop = config.eval_crop_size

  def prepare(example):
    return {
      "image": augment.center_crop_eval(example["image"], config.eval_resize, crop),
      "label": tf.cast(example["label"], tf.int32),
      "mask": example["ok"],
      "ok": example["ok"],
    }

  def count_bad(batch):
    ok = batch.pop("ok")
    return {**batch, "skipped_files": _count_bad(ok)}

  records = source.epoch_records(split, 0, shard=shard, seed=config.seed, shuffle=False, limit=num_examples)
  ds = source.load(records, split).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  padding = {
    "image": tf.zeros([crop, crop, 3], tf.uint8),
    "label": tf.constant(0),
    "mask": tf.constant(False),
    "ok": tf.constant(True),
  }
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.take(num_batches * host_batch).batch(host_batch, drop_remainder=True).map(count_bad)
  return _options(ds.prefetch(tf.data.AUTOTUNE)), num_batches
