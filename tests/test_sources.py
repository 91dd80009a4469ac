"""Data sources: the demo set, image folders with bad files, per-host splits, and clear errors (TFDS
datasets: test_tfds.py)."""

import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from esvit_jax.data import demo_data, sources


def _png(array) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def _jpeg(array) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


def _write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture(name="folder")
def _folder(tmp_path):
  """root/train with 12 good images (JPEG, grayscale PNG, RGBA PNG) in 3 classes and 4 bad files,
  root/val with 5 good images."""
  images, labels = demo_data.generate(17, 24, seed=3)
  good = []
  for i in range(12):
    kind = i % 3
    array = (
      images[i]
      if kind == 0
      else images[i].mean(-1).astype(np.uint8)
      if kind == 1
      else np.concatenate([images[i], np.full((24, 24, 1), 200, np.uint8)], -1)
    )
    name = f"train/c{labels[i] % 3}/img{i}.{'jpg' if kind == 0 else 'png'}"
    _write(tmp_path / name, _jpeg(array) if kind == 0 else _png(array))
    good.append(name)
  jpeg = _jpeg(images[0])
  _write(tmp_path / "train/c0/truncated.jpg", jpeg[: len(jpeg) // 3])
  _write(tmp_path / "train/c1/empty.jpeg", b"")
  _write(tmp_path / "train/c2/text.jpg", b"not an image at all\n" * 10)
  _write(tmp_path / "train/c2/broken.PNG", _png(images[1])[:40])
  _write(tmp_path / "train/c2/notes.txt", b"ignored: not an image extension")
  for i in range(12, 17):
    _write(tmp_path / f"val/c{i % 3}/v{i}.png", _png(images[i]))
  return tmp_path, good


def _load_all(source, split, shard=sources.HostShard(0, 1)):
  records = source.epoch_records(split, 0, shard=shard, seed=0, shuffle=False)
  return list(source.load(records, split).as_numpy_iterator())


def test_folder_decodes_good_files_and_flags_bad_ones_without_stopping(folder):
  root, good = folder
  source = sources.get_source(f"folder:{root}")
  assert source.num_classes == 3 and source.num_examples("train") == 16
  examples = _load_all(source, "train")
  assert len(examples) == 16
  assert sum(not e["ok"] for e in examples) == 4
  decoded = [e for e in examples if e["ok"]]
  assert all(e["image"].shape == (24, 24, 3) and e["image"].dtype == np.uint8 for e in decoded)
  # Every good image arrives, RGB, exactly as PIL decodes it (JPEGs with libjpeg's accurate DCT too);
  # grayscale and RGBA converted like PIL's convert('RGB').
  paths, _ = source.files("train")
  by_name = {
    os.path.relpath(p.decode() if isinstance(p, bytes) else str(p), root): e
    for p, e in zip(paths, examples, strict=True)
  }
  for name in good:
    image = by_name[name]["image"].astype(int)
    expected = np.asarray(Image.open(root / name).convert("RGB")).astype(int)
    np.testing.assert_array_equal(image, expected)


def test_folder_labels_come_from_class_folders(folder):
  root, _ = folder
  source = sources.get_source(f"folder:{root}")
  paths, labels = source.files("val")
  for path, label in zip(paths, labels, strict=False):
    assert os.path.basename(os.path.dirname(str(path))) == f"c{label}"
  assert source.resolve_split("validation") == "val"


@pytest.mark.parametrize("dataset,split", [("demo", "test"), ("folder", "train")])
def test_two_hosts_get_disjoint_parts_that_cover_the_split(dataset, split, folder):
  source = sources.get_source(f"folder:{folder[0]}" if dataset == "folder" else "demo")
  orders = []
  for epoch in (0, 1):  # Every epoch deals a new permutation of the split to the hosts.
    parts = [
      [
        r["record"]
        for r in source.epoch_records(
          split, epoch, shard=sources.HostShard.current(i, 2), seed=7, shuffle=True, host_batch=4
        ).as_numpy_iterator()
      ]
      for i in range(2)
    ]
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) == len(parts[1]) == source.num_examples(split) // 8 * 4
    assert len(set(parts[0]) | set(parts[1])) == source.num_examples(split) // 8 * 8
    orders.append(parts[0])
  assert orders[0] != orders[1]
  # Without shuffling (evaluation), each host reads its own contiguous slice and together they cover it.
  slices = [
    [
      r["record"]
      for r in source.epoch_records(
        split, 0, shard=sources.HostShard.current(i, 2), seed=7, shuffle=False
      ).as_numpy_iterator()
    ]
    for i in range(2)
  ]
  assert not set(slices[0]) & set(slices[1])
  assert len(slices[0]) + len(slices[1]) == source.num_examples(split)


def test_shuffled_order_is_deterministic_from_the_seed():
  source = sources.get_source("demo")

  def order(seed):
    records = source.epoch_records("test", 3, shard=sources.HostShard(), seed=seed, shuffle=True)
    return [int(r["record"]) for r in records.as_numpy_iterator()]

  assert order(1) == order(1) and order(1) != order(2)
  assert sorted(order(1)) == list(range(1000))


def test_demo_data_is_deterministic_balanced_and_not_separable_by_colour():
  images, labels = demo_data.generate(400, 32, seed=5)
  again, _ = demo_data.generate(400, 32, seed=5)
  other, _ = demo_data.generate(400, 32, seed=6)
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)
  assert images.shape == (400, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [40] * demo_data.NUM_CLASSES)
  # Nearest class-mean colour (fit on half, tested on the other half) stays near chance (10 %).
  colour = images.reshape(400, -1, 3).mean(1)
  means = np.stack([colour[:200][labels[:200] == k].mean(0) for k in range(10)])
  predicted = np.argmin(((colour[200:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(predicted == labels[200:]) < 0.25
  wide, _ = demo_data.generate(2, (15, 41), seed=0)
  assert wide.shape == (2, 15, 41, 3)


def test_unknown_dataset_missing_and_empty_folders_and_unknown_split_fail_clearly(tmp_path):
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset_xyz'.*folder:"):
    sources.get_source("no_such_dataset_xyz")
  with pytest.raises(FileNotFoundError, match=r"missing.*<split>/<class>"):
    sources.get_source(f"folder:{tmp_path / 'missing'}")
  with pytest.raises(ValueError, match="no split folders"):
    sources.get_source(f"folder:{tmp_path}")
  (tmp_path / "train" / "a").mkdir(parents=True)
  source = sources.get_source(f"folder:{tmp_path}")
  with pytest.raises(ValueError, match=r"No images in .*train.*<class>/\*\.jpg"):
    source.num_examples("train")
  with pytest.raises(ValueError, match=r"Split 'test' does not exist.*\['train'\]"):
    source.num_examples("test")
  with pytest.raises(ValueError, match=r"Split 'validation' does not exist.*\['train', 'test'\]"):
    sources.get_source("demo").num_examples("validation")


def test_host_shard_checks_its_index():
  with pytest.raises(ValueError, match="process_index 2"):
    sources.HostShard.current(2, 2)
  assert sources.HostShard.current(None, None) == sources.HostShard(0, 1)
  assert [sources.HostShard(i, 3).bounds(10) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
  tf.debugging.assert_equal(sources.stream_seed(1, 2), sources.stream_seed(1, tf.constant(2)))
