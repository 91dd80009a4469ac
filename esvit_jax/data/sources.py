"""Datasets by name, and one host's part of a split, as tf.data streams of undecoded records.

config.dataset is one string:
  'demo'                 the embedded demo dataset (demo_data.py), generated in memory;
  'folder:/path/root'    images in root/<split>/<class>/*.{jpg,jpeg,png} (ImageNet layout; local or gs://);
  any other string       a TFDS dataset name (imagenet2012 needs its tar files in config.manual_dir), or
                         the name of a dataset prepared in config.data_dir (TFDS reads it without its code).

A source hands out a split in two stages, so that a restart can skip what a host already consumed
without reading it: `epoch_records` yields cheap records (an index, a path, or the encoded bytes) in this
epoch's order, and `load` turns records into decoded uint8 RGB images. Without shuffling (evaluation),
host i of n owns the contiguous slice [i * N // n, (i + 1) * N // n) of the split (disjoint, covering it).

Sources with random access (the demo set, folders, TFDS datasets stored as ArrayRecord) shuffle exactly:
one permutation of the whole split per epoch, cut into global batches that are the same for any number
of hosts (_IndexedSource). A TFDS dataset stored only as TFRecord files has no random access: each host
reads its own slice every epoch, its files in a new order each epoch, then through a shuffle buffer.

Files that cannot be decoded (truncated, empty, not an image) never stop the stream: they come out of
`load` as a placeholder with ok=False, in their place, so that positions in the stream stay fixed.
"""

import abc
from collections.abc import Sequence
import dataclasses
import functools
import os

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from esvit_jax import errors
from esvit_jax.data import demo_data

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEMO_SPLITS = {"train": (4000, 0), "test": (1000, 1)}  # split -> (number of images, generator seed).
DEMO_IMAGE_SIZE = 64
FOLDER_PREFIX = "folder:"
_SPLIT_ALIASES = {"validation": "val", "val": "validation"}  # TFDS and ImageNet-folder names.
_DECODE_CYCLE = 16  # Images decoded concurrently by the order-keeping interleave.
_READ_BATCH = 64  # ArrayRecord examples fetched per read call (array_record reads its files in parallel).
_FILE_CYCLE = 16  # TFRecord files read concurrently by the order-keeping interleave.


@dataclasses.dataclass(frozen=True)
class HostShard:
  """Which part of every split this host reads."""

  process_index: int = 0
  process_count: int = 1

  @classmethod
  def current(cls, process_index: int | None = None, process_count: int | None = None) -> "HostShard":
    """This process's shard (jax.process_index / process_count unless given).

    Args:
      process_index: this host's index (default jax.process_index()).
      process_count: the number of hosts (default jax.process_count()).

    Returns:
      The HostShard; raises ValueError if process_index is not in [0, process_count).
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
      raise ValueError(f"process_index {index} is not in [0, {count})")
    return cls(index, count)

  def bounds(self, num_examples: int) -> tuple[int, int]:
    """[start, stop) of this host's examples among num_examples.

    Args:
      num_examples: size of what the hosts share.

    Returns:
      (start, stop): the disjoint host slices together cover [0, num_examples).
    """
    return (
      num_examples * self.process_index // self.process_count,
      num_examples * (self.process_index + 1) // self.process_count,
    )

  def largest(self, num_examples: int) -> int:
    """The most examples any host gets (hosts differ by at most one).

    Args:
      num_examples: size of what the hosts share.

    Returns:
      ceil(num_examples / process_count).
    """
    return -(-num_examples // self.process_count)


def stream_seed(seed: int, index: tf.Tensor) -> tf.Tensor:
  """The stateless seed [2] of item `index` of a seeded stream: an epoch's order (index = the epoch), an
  example's augmentation (index = its position in the global stream).

  Args:
    seed: the stream's seed (config.seed).
    index: int scalar, possibly traced.

  Returns:
    int64 [2], a seed for tf.random.experimental.stateless_* ops.
  """
  return tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), tf.cast(index, tf.int64))


def _decode_jpeg(raw: tf.Tensor, max_side: int | None) -> tf.Tensor:
  """libjpeg's accurate DCT, as PIL (TF defaults to the fast one). With max_side, a JPEG whose longer
  side L exceeds it is decoded at 1/r scale (r = 2, 4 or 8, the largest with ceil(L / r) >= max_side):
  libjpeg then skips most of the inverse DCT, so a large photo costs little more than a small one."""

  def decode(ratio):
    return lambda: tf.io.decode_jpeg(raw, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")

  if max_side is None:
    return decode(1)()
  longer = tf.reduce_max(tf.io.extract_jpeg_shape(raw)[:2])
  ratios = (1, 2, 4, 8)
  index = tf.add_n([tf.cast(-(-longer // r) >= max_side, tf.int32) for r in ratios[1:]])
  return tf.switch_case(index, [decode(r) for r in ratios])


def decode_image(raw: tf.Tensor, max_side: int | None = None) -> tf.Tensor:
  """JPEG, PNG, GIF or BMP bytes -> uint8 RGB [h, w, 3] (grayscale is replicated, alpha dropped, as
  PIL's convert('RGB') does).

  Args:
    raw: the encoded file.
    max_side: if given, JPEGs larger than it come out shrunk by DCT scaling, their longer side still
      >= max_side (the caller resizes them to fit); other formats come out at full size.

  Returns:
    uint8 [h, w, 3].
  """
  return tf.cond(
    tf.io.is_jpeg(raw),
    lambda: _decode_jpeg(raw, max_side),
    lambda: tf.io.decode_image(raw, channels=3, expand_animations=False, dtype=tf.uint8),
  )


def _extra(element: dict) -> dict:
  """The keys of a record that loading passes through unchanged."""
  return {k: v for k, v in element.items() if k != "record"}


def _placeholder_image() -> tf.Tensor:
  """Stands in for an undecodable image; multicrop replaces its rows before they reach a batch."""
  return tf.fill([8, 8, 3], tf.constant(128, tf.uint8))


def decode_records(ds: tf.data.Dataset, read_bytes, max_side: int | None = None) -> tf.data.Dataset:
  """{'record', ...} -> {'image', 'ok', ...} in the same order, without ever raising on bad data.

  tf.io.decode_image raises inside the graph on a corrupt file, and Dataset.ignore_errors would drop the
  element and shift every later position. Here each record becomes a one-element dataset: the decoded
  image if read_bytes + decode succeed, else the placeholder with ok=False; an interleave over these runs
  the decodes in parallel and keeps the order.

  Args:
    ds: records {'record': tf.Tensor, ...}; other keys pass through.
    read_bytes: record -> the encoded file (string tensor), e.g. tf.io.read_file for a path.
    max_side: as decode_image.

  Returns:
    {'image': uint8 [h, w, 3], 'ok': bool, ...}, one element per record, in order.
  """

  def one(element):
    rest = _extra(element)
    good = (
      tf.data.Dataset.from_tensors(element["record"])
      .map(lambda record: (decode_image(read_bytes(record), max_side), True))
      .ignore_errors()
    )
    bad = tf.data.Dataset.from_tensors((_placeholder_image(), False))
    return good.concatenate(bad).take(1).map(lambda image, ok: {**rest, "image": image, "ok": ok})

  return ds.interleave(
    one, cycle_length=_DECODE_CYCLE, block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )


class Source(abc.ABC):
  """A named dataset: split sizes, class count, per-host records and their decoding."""

  num_classes: int
  has_labels = True  # Every example carries a class label (evaluation needs them, pretraining does not).

  @abc.abstractmethod
  def splits(self) -> Sequence[str]:
    """Split names.

    Returns:
      The names of the dataset's splits.
    """

  def resolve_split(self, split: str) -> str:
    """The split's own name (validation and val stand for each other); a clear error if it is absent.

    Args:
      split: a split name, possibly the alias ('val' for 'validation' or back).

    Returns:
      The name the dataset uses; raises errors.UserError if neither exists.
    """
    available = list(self.splits())
    if split in available:
      return split
    if _SPLIT_ALIASES.get(split) in available:
      return _SPLIT_ALIASES[split]
    raise errors.UserError(f"Split {split!r} does not exist in {self.describe()}; available: {available}")

  @abc.abstractmethod
  def num_examples(self, split: str) -> int:
    """Number of examples in the whole split (all hosts).

    Args:
      split: a split name (or its alias).

    Returns:
      The split's size.
    """

  @abc.abstractmethod
  def describe(self) -> str:
    """Names the dataset in messages.

    Returns:
      A phrase such as 'the demo dataset'.
    """

  @abc.abstractmethod
  def epoch_records(
    self,
    split: str,
    epoch: tf.Tensor,
    *,
    shard: HostShard,
    seed: int,
    shuffle: bool,
    shuffle_buffer: int = 0,
    limit: int | None = None,
    host_batch: int = 1,
  ) -> tf.data.Dataset:
    """This host's records for one epoch, in order: {'record', ...}; epoch may be a traced tensor.

    Args:
      split: a split name (or its alias).
      epoch: int scalar (a tensor, possibly traced): seeds this epoch's order.
      shard: which part of the split this host reads.
      seed: the stream's seed (config.seed).
      shuffle: a new order every epoch (training); without it each host reads its contiguous slice.
      shuffle_buffer: the shuffle buffer of sources without random access (TFRecord files).
      limit: use only the split's first `limit` examples (the hosts share these); None for all.
      host_batch: with shuffle, sources with random access make every global batch of host_batch *
        process_count examples the same whatever the number of hosts (see _IndexedSource).

    Returns:
      A dataset of {'record': index, path or encoded bytes, 'label': int32 (where known), ...}, for load.
    """

  def host_bounds(self, split: str, shard: HostShard, limit: int | None = None) -> tuple[int, int]:
    """[start, stop) of this host's examples among the split's first `limit` (default all).

    Args:
      split: a split name (or its alias).
      shard: this host's shard.
      limit: use only the split's first `limit` examples; None or 0 for all.

    Returns:
      (start, stop) indices into the split.
    """
    num = self.num_examples(split)
    return shard.bounds(min(num, limit) if limit else num)

  @abc.abstractmethod
  def load(self, ds: tf.data.Dataset, split: str, max_side: int | None = None) -> tf.data.Dataset:
    """Records -> {'image': uint8 [h, w, 3], 'label': int32 (if has_labels), 'ok': bool} (other keys
    pass through).

    Args:
      ds: records from epoch_records, in order.
      split: the split they come from.
      max_side: a hint that images larger than it will be shrunk to fit it, so a decoder that can make
        them smaller for less work (JPEG DCT scaling) may do so, the longer side staying >= max_side.

    Returns:
      The decoded examples, one per record, in order; undecodable files come as a placeholder with ok=False.
    """


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
    order = tf.random.experimental.stateless_shuffle(tf.range(num, dtype=tf.int64), stream_seed(seed, epoch))
    global_batch = host_batch * shard.process_count
    rows = tf.reshape(order[: num // global_batch * global_batch], [-1, shard.process_count, host_batch])
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
  @functools.cache  # noqa: B019 (one source per dataset, alive for the whole run)
  def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 64, 64, 3], int32 labels [N]) of a demo split.

    Args:
      split: 'train' or 'test'.

    Returns:
      (images, labels).
    """
    num, seed = DEMO_SPLITS[split]
    return demo_data.generate(num, DEMO_IMAGE_SIZE, seed)

  def epoch_records(self, split, epoch, *, shard, seed, shuffle, shuffle_buffer=0, limit=None, host_batch=1):
    labels = self.arrays(self.resolve_split(split))[1]
    indices = self._host_indices(split, epoch, shard, seed, shuffle, limit, host_batch)
    return tf.data.Dataset.from_tensor_slices({"record": indices, "label": tf.gather(labels, indices)})

  def load(self, ds, split, max_side=None):
    del max_side  # Held decoded, at 64 px.
    images = tf.constant(self.arrays(self.resolve_split(split))[0])
    return ds.map(
      lambda element: {
        **_extra(element),
        "image": tf.gather(images, element["record"]),
        "ok": tf.constant(True),
      },
      num_parallel_calls=tf.data.AUTOTUNE,
    )


class FolderSource(_IndexedSource):
  """root/<split>/<class>/<image>: class names are the sorted union over the splits."""

  def __init__(self, root: str):
    self.root = root
    if not tf.io.gfile.isdir(root):
      raise errors.NotFoundError(
        f"Image folder {root} does not exist; expected {root}/<split>/<class>/*.jpg|jpeg|png "
        f"(e.g. {root}/train/n01440764/x.JPEG and {root}/val/...)"
      )
    if not self.splits():
      raise errors.UserError(
        f"Image folder {root} has no split folders; expected {root}/train/<class>/*.jpg "
        f"and {root}/val/<class>/*.jpg"
      )
    classes = set()
    for split in self.splits():
      classes.update(self._class_dirs(split))
    self.classes = sorted(classes)
    self.num_classes = len(self.classes)

  def describe(self):
    return f"the image folder {self.root}"

  def splits(self):
    return tuple(
      sorted(
        d.rstrip("/") for d in tf.io.gfile.listdir(self.root) if tf.io.gfile.isdir(os.path.join(self.root, d))
      )
    )

  def _class_dirs(self, split: str) -> list[str]:
    path = os.path.join(self.root, split)
    return sorted(
      d.rstrip("/") for d in tf.io.gfile.listdir(path) if tf.io.gfile.isdir(os.path.join(path, d))
    )

  @functools.cache  # noqa: B019 (one source per dataset, alive for the whole run)
  def files(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(paths, int32 labels) of a split in a fixed shuffled order, so host slices mix the classes.

    Args:
      split: a split folder name (or its alias).

    Returns:
      (paths: str [N], labels: int32 [N]), labels indexing self.classes; raises errors.UserError if the
      split holds no images.
    """
    split = self.resolve_split(split)
    paths, labels = [], []
    for name in self._class_dirs(split):
      folder = os.path.join(self.root, split, name)
      images = sorted(f for f in tf.io.gfile.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
      paths += [os.path.join(folder, f) for f in images]
      labels += [self.classes.index(name)] * len(images)
    if not paths:
      raise errors.UserError(
        f"No images in {os.path.join(self.root, split)}: expected "
        f"{os.path.join(self.root, split)}/<class>/*.jpg|jpeg|png"
      )
    order = np.random.default_rng(0).permutation(len(paths))
    return np.array(paths)[order], np.array(labels, np.int32)[order]

  def num_examples(self, split):
    return len(self.files(split)[0])

  def epoch_records(self, split, epoch, *, shard, seed, shuffle, shuffle_buffer=0, limit=None, host_batch=1):
    paths, labels = self.files(split)
    indices = self._host_indices(split, epoch, shard, seed, shuffle, limit, host_batch)
    return tf.data.Dataset.from_tensor_slices(
      {"record": tf.gather(paths, indices), "label": tf.gather(labels, indices)}
    )

  def load(self, ds, split, max_side=None):
    return decode_records(ds, tf.io.read_file, max_side)


class TfdsSource(Source):
  """A prepared TFDS dataset whose examples hold an encoded 'image' (tfds.features.Image) and, for the
  evaluations, a 'label' (tfds.features.ClassLabel). Images are decoded by decode_records."""

  def __init__(self, builder: tfds.core.DatasetBuilder):
    self.builder = builder
    features = builder.info.features
    names = list(features.keys())
    if "image" not in names or not isinstance(features["image"], tfds.features.Image):
      raise errors.UserError(
        f"{self.describe()} has no 'image' feature of encoded images (its features: {names}); esvit-jax "
        "reads examples with an 'image' (tfds.features.Image) and, to evaluate, a 'label' "
        "(tfds.features.ClassLabel)."
      )
    self.has_labels = "label" in names and isinstance(features["label"], tfds.features.ClassLabel)
    self.num_classes = features["label"].num_classes if self.has_labels else 0
    wanted = {"image": True, "label": True} if self.has_labels else {"image": True}
    self._features = tfds.decode.PartialDecoding(wanted).extract_features(features)

  def describe(self):
    return f"TFDS dataset {self.builder.name} in {self.builder.data_dir}"

  def splits(self):
    return tuple(self.builder.info.splits.keys())

  def num_examples(self, split):
    return self.builder.info.splits[self.resolve_split(split)].num_examples

  def _parse(self, element: dict) -> dict:
    """{'record': a serialized tf.Example, ...} -> {'record': its encoded image, 'label': int32, ...}."""
    example = self._features.deserialize_example(
      element["record"], decoders={"image": tfds.decode.SkipDecoding()}
    )
    parsed = {"record": example["image"]}
    if self.has_labels:
      parsed["label"] = tf.cast(example["label"], tf.int32)
    return {**_extra(element), **parsed}

  def load(self, ds, split, max_side=None):
    return decode_records(ds, tf.identity, max_side)


class TfdsArrayRecordSource(TfdsSource, _IndexedSource):
  """A TFDS dataset stored as ArrayRecord files: examples are read by index, so epochs are exact
  permutations of the split and global batches do not depend on the number of hosts (_IndexedSource)."""

  def __init__(self, builder: tfds.core.DatasetBuilder):
    super().__init__(builder)
    self._data_sources = {}

  def data_source(self, split: str) -> Sequence[bytes]:
    """The split's serialized tf.Examples by index (tfds.data_source, undecoded).

    Args:
      split: the split's own name (as resolve_split returns).

    Returns:
      A random-access sequence of serialized examples, opened once per split.
    """
    if split not in self._data_sources:
      self._data_sources[split] = self.builder.as_data_source(
        split,
        deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        file_format=tfds.core.FileFormat.ARRAY_RECORD,
      )
    return self._data_sources[split]

  def epoch_records(self, split, epoch, *, shard, seed, shuffle, shuffle_buffer=0, limit=None, host_batch=1):
    indices = self._host_indices(self.resolve_split(split), epoch, shard, seed, shuffle, limit, host_batch)
    return tf.data.Dataset.from_tensor_slices({"record": indices})

  def load(self, ds, split, max_side=None):
    """Reads the examples of the indices _READ_BATCH at a time, several calls at once (array_record reads
    each call's records in parallel threads), then parses and decodes them in order."""
    examples = self.data_source(self.resolve_split(split))

    def read(indices: np.ndarray) -> np.ndarray:
      return np.array(examples.__getitems__(indices.tolist()), dtype=object)

    def read_batch(batch):
      serialized = tf.numpy_function(read, [batch["record"]], tf.string, stateful=False)
      return {**_extra(batch), "record": tf.ensure_shape(serialized, [None])}

    ds = ds.batch(_READ_BATCH).map(read_batch, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return super().load(ds.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE), split, max_side)


class TfdsRecordSource(TfdsSource):
  """A TFDS dataset stored only as TFRecord files, which have no random access: host i reads its slice
  of the split every epoch, its files in a new order each epoch (seeded by the epoch), interleaved, then
  through a shuffle buffer. The shuffle is approximate, and a resume must keep the number of hosts."""

  def __init__(self, builder: tfds.core.DatasetBuilder):
    super().__init__(builder)
    self._warned = False

  def epoch_records(self, split, epoch, *, shard, seed, shuffle, shuffle_buffer=0, limit=None, host_batch=1):
    split = self.resolve_split(split)
    start, stop = self.host_bounds(split, shard, limit)
    files = self.builder.info.splits[f"{split}[{start}:{stop}]"].file_instructions
    columns = {
      "path": tf.constant([f.filename for f in files]),
      "skip": tf.constant([f.skip for f in files], tf.int64),
      "take": tf.constant([f.take for f in files], tf.int64),
    }
    order = tf.range(len(files))
    if shuffle:
      self._warn_once()
      # TFDS's own file shuffle (as_dataset(shuffle_files=True)) takes its seed as a Python int, while
      # epoch is a tensor here (one traced pipeline runs every epoch): shuffle its file list ourselves.
      order = tf.random.experimental.stateless_shuffle(order, stream_seed(seed, epoch))
    files = tf.data.Dataset.from_tensor_slices({k: tf.gather(v, order) for k, v in columns.items()})
    ds = files.interleave(
      lambda f: tf.data.TFRecordDataset(f["path"]).skip(f["skip"]).take(f["take"]),
      cycle_length=min(len(columns["path"]), _FILE_CYCLE),
      block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    ds = ds.map(lambda serialized: self._parse({"record": serialized}), num_parallel_calls=tf.data.AUTOTUNE)
    if shuffle:
      ds = ds.shuffle(shuffle_buffer, seed=stream_seed(seed, epoch)[0])
    return ds

  def _warn_once(self):
    """Says at the start of training, once, what the shuffle is and how to make it exact."""
    if not self._warned:
      self._warned = True
      logging.warning(
        "%s is stored only as TFRecord files, which have no random access: every epoch each host reads "
        "its own part of the split, its files in a new order and then through a shuffle buffer of "
        "config.shuffle_buffer examples. This shuffle is approximate, and a resume must keep the number "
        "of hosts. For one exact permutation of the whole split per epoch, store it in ArrayRecord "
        "format: %s",
        self.describe(),
        array_record_commands(self.builder),
      )


def array_record_commands(builder: tfds.core.DatasetBuilder) -> str:
  """The commands that store a prepared TFRecord dataset in ArrayRecord format as well (in place), or
  prepare it again in that format (for a dataset whose code TFDS has).

  Args:
    builder: the prepared dataset.

  Returns:
    The command(s), quoted in backticks, for a log message.
  """
  convert = f"tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record"
  tool = " (the tfds command of tensorflow-datasets 4.9 needs `pip install apache-beam mlcroissant`)"
  if isinstance(builder, tfds.core.read_only_builder.ReadOnlyBuilder):
    return f"`{convert}`{tool}"
  return f"`{convert}`, or prepare it again with `{build_command(builder)}`{tool}"


def build_command(builder: tfds.core.DatasetBuilder, manual_dir: str | None = None) -> str:
  """The `tfds build` command that prepares a dataset in ArrayRecord format.

  Args:
    builder: the dataset to prepare.
    manual_dir: where its manually downloaded files are (for datasets that need them); a placeholder
      is shown if None.

  Returns:
    The command line.
  """
  command = f"tfds build {builder.name} --data_dir={builder.data_dir_root} --file_format=array_record"
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    command += f" --manual_dir={manual_dir or '<folder of the downloaded files>'}"
  return command


def _listing(data_dir: str) -> str:
  """What a TFDS data_dir holds, for messages."""
  names = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(data_dir) if d.rstrip("/") != "downloads")
  return f" (it holds: {', '.join(names)})" if names else " (it is empty)"


def _prepare(
  builder: tfds.core.DatasetBuilder, name: str, data_dir: str | None, manual_dir: str | None, download: bool
) -> None:
  """Prepares a dataset that TFDS has the code of, in ArrayRecord format, where the config allows it."""
  where = f"{builder.data_dir_root}{_listing(data_dir) if data_dir else ''}"
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if instructions:
    if not manual_dir or not tf.io.gfile.exists(manual_dir) or not tf.io.gfile.listdir(manual_dir):
      raise errors.NotFoundError(
        f"{name} is not prepared in {where} and needs a manual download: set config.manual_dir to a "
        f"folder holding the files below (now {manual_dir!r}) to prepare it at start, or run "
        f"`{build_command(builder, manual_dir)}` once.\n{instructions.strip()}"
      )
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=config, file_format=tfds.core.FileFormat.ARRAY_RECORD)
  elif download:
    builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
  else:
    raise errors.NotFoundError(
      f"{name} is not prepared in {where}: run `{build_command(builder)}` once, set config.data_dir "
      "to where it was prepared, or let pretraining download it (config.download=True)."
    )


def _tfds_source(name: str, data_dir: str | None, manual_dir: str | None, download: bool) -> TfdsSource:
  """A TFDS dataset: read by index if it is stored as ArrayRecord, else from its TFRecord files."""
  if data_dir and not tf.io.gfile.isdir(data_dir):
    raise errors.NotFoundError(
      f"config.data_dir={data_dir} does not exist: set it to the folder TFDS prepared datasets in "
      f"(`tfds build --data_dir=...`), which holds a folder per dataset such as {data_dir}/{name}."
    )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    prepared = f" nor prepared in {data_dir}{_listing(data_dir)}" if data_dir else ""
    raise errors.UserError(
      f"Unknown dataset {name!r}{prepared}: expected 'demo', 'folder:/path/to/root' "
      "(root/<split>/<class>/*.jpg), a TFDS name such as imagenet2012 or cifar10, or the name of a "
      "dataset prepared in config.data_dir"
    ) from None
  if not builder.is_prepared():
    _prepare(builder, name, data_dir, manual_dir, download)
  formats = builder.info.available_file_formats()
  if tfds.core.FileFormat.ARRAY_RECORD in formats:
    return TfdsArrayRecordSource(builder)
  if tfds.core.FileFormat.TFRECORD in formats:
    return TfdsRecordSource(builder)
  raise errors.UserError(
    f"TFDS dataset {name} in {builder.data_dir} is stored as {sorted(f.value for f in formats)}; esvit-jax "
    f"reads array_record (random access) or tfrecord: `{build_command(builder)}`"
  )


def get_source(
  dataset: str,
  *,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  download: bool = False,
  splits: Sequence[str] = (),
  labels: bool = False,
) -> Source:
  """The source named by config.dataset, checked before anything is compiled.

  Args:
    dataset: config.dataset (see the module doc).
    data_dir: TFDS data_dir (None: TFDS's default).
    manual_dir: where a TFDS dataset that needs a manual download finds its files.
    download: let TFDS download and prepare a dataset that is not prepared (in ArrayRecord format).
    splits: splits that must exist.
    labels: whether the examples must carry class labels (evaluation; pretraining does not need them).

  Returns:
    The source. Raises errors.NotFoundError if the dataset or data_dir does not exist or the dataset is
    not prepared, errors.UserError if a split, the images or the needed labels are missing.
  """
  if dataset == "demo":
    source = DemoSource()
  elif dataset.startswith(FOLDER_PREFIX):
    source = FolderSource(dataset[len(FOLDER_PREFIX) :])
  else:
    source = _tfds_source(dataset, data_dir, manual_dir, download)
  for split in splits:
    source.resolve_split(split)
  if labels and not source.has_labels:
    raise errors.UserError(
      f"{source.describe()} has no 'label' feature (tfds.features.ClassLabel): the k-NN and linear "
      "evaluations need one (pretraining does not, with its k-NN monitor off: config.eval_every_steps=0)."
    )
  return source
