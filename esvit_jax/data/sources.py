"""Datasets by name, and one host's part of a split, as tf.data streams of undecoded records.

config.dataset is one string:
  'demo'                 the embedded demo dataset (demo_data.py), generated in memory;
  'folder:/path/root'    images in root/<split>/<class>/*.{jpg,jpeg,png} (ImageNet layout; local or gs://);
  any other string       a TFDS dataset name (imagenet2012 needs its tar files in config.manual_dir).

A source hands out a split in two stages, so that a restart can skip what a host already consumed
without decoding it: `epoch_records` yields cheap records (an index, a path, or the encoded bytes) in this
epoch's order, and `load` turns records into decoded uint8 RGB images. Host i of n owns the contiguous
slice [i * N // n, (i + 1) * N // n) of the split (disjoint, covering it).

Files that cannot be decoded (truncated, empty, not an image) never stop the stream: they come out of
`load` as a placeholder with ok=False, in their place, so that positions in the stream stay fixed.
"""
import abc
from collections.abc import Sequence
import dataclasses
import functools
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from esvit_jax.data import demo_data

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEMO_SPLITS = {"train": (4000, 0), "test": (1000, 1)}  # split -> (number of images, generator seed).
DEMO_IMAGE_SIZE = 64
FOLDER_PREFIX = "folder:"
_SPLIT_ALIASES = {"validation": "val", "val": "validation"}  # TFDS and ImageNet-folder names.
_DECODE_CYCLE = 16  # Images decoded concurrently by the order-keeping interleave.


@dataclasses.dataclass(frozen=True)
class HostShard:
  """Which part of every split this host reads."""
  process_index: int = 0
  process_count: int = 1

  @classmethod
  def current(cls, process_index: int | None = None, process_count: int | None = None) -> "HostShard":
    """This process's shard (jax.process_index / process_count unless given)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
      raise ValueError(f"process_index {index} is not in [0, {count})")
    return cls(index, count)

  def bounds(self, num_examples: int) -> tuple[int, int]:
    """[start, stop) of this host's examples among num_examples."""
    return (num_examples * self.process_index // self.process_count,
            num_examples * (self.process_index + 1) // self.process_count)

  def largest(self, num_examples: int) -> int:
    """The most examples any host gets (hosts differ by at most one)."""
    return -(-num_examples // self.process_count)


def epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  """The stateless seed [2] of one epoch's order."""
  return tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0], tf.int64), tf.cast(epoch, tf.int64))


def _decode(raw: tf.Tensor) -> tf.Tensor:
  """JPEG, PNG, GIF or BMP bytes -> uint8 RGB [h, w, 3] (grayscale is replicated, alpha dropped, as
  PIL's convert('RGB') does)."""
  return tf.cond(tf.io.is_jpeg(raw),  # libjpeg's accurate DCT, as PIL (TF defaults to the fast one).
                 lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),
                 lambda: tf.io.decode_image(raw, channels=3, expand_animations=False, dtype=tf.uint8))


def _extra(element: dict) -> dict:
  """The keys of a record that loading passes through unchanged."""
  return {k: v for k, v in element.items() if k != "record"}


def _placeholder_image() -> tf.Tensor:
  """Stands in for an undecodable image; multicrop replaces its rows before they reach a batch."""
  return tf.fill([8, 8, 3], tf.constant(128, tf.uint8))


def decode_records(ds: tf.data.Dataset, read_bytes) -> tf.data.Dataset:
  """{'record', ...} -> {'image', 'ok', ...} in the same order, without ever raising on bad data.

  tf.io.decode_image raises inside the graph on a corrupt file, and Dataset.ignore_errors would drop the
  element and shift every later position. Here each record becomes a one-element dataset: the decoded
  image if read_bytes + decode succeed, else the placeholder with ok=False; an interleave over these runs
  the decodes in parallel and keeps the order.
  """
  def one(element):
    rest = _extra(element)
    good = tf.data.Dataset.from_tensors(element["record"]).map(
        lambda record: (_decode(read_bytes(record)), True)).ignore_errors()
    bad = tf.data.Dataset.from_tensors((_placeholder_image(), False))
    return good.concatenate(bad).take(1).map(lambda image, ok: {**rest, "image": image, "ok": ok})
  return ds.interleave(one, cycle_length=_DECODE_CYCLE, block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class Source(abc.ABC):
  """A named dataset: split sizes, class count, per-host records and their decoding."""
  num_classes: int

  @abc.abstractmethod
  def splits(self) -> Sequence[str]:
    """Split names."""

  def resolve_split(self, split: str) -> str:
    """The split's own name (validation and val stand for each other); a clear error if it is absent."""
    available = list(self.splits())
    if split in available:
      return split
    if _SPLIT_ALIASES.get(split) in available:
      return _SPLIT_ALIASES[split]
    raise ValueError(f"Split {split!r} does not exist in {self.describe()}; available: {available}")

  @abc.abstractmethod
  def num_examples(self, split: str) -> int:
    """Number of examples in the whole split (all hosts)."""

  @abc.abstractmethod
  def describe(self) -> str:
    """Names the dataset in messages."""

  @abc.abstractmethod
  def epoch_records(self, split: str, epoch: tf.Tensor, *, shard: HostShard, seed: int,
                    shuffle: bool, shuffle_buffer: int = 0, limit: int | None = None,
                    host_batch: int = 1) -> tf.data.Dataset:
    """This host's records for one epoch, in order: {'record', 'label'}; epoch may be a traced tensor.

    limit: use only the split's first `limit` examples (the hosts share these). host_batch: with
    shuffle, sources with random access make every global batch of host_batch * process_count examples
    the same whatever the number of hosts (see _IndexedSource)."""

  def host_bounds(self, split: str, shard: HostShard, limit: int | None = None) -> tuple[int, int]:
    """[start, stop) of this host's examples among the split's first `limit` (default all)."""
    num = self.num_examples(split)
    return shard.bounds(min(num, limit) if limit else num)

  @abc.abstractmethod
  def load(self, ds: tf.data.Dataset, split: str) -> tf.data.Dataset:
    """Records -> {'image': uint8 [h, w, 3], 'label': int32, 'ok': bool} (other keys pass through)."""


class _IndexedSource(Source):
  """A source with random access by example index: the epoch order is a permutation of indices."""

  def _host_indices(self, split, epoch, shard, seed, shuffle, limit, host_batch) -> tf.Tensor:
    """Without shuffle: this host's contiguous slice. With shuffle: one permutation of the whole split
    per epoch, cut into global batches of host_batch * process_count; host i reads rows
    [i * host_batch, (i + 1) * host_batch) of each. A run on N hosts thus sees the same global batches as
    a run on one host, and the hosts' parts are disjoint and together cover every full batch."""
    if not shuffle:
      start, stop = self.host_bounds(split, shard, limit)
      return tf.range(start, stop, dtype=tf.int64)
    num = self.host_bounds(split, HostShard(), limit)[1]
    order = tf.random.experimental.stateless_shuffle(tf.range(num, dtype=tf.int64), epoch_seed(seed, epoch))
    global_batch = host_batch * shard.process_count
    rows = tf.reshape(order[:num // global_batch * global_batch], [-1, shard.process_count, host_batch])
    return tf.reshape(rows[:, shard.process_index], [-1])


class DemoSource(_IndexedSource):
  """The embedded demo set, generated once per process and held in memory."""
  num_classes = demo_data.NUM_CLASSES

  def splits(self):
    return tuple(DEMO_SPLITS)

  def describe(self):
    return "the demo dataset"

  def num_examples(self, split):
    return DEMO_SPLITS[self.resolve_split(split)][0]

  @staticmethod
  @functools.cache
  def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 64, 64, 3], int32 labels [N]) of a demo split."""
    num, seed = DEMO_SPLITS[split]
    return demo_data.generate(num, DEMO_IMAGE_SIZE, seed)

  def epoch_records(self, split, epoch, *, shard, seed, shuffle, shuffle_buffer=0, limit=None, host_batch=1):
    labels = self.arrays(self.resolve_split(split))[1]
    indices = self._host_indices(split, epoch, shard, seed, shuffle, limit, host_batch)
    return tf.data.Dataset.from_tensor_slices({"record": indices, "label": tf.gather(labels, indices)})

  def load(self, ds, split):
    images = tf.constant(self.arrays(self.resolve_split(split))[0])
    return ds.map(lambda element: {**_extra(element), "image": tf.gather(images, element["record"]),
                                   "ok": tf.constant(True)},
                  num_parallel_calls=tf.data.AUTOTUNE)


class FolderSource(_IndexedSource):
  """root/<split>/<class>/<image>: class names are the sorted union over the splits."""

  def __init__(self, root: str):
    self.root = root
    if not tf.io.gfile.isdir(root):
      raise FileNotFoundError(
          f"Image folder {root} does not exist; expected {root}/<split>/<class>/*.jpg|jpeg|png "
          f"(e.g. {root}/train/n01440764/x.JPEG and {root}/val/...)")
    if not self.splits():
      raise ValueError(f"Image folder {root} has no split folders; expected {root}/train/<class>/*.jpg "
                       f"and {root}/val/<class>/*.jpg")
    classes = set()
    for split in self.splits():
      classes.update(self._class_dirs(split))
    self.classes = sorted(classes)
    self.num_classes = len(self.classes)

  def describe(self):
    return f"the image folder {self.root}"

  def splits(self):
    return tuple(sorted(d.rstrip("/") for d in tf.io.gfile.listdir(self.root)
                        if tf.io.gfile.isdir(os.path.join(self.root, d))))

  def _class_dirs(self, split: str) -> list[str]:
    path = os.path.join(self.root, split)
    return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                  if tf.io.gfile.isdir(os.path.join(path, d)))

  @functools.cache
  def files(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(paths, int32 labels) of a split in a fixed shuffled order, so host slices mix the classes."""
    split = self.resolve_split(split)
    paths, labels = [], []
    for name in self._class_dirs(split):
      folder = os.path.join(self.root, split, name)
      images = sorted(f for f in tf.io.gfile.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
      paths += [os.path.join(folder, f) for f in images]
      labels += [self.classes.index(name)] * len(images)
    if not paths:
      raise ValueError(f"No images in {os.path.join(self.root, split)}: expected "
                       f"{os.path.join(self.root, split)}/<class>/*.jpg|jpeg|png")
    order = np.random.default_rng(0).permutation(len(paths))
    return np.array(paths)[order], np.array(labels, np.int32)[order]

  def num_examples(self, split):
    return len(self.files(split)[0])

  def epoch_records(self, split, epoch, *, shard, seed, shuffle, shuffle_buffer=0, limit=None, host_batch=1):
    paths, labels = self.files(split)
    indices = self._host_indices(split, epoch, shard, seed, shuffle, limit, host_batch)
    return tf.data.Dataset.from_tensor_slices(
        {"record": tf.gather(paths, indices), "label": tf.gather(labels, indices)})

  def load(self, ds, split):
    return decode_records(ds, tf.io.read_file)


class TfdsSource(Source):
  """A prepared TFDS dataset with 'image' and 'label' features; images are decoded by decode_records."""

  def __init__(self, name: str, data_dir: str | None = None, manual_dir: str | None = None,
               download: bool = False):
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(
          f"Unknown dataset {name!r}: expected 'demo', 'folder:/path/to/root' "
          f"(root/<split>/<class>/*.jpg) or a TFDS name such as imagenet2012 or cifar10") from None
    if not self.builder.is_prepared():
      self._prepare(name, manual_dir, download)
    self.num_classes = self.builder.info.features["label"].num_classes

  def _prepare(self, name, manual_dir, download):
    instructions = getattr(self.builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    where = self.builder.data_dir
    if instructions:
      if not manual_dir or not tf.io.gfile.exists(manual_dir) or not tf.io.gfile.listdir(manual_dir):
        raise FileNotFoundError(
            f"{name} is not prepared in {where} and needs a manual download: set config.manual_dir to "
            f"a folder holding the files below (now {manual_dir!r}).\n{instructions.strip()}")
      config = tfds.download.DownloadConfig(manual_dir=manual_dir)
      self.builder.download_and_prepare(download_config=config)
    elif download:
      self.builder.download_and_prepare()
    else:
      raise FileNotFoundError(
          f"{name} is not prepared in {where}: run `tfds build {name} --data_dir=<data_dir>` once, "
          f"or allow the download")

  def describe(self):
    return f"TFDS dataset {self.builder.name}"

  def splits(self):
    return tuple(self.builder.info.splits.keys())

  def num_examples(self, split):
    return self.builder.info.splits[self.resolve_split(split)].num_examples

  def epoch_records(self, split, epoch, *, shard, seed, shuffle, shuffle_buffer=0, limit=None, host_batch=1):
    split = self.resolve_split(split)
    start, stop = self.host_bounds(split, shard, limit)
    ds = self.builder.as_dataset(
        split=f"{split}[{start}:{stop}]", shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(skip_prefetch=True, try_autocache=False))
    ds = ds.map(lambda ex: {"record": ex["image"], "label": tf.cast(ex["label"], tf.int32)})
    if shuffle:
      # TFDS wrote the examples in a shuffled order; each epoch reshuffles them through a buffer.
      ds = ds.shuffle(shuffle_buffer, seed=epoch_seed(seed, epoch)[0])
    return ds

  def load(self, ds, split):
    return decode_records(ds, tf.identity)


def get_source(dataset: str, *, data_dir: str | None = None, manual_dir: str | None = None,
               download: bool = False) -> Source:
  """The source named by config.dataset; raises at once if it does not exist or is not prepared."""
  if dataset == "demo":
    return DemoSource()
  if dataset.startswith(FOLDER_PREFIX):
    return FolderSource(dataset[len(FOLDER_PREFIX):])
  return TfdsSource(dataset, data_dir=data_dir, manual_dir=manual_dir, download=download)
