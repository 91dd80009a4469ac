"""TFDS datasets, prepared here from generated images in ArrayRecord and TFRecord format: exact per-epoch
permutations that do not depend on the number of hosts, resume, the TFRecord fallback, clear errors, and
main.py reading them (the prepared files are found by name in config.data_dir: TFDS's read-only builder,
so the subprocess needs no dataset code)."""

import io
import itertools
import json
import logging
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from esvit_jax import errors, writers
from esvit_jax.configs import common
from esvit_jax.data import demo_data, multicrop, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "esvit_tfds_test_shapes"
SPLITS = {"train": (48, 0), "test": (16, 1)}  # split -> (number of examples, generator seed).
SIZE = 24
CORRUPT = ("train", 5)  # The one example whose image bytes are not an image.
BATCH = 8  # Global batch of the stream tests: 6 steps per epoch of train.


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def examples(split: str) -> list[tuple[bytes | np.ndarray, int]]:
  """(image, label) of a split: demo images as arrays (TFDS encodes them as PNG), every third one as
  JPEG bytes, and one corrupt file."""
  num, seed = SPLITS[split]
  images, _ = demo_data.generate(num, SIZE, seed)
  out = []
  for i, image in enumerate(images):
    image = _encode(image, "JPEG") if i % 3 == 0 else image
    out.append((b"not an image at all" if (split, i) == CORRUPT else image, i % 10))
  return out


def decoded(split: str) -> list[np.ndarray | None]:
  """What decoding should give for each example (PIL's decode; None for the corrupt one)."""
  out = []
  for image, _ in examples(split):
    if isinstance(image, np.ndarray):
      out.append(image)
    else:
      try:
        out.append(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))
      except OSError:
        out.append(None)
  return out


class EsvitTfdsTestShapes(tfds.core.GeneratorBasedBuilder):
  """48 train and 16 test images with labels, in 4 files per split."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=10),
          "id": tfds.features.Scalar(np.int32),
        }
      ),
    )  # Its place in examples(split); TFDS stores them shuffled.

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    for i, (image, label) in enumerate(examples(split)):
      yield i, {"image": image, "label": label, "id": i}


class EsvitTfdsTestUnlabelled(tfds.core.GeneratorBasedBuilder):
  """16 images without labels."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="png")}
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(demo_data.generate(16, SIZE, 2)[0]):
      yield i, {"image": image}


class EsvitTfdsTestNoImage(tfds.core.GeneratorBasedBuilder):
  """Labelled images under another name than 'image'."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "picture": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=2),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(demo_data.generate(4, SIZE, 3)[0]):
      yield i, {"picture": image, "label": i % 2}


@pytest.fixture(name="data_dirs", scope="module")
def _data_dirs(tmp_path_factory) -> dict[str, str]:
  """format -> a data_dir holding the prepared test datasets."""
  dirs = {}
  for file_format in ("array_record", "tfrecord"):
    data_dir = str(tmp_path_factory.mktemp(file_format))
    shards = tfds.download.DownloadConfig(num_shards=4)
    builder = EsvitTfdsTestShapes(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(download_config=shards)
    dirs[file_format] = data_dir
  EsvitTfdsTestUnlabelled(data_dir=dirs["array_record"], file_format="array_record").download_and_prepare()
  EsvitTfdsTestNoImage(data_dir=dirs["array_record"], file_format="array_record").download_and_prepare()
  return dirs


def _source(data_dirs, file_format, **kwargs) -> sources.Source:
  return sources.get_source(NAME, data_dir=data_dirs[file_format], **kwargs)


def _records(source, epoch, shard=sources.HostShard(), host_batch=BATCH, shuffle_buffer=1) -> list:
  records = source.epoch_records(
    "train", epoch, shard=shard, seed=3, shuffle=True, shuffle_buffer=shuffle_buffer, host_batch=host_batch
  )
  return [r["record"] for r in records.as_numpy_iterator()]


def _stream(source, start: int, steps: int, shard=sources.HostShard()) -> list[dict]:
  """Host batches start..start+steps of a training stream of the decoded images and labels."""
  config = common.pretrain_config("swin_tiny", 0.1)
  config.update(seed=3, shuffle_buffer=16)

  def transform(example, seed):
    del seed
    image = tf.image.resize_with_crop_or_pad(example["image"], SIZE, SIZE)  # The corrupt file's placeholder.
    return {"image": image, "label": example["label"]}

  ds = multicrop.training_batches(config, source, "train", BATCH, start, shard, transform)
  return list(itertools.islice(ds.as_numpy_iterator(), steps))


def _identify(images: np.ndarray, split: str = "train") -> list[int]:
  """The id (place in examples(split)) of each decoded image."""
  index = {image.tobytes(): i for i, image in enumerate(decoded(split)) if image is not None}
  return [index[image.tobytes()] for image in images]


def _stored_ids(source, split: str = "train") -> np.ndarray:
  """The id of the example at each index of the prepared split, read by TFDS's own numpy reader."""
  examples_by_index = source.builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return np.array([example["id"] for example in examples_by_index])


def test_array_record_epochs_are_permutations_cut_into_the_same_global_batches_for_any_host_count(data_dirs):
  source = _source(data_dirs, "array_record")
  assert isinstance(source, sources.TfdsArrayRecordSource) and source.num_classes == 10
  epochs = [_records(source, epoch) for epoch in (0, 1)]
  for order in epochs:
    assert sorted(order) == list(range(48))  # Every example exactly once.
  assert epochs[0] != epochs[1]
  halves = [_records(source, 0, sources.HostShard(i, 2), BATCH // 2) for i in range(2)]
  assert not set(halves[0]) & set(halves[1])
  rows = np.stack([np.reshape(h, (-1, BATCH // 2)) for h in halves], axis=1).reshape(-1)
  np.testing.assert_array_equal(rows, epochs[0])  # Host i holds rows [4i, 4i + 4) of each global batch.
  # Decoded, through the training stream: the images and labels of those indices; the corrupt file is
  # counted and its row replaced by a good one, as with image folders.
  one = _stream(source, 0, 12)
  ids = _stored_ids(source)
  for step, batch in enumerate(one):
    order = ids[epochs[step // 6][step % 6 * BATCH : (step % 6 + 1) * BATCH]]
    bad = [i for i, example in enumerate(order) if ("train", example) == CORRUPT]
    assert batch["skipped_files"] == len(bad)
    good = [i for i in range(BATCH) if i not in bad]
    np.testing.assert_array_equal(_identify(batch["image"][good]), order[good])
    np.testing.assert_array_equal(batch["label"][good], order[good] % 10)
  two = [_stream(source, 0, 12, sources.HostShard(i, 2)) for i in range(2)]
  for step in range(12):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([two[0][step][key], two[1][step][key]]), one[step][key])


def test_array_record_resume_equals_the_uninterrupted_stream_also_on_another_host_count(data_dirs):
  source = _source(data_dirs, "array_record")
  full = _stream(source, 0, 9)
  examples_by_index = source.data_source("train")

  class Recording:
    """Records the keys of every read."""

    def __init__(self):
      self.reads = []

    def __getitems__(self, keys):
      self.reads.append(list(keys))
      return examples_by_index.__getitems__(keys)

  for shard in (sources.HostShard(0, 1), sources.HostShard(0, 2), sources.HostShard(1, 2)):
    recording = source._data_sources["train"] = Recording()  # pylint: disable=protected-access
    resumed = _stream(source, 4, 5, shard)  # Steps 4, 5 of epoch 0 and 0..2 of epoch 1.
    host_batch = BATCH // shard.process_count
    rows = slice(shard.process_index * host_batch, (shard.process_index + 1) * host_batch)
    for got, expected in zip(resumed, full[4:], strict=False):
      np.testing.assert_array_equal(got["image"], expected["image"][rows])
      np.testing.assert_array_equal(got["label"], expected["label"][rows])
    # Reads cover the host's stream from step 4 on, in windows of _READ_BATCH: the 4 steps consumed
    # before are skipped unread.
    stream = sum((_records(source, epoch, shard, host_batch) for epoch in range(16)), [])[4 * host_batch :]
    window = sources._READ_BATCH  # pylint: disable=protected-access
    reads = {tuple(keys) for keys in recording.reads}
    assert reads and reads == {tuple(stream[j * window : (j + 1) * window]) for j in range(len(reads))}
  # A resume in a later epoch (step 8: step 2 of epoch 1) starts in that epoch's order.
  [resumed] = _stream(source, 8, 1)
  for key in ("image", "label"):
    np.testing.assert_array_equal(resumed[key], full[8][key])


def test_array_record_evaluation_reads_each_host_slice_once_in_order_and_flags_corrupt_files(data_dirs):
  """The k-NN monitor's and the evaluations' path (multicrop.eval_dataset) over the random-access reader."""
  source = _source(data_dirs, "array_record")
  expected = decoded("train")
  ids = _stored_ids(source)
  config = common.pretrain_config("swin_tiny", 0.1)
  config.update(eval_resize=SIZE, eval_crop_size=SIZE)
  labels, masks = [], []  # Per host.
  for i in range(2):
    ds, num_batches = multicrop.eval_dataset(
      config, "train", batch_size=16, process_index=i, process_count=2, source=source, max_examples=40
    )
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == num_batches == 3
    images = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    labels.append(np.concatenate([b["label"] for b in batches])[mask])
    masks.append(mask)
    slice_ids = ids[20 * i : 20 * i + 20]  # Host i reads indices [20i, 20i + 20) in order.
    for row in np.flatnonzero(mask):
      np.testing.assert_array_equal(images[row], expected[slice_ids[row]])  # 24 px: resize, crop keep it.
    corrupt = int(CORRUPT[1] in slice_ids)
    assert sum(b["skipped_files"] for b in batches) == corrupt and mask.sum() == 20 - corrupt
    np.testing.assert_array_equal(labels[-1], [j % 10 for j in slice_ids if j != CORRUPT[1]])
  assert sum(m.sum() for m in masks) == 40 - int(CORRUPT[1] in ids[:40])


def test_tfrecord_fallback_reshuffles_file_order_every_epoch_resumes_and_warns(data_dirs, caplog):
  source = _source(data_dirs, "tfrecord")
  assert isinstance(source, sources.TfdsRecordSource)
  files = source.builder.info.splits["train"].file_instructions
  assert len(files) == 4
  file_of = {}
  for number, instruction in enumerate(files):
    for serialized in tf.data.TFRecordDataset(instruction.filename):
      file_of[source._parse({"record": serialized})["record"].numpy()] = number  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    epochs = [_records(source, epoch) for epoch in (0, 1, 2)]
  for order in epochs:
    assert sorted(file_of[r] for r in order) == sorted(file_of.values())  # Each example once.
  file_orders = [list(dict.fromkeys(file_of[r] for r in order)) for order in epochs]
  assert file_orders[0] != file_orders[1] != file_orders[2]  # Interleaved one by one: first 4 = file order.
  warnings = [r.getMessage() for r in caplog.records if "TFRecord" in r.getMessage()]
  assert len(warnings) == 1 and "approximate" in warnings[0]
  assert f"tfds convert_format --dataset_version_dir={source.builder.data_dir} " in warnings[0]
  assert "--out_file_format=array_record" in warnings[0]
  full = _stream(source, 0, 8)
  # Same number of hosts: exact resume.
  for got, expected in zip(_stream(source, 4, 4), full[4:], strict=False):
    np.testing.assert_array_equal(got["image"], expected["image"])
  parts = [set(_records(source, 0, sources.HostShard(i, 2), BATCH // 2)) for i in range(2)]
  assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 48


def test_each_dataset_mistake_has_its_message(data_dirs, tmp_path):
  ar_dir = data_dirs["array_record"]
  with pytest.raises(errors.NotFoundError, match=r"config.data_dir=.*missing does not exist"):
    sources.get_source(NAME, data_dir=str(tmp_path / "missing"))
  with pytest.raises(
    errors.NotFoundError,
    match=rf"{NAME} is not prepared in .*\(it is empty\): run "
    rf"`tfds build {NAME} --data_dir=\S+ --file_format=array_record`",
  ):
    sources.get_source(NAME, data_dir=str(tmp_path))
  with pytest.raises(
    errors.UserError,
    match=r"Unknown dataset 'no_such_dataset_xyz' nor prepared in .*"
    rf"\(it holds: esvit_tfds_test_no_image, {NAME}, esvit_tfds_test_unlabelled\)",
  ):
    sources.get_source("no_such_dataset_xyz", data_dir=ar_dir)
  with pytest.raises(errors.UserError, match=r"Split 'validation' does not exist .*\['train', 'test'\]"):
    sources.get_source(NAME, data_dir=ar_dir, splits=("train", "validation"))
  with pytest.raises(errors.UserError, match=r"has no 'image' feature .*\['picture', 'label'\]"):
    sources.get_source("esvit_tfds_test_no_image", data_dir=ar_dir)
  with pytest.raises(errors.UserError, match="has no 'label' feature .*k-NN and linear evaluations need one"):
    sources.get_source("esvit_tfds_test_unlabelled", data_dir=ar_dir, labels=True)
  with pytest.raises(
    errors.NotFoundError, match=r"cifar10 is not prepared.*tfds build cifar10 .*array_record"
  ):
    sources.get_source("cifar10", data_dir=str(tmp_path))
  with pytest.raises(
    errors.NotFoundError, match=r"(?s)config.manual_dir.*--manual_dir=.*ILSVRC2012_img_train.tar"
  ):
    sources.get_source("imagenet2012", data_dir=str(tmp_path), manual_dir=str(tmp_path / "none"))
  # Pretraining needs no labels.
  config = common.pretrain_config("swin_tiny", 0.1)
  config.update(dataset="esvit_tfds_test_unlabelled", data_dir=ar_dir, batch_size=8, canvas_size=SIZE)
  source = sources.get_source(config.dataset, data_dir=ar_dir, splits=("train",))
  [batch] = itertools.islice(multicrop.pretrain_dataset(config, source=source).as_numpy_iterator(), 1)
  assert batch["canvas"].shape == (8, SIZE, SIZE, 3) and batch["skipped_files"] == 0


def _main(args: list[str], workdir) -> subprocess.CompletedProcess:
  done = subprocess.run(
    [sys.executable, "main.py", *args, f"--workdir={workdir}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done


@pytest.mark.slow
@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_main_pretrains_with_the_knn_monitor_then_evaluates(data_dirs, tmp_path, file_format):
  data = [
    f"--config.dataset={NAME}",
    f"--config.data_dir={data_dirs[file_format]}",
    "--config.eval_split=test",
  ]
  pretrain = tmp_path / "pretrain"
  done = _main(
    [
      "--config=tests/configs/tiny.py",
      *data,
      "--config.total_steps=3",
      "--config.eval_every_steps=3",
      "--config.canvas_size=32",
    ],
    pretrain,
  )
  assert ("stored only as TFRecord files" in done.stderr) == (file_format == "tfrecord")
  # The k-NN monitor read both splits (multicrop.eval_dataset).
  assert any("knn_top1_k20" in r for r in writers.read_metrics(pretrain))
  evaluation = [
    *data,
    f"--config.pretrained={pretrain / 'export'}",
    "--config.eval_resize=36",
    "--config.eval_crop_size=32",
    "--config.eval_batch_size=16",
  ]
  if file_format == "array_record":  # The k-NN task reads as the monitor did (each main.py costs ~15 s).
    _main(["--config=configs/knn.py", *evaluation], tmp_path / "knn")
    knn = json.loads((tmp_path / "knn" / "results.json").read_text())["metrics"]
    assert set(knn) >= {"knn_top1_k10", "knn_top1_k20"}
  _main(
    [
      "--config=configs/linear_probe.py",
      *evaluation,
      "--config.crop_size=32",
      "--config.batch_size=16",
      "--config.epochs=1",
      "--config.log_every_steps=1",
    ],
    tmp_path / "linear",
  )
  linear = json.loads((tmp_path / "linear" / "results.json").read_text())["metrics"]
  # The one epoch's validation, as recorded in metrics.jsonl: a count of the 16 test images, in %.
  [val_top1] = [r["val_top1"] for r in writers.read_metrics(tmp_path / "linear") if "val_top1" in r]
  assert linear["epochs"] == 1 and linear["linear_top1_last"] == linear["linear_top1_best"] == val_top1
  assert val_top1 * 16 / 100 == round(val_top1 * 16 / 100)
