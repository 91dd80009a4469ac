"""The train loop's pipelines: multi-crop batches, exact resume, bad files, evaluation over hosts."""

import io
import itertools
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from esvit_jax.configs import common
from esvit_jax.data import augment, demo_data, multicrop, sources


def _config(**overrides):
  config = common.pretrain_config("swin_tiny", 0.1)
  config.update(
    dict(
      dataset="demo",
      batch_size=8,
      global_crop_size=24,
      local_crop_size=12,
      num_local_crops=3,
      eval_resize=36,
      eval_crop_size=32,
      train_split="train",
      shuffle_buffer=16,
      augment_on="host",
      canvas_size=48,
    )
  )
  config.update(overrides)
  return config


@pytest.fixture(name="folder", scope="module")
def _folder(tmp_path_factory):
  """train: 21 JPEGs + 3 bad files (24 files, 3 steps of 8 per epoch); val: 7 PNGs + 1 bad file."""
  root = tmp_path_factory.mktemp("images")
  images, labels = demo_data.generate(28, 40, seed=1)
  for i, (image, label) in enumerate(zip(images, labels, strict=False)):
    split, fmt = ("train", "JPEG") if i < 21 else ("val", "PNG")
    path = root / split / f"c{label % 2}" / f"{i}.{fmt.lower()}"
    os.makedirs(path.parent, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    path.write_bytes(buffer.getvalue())
  for split, name, data in [
    ("train", "c0/cut.jpg", buffer.getvalue()[:30]),
    ("train", "c1/empty.jpg", b""),
    ("train", "c1/words.png", b"hello"),
    ("val", "c0/zero.png", b""),
  ]:
    (root / split / name).write_bytes(data)
  return root


def _take(ds, n):
  return [{k: v.numpy() for k, v in batch.items()} for batch in itertools.islice(ds, n)]


def test_pretrain_batches_have_fixed_shapes_dtypes_and_ranges():
  config = _config()
  [batch] = _take(multicrop.pretrain_dataset(config, process_index=0, process_count=2), 1)
  assert set(batch) == {"globals", "locals", "skipped_files"}
  assert batch["globals"].shape == (4, 2, 24, 24, 3) and batch["globals"].dtype == np.uint8
  assert batch["locals"].shape == (4, 3, 12, 12, 3) and batch["locals"].dtype == np.uint8
  assert batch["skipped_files"].shape == () and batch["skipped_files"] == 0
  for views in (batch["globals"], batch["locals"]):
    assert views.min() < 60 and views.max() > 195  # Full 8-bit range, not normalised floats.
    flat = views.reshape(-1, *views.shape[2:])
    assert len({v.tobytes() for v in flat}) == len(flat)  # Every crop differs.


def test_same_seed_same_batches_other_seed_other_batches():
  first = _take(multicrop.pretrain_dataset(_config(seed=3), process_index=0, process_count=1), 2)
  again = _take(multicrop.pretrain_dataset(_config(seed=3), process_index=0, process_count=1), 2)
  other = _take(multicrop.pretrain_dataset(_config(seed=4), process_index=0, process_count=1), 2)
  for a, b, c in zip(first, again, other, strict=False):
    np.testing.assert_array_equal(a["globals"], b["globals"])
    np.testing.assert_array_equal(a["locals"], b["locals"])
    assert not np.array_equal(a["globals"], c["globals"])


def test_blur_sigma_from_the_config_reaches_the_crops():
  def sharpness(
    config,
  ):  # Mean absolute difference of neighbouring pixels of the always-blurred first global crop.
    [batch] = _take(multicrop.pretrain_dataset(config, process_index=0, process_count=1), 1)
    first = batch["globals"][:, 0].astype(np.float32)
    return np.abs(np.diff(first, axis=2)).mean()

  dino, faint = sharpness(_config()), sharpness(_config(blur_sigma=(0.02, 0.03)))
  assert faint > 1.2 * dino


# DataAugmentationDINO (main_dino.py, main_esvit.py): per crop, flip 0.5, colour jitter 0.8, grayscale 0.2;
# blur 1.0 on global crop 1, 0.1 on global crop 2, 0.5 on the locals; solarize 0.2 on global crop 2 only.
OFFICIAL_RATES = {
  "flip": (0.5, 0.5, 0.5),
  "jitter": (0.8, 0.8, 0.8),
  "gray": (0.2, 0.2, 0.2),
  "blur": (1.0, 0.1, 0.5),
  "solarize": (0.0, 0.2, 0.0),
}


def assert_rates_are_official(choices, crop):
  """choices[name]: bool [num] of what the pipeline chose for crop 0 (global 1), 1 (global 2) or 2 (a
  local); each rate within 4 binomial standard deviations of the official one (exact for 0 and 1)."""
  for name, rates in OFFICIAL_RATES.items():
    p, got = rates[crop], np.mean(choices[name])
    assert abs(got - p) <= 4 * np.sqrt(p * (1 - p) / len(choices[name])), (name, crop, got, p)


def test_host_pipeline_samples_dinos_per_crop_probabilities(monkeypatch):
  # The pipeline runs as in training (seeds of the stream positions, its own sample_photometric); only the
  # application of the sampled choices is replaced by a probe that returns them as the crops' pixels.
  def choices_as_pixels(x, params):
    del x
    chosen = [params[k] for k in ("flip", "gray", "blur", "solarize")] + [params["order"][:, 0] != 4]
    return tf.cast(tf.stack(chosen, axis=1), tf.float32)[:, None, :, None]

  monkeypatch.setattr(augment, "apply_photometric", choices_as_pixels)
  config = _config(batch_size=500, global_crop_size=4, local_crop_size=4, num_local_crops=2)
  batches = _take(multicrop.pretrain_dataset(config, process_index=0, process_count=1), 4)
  crops = {k: np.concatenate([b[k][:, :, 0, :, 0] for b in batches]) for k in ("globals", "locals")}
  views = [crops["globals"][:, 0], crops["globals"][:, 1], crops["locals"].reshape(-1, 5)]
  for crop, chosen in enumerate(views):
    names = ("flip", "gray", "blur", "solarize", "jitter")
    assert_rates_are_official({name: chosen[:, k] == 1 for k, name in enumerate(names)}, crop)


@pytest.mark.parametrize("augment_on", ["host", "device"])
def test_two_hosts_read_halves_of_the_same_global_batches_as_one_host(augment_on):
  config = _config(augment_on=augment_on)
  one = list(
    itertools.islice(
      multicrop.pretrain_dataset(config, process_index=0, process_count=1).as_numpy_iterator(), 3
    )
  )
  halves = [
    list(
      itertools.islice(
        multicrop.pretrain_dataset(config, process_index=i, process_count=2).as_numpy_iterator(), 3
      )
    )
    for i in range(2)
  ]
  for step in range(3):
    for key in set(one[step]) - {"skipped_files"}:
      np.testing.assert_array_equal(
        np.concatenate([halves[0][step][key], halves[1][step][key]]), one[step][key]
      )


@pytest.mark.parametrize("augment_on", ["host", "device"])
def test_restored_stream_continues_with_exactly_the_next_batch_across_epochs(folder, augment_on):
  config = _config(dataset=f"folder:{folder}", augment_on=augment_on)
  source = sources.get_source(config.dataset)
  assert multicrop.steps_per_epoch(config, source.num_examples("train")) == 3
  stream = _take(multicrop.pretrain_dataset(config, process_index=0, process_count=1, source=source), 8)
  for start in (2, 4):  # Inside epoch 0 and inside epoch 1.
    resumed = _take(
      multicrop.pretrain_dataset(config, start_step=start, process_index=0, process_count=1, source=source), 3
    )
    for expected, got in zip(stream[start:], resumed, strict=False):
      for key in expected:
        np.testing.assert_array_equal(expected[key], got[key])
  # Each epoch reads all 24 files once: the 3 bad ones are counted, and replaced by good rows.
  assert [sum(b["skipped_files"] for b in stream[e * 3 : e * 3 + 3]) for e in (0, 1)] == [3, 3]
  images = "globals" if augment_on == "host" else "canvas"
  assert not np.array_equal(stream[0][images], stream[3][images])  # Epochs are reshuffled.


@pytest.mark.parametrize("augment_on", ["host", "device"])
def test_bad_rows_are_replaced_by_good_examples_of_the_batch(folder, augment_on):
  config = _config(dataset=f"folder:{folder}", batch_size=24, augment_on=augment_on)
  [batch] = _take(multicrop.pretrain_dataset(config, process_index=0, process_count=1), 1)
  assert batch["skipped_files"] == 3
  if augment_on == "host":
    placeholder = np.full((24, 24, 3), 128, np.uint8)
    assert not any(np.array_equal(g, placeholder) for g in batch["globals"][:, 0])
    images = batch["globals"]
  else:  # Every row holds a 40 px folder image, none the 8 px placeholder.
    assert (batch["image_size"] == 40).all()
    images = batch["canvas"]
  # 21 distinct good examples; the 3 other rows repeat some of them.
  assert len({image.tobytes() for image in images}) == 21


def test_device_mode_batches_hold_each_image_once_in_its_canvas():
  config = _config(augment_on="device", canvas_size=80)
  [batch] = _take(multicrop.pretrain_dataset(config, process_index=1, process_count=2), 1)
  assert set(batch) == {"canvas", "image_size", "skipped_files"}
  assert batch["canvas"].shape == (4, 80, 80, 3) and batch["canvas"].dtype == np.uint8
  assert batch["image_size"].dtype == np.int32 and (batch["image_size"] == 64).all()
  demo = {image.tobytes() for image in sources.DemoSource.arrays("train")[0]}
  for canvas in batch["canvas"]:
    assert canvas[:64, :64].tobytes() in demo  # Unaugmented, at full size ...
    assert not canvas[64:].any() and not canvas[:, 64:].any()  # ... and zeros around it.


def _jpeg(height: int, width: int, seed: int = 0) -> bytes:
  image = demo_data.generate(1, (height, width), seed=seed)[0][0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


@pytest.mark.parametrize(
  "height,width,max_side,expected",
  [
    (700, 1000, 512, (700, 1000)),  # Halving would make the longer side 500 < 512.
    (700, 1000, 300, (350, 500)),
    (1000, 700, 128, (250, 175)),
    (700, 1000, 100, (88, 125)),  # 1/8 scale; ceil(700 / 8) = 88.
  ],
)
def test_large_jpegs_are_decoded_shrunk_by_dct_scaling_as_pil_draft(height, width, max_side, expected):
  raw = _jpeg(height, width)
  image = sources.decode_image(tf.constant(raw), max_side).numpy()
  assert image.shape == (*expected, 3)
  reference = Image.open(io.BytesIO(raw))  # PIL's draft mode: libjpeg's DCT scaling, the same decoder.
  reference.draft("RGB", (max_side, 1) if width >= height else (1, max_side))
  np.testing.assert_array_equal(image, np.asarray(reference.convert("RGB")))


def test_canvas_holds_a_small_image_unchanged_in_its_top_left_corner():
  image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)
  view = multicrop.canvas_view(tf.constant(image), 64)
  canvas = view["canvas"].numpy()
  assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
  np.testing.assert_array_equal(view["image_size"], [40, 30])
  np.testing.assert_array_equal(canvas[:40, :30], image)
  assert not canvas[40:].any() and not canvas[:, 30:].any()


def test_canvas_shrinks_a_large_image_to_fit_keeping_its_aspect():
  """A 300 x 200 image in a 64 canvas: 64 x 43 (200 * 64 / 300 = 42.7), the area average of PIL's box filter.

  Tolerance: both average the input pixels that each output pixel covers, but weigh the partly covered
  ones at the borders differently; measured on this image, mean 0.3 levels and 99th percentile 4."""
  image = demo_data.generate(1, (300, 200), seed=3)[0][0]
  view = multicrop.canvas_view(tf.constant(image), 64)
  np.testing.assert_array_equal(view["image_size"], [64, 43])
  canvas = view["canvas"].numpy()
  reference = np.asarray(Image.fromarray(image).resize((43, 64), Image.BOX), np.float32)
  difference = np.abs(canvas[:64, :43].astype(np.float32) - reference)
  assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 4, difference.mean()
  assert not canvas[:, 43:].any()


def test_device_mode_reads_a_large_jpeg_shrunk_into_the_canvas(tmp_path):
  (tmp_path / "train" / "c").mkdir(parents=True)
  for i in range(8):
    (tmp_path / "train" / "c" / f"{i}.jpg").write_bytes(_jpeg(600, 900, seed=i))
  config = _config(dataset=f"folder:{tmp_path}", augment_on="device", canvas_size=96)
  [batch] = _take(multicrop.pretrain_dataset(config, process_index=0, process_count=1), 1)
  np.testing.assert_array_equal(batch["image_size"], [[64, 96]] * 8)  # Decoded at 1/8 (75 x 113), resized.
  assert batch["canvas"][:, :64, :96].std() > 20 and not batch["canvas"][:, 64:].any()


def test_eval_over_two_hosts_sees_every_example_once_with_equal_batch_counts(folder):
  config = _config(dataset=f"folder:{folder}")
  source = sources.get_source(config.dataset)
  paths, labels = source.files("val")
  seen = []
  for index in range(2):
    ds, num_batches = multicrop.eval_dataset(
      config, "validation", batch_size=4, process_index=index, process_count=2, source=source
    )
    batches = _take(ds, 10)
    assert num_batches == 2 and len(batches) == 2
    for b in batches:
      assert b["image"].shape == (2, 32, 32, 3) and b["image"].dtype == np.uint8
      assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
      seen += [(int(y), x.tobytes()) for y, x, m in zip(b["label"], b["image"], b["mask"], strict=False) if m]
    start, stop = sources.HostShard(index, 2).bounds(len(paths))
    bad_here = sum(str(path).endswith("zero.png") for path in paths[start:stop])
    assert sum(b["skipped_files"] for b in batches) == bad_here
  assert len(seen) == 7 and len({image for _, image in seen}) == 7
  assert sorted(label for label, _ in seen) == sorted(
    label for path, label in zip(paths, labels, strict=False) if not str(path).endswith("zero.png")
  )


def test_eval_images_are_the_resized_centre_crops():
  config = _config(eval_resize=64, eval_crop_size=48)
  ds, num_batches = multicrop.eval_dataset(config, "test", batch_size=1000, process_index=1, process_count=2)
  assert num_batches == 1
  [batch] = _take(ds, 1)
  images, labels = sources.DemoSource.arrays("test")
  # Host 1 of 2 holds examples 500..999; 64 px demo images are not resized, only centre-cropped.
  np.testing.assert_array_equal(batch["image"], images[500:1000, 8:56, 8:56])
  np.testing.assert_array_equal(batch["label"], labels[500:1000])
  assert batch["mask"].all()


def test_classification_training_batches():
  config = _config(crop_scale=(0.08, 1.0))
  ds = multicrop.train_classification_dataset(
    config, "train", batch_size=16, crop_size=20, start_step=5, process_index=0, process_count=1
  )
  [batch] = _take(ds, 1)
  assert batch["image"].shape == (16, 20, 20, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))


def test_batch_size_must_split_over_hosts():
  with pytest.raises(ValueError, match="does not split over 3 processes"):
    multicrop.pretrain_dataset(_config(), process_index=0, process_count=3)


def test_eval_max_examples_takes_the_first_examples_of_the_split():
  config = _config(eval_resize=64, eval_crop_size=64)
  images, labels = sources.DemoSource.arrays("test")
  got = []
  for index in range(2):
    ds, num_batches = multicrop.eval_dataset(
      config, "test", batch_size=8, process_index=index, process_count=2, max_examples=30
    )
    assert num_batches == 4  # 15 examples per host in batches of 4.
    batches = _take(ds, 4)
    got += [(x, y) for b in batches for x, y, m in zip(b["image"], b["label"], b["mask"], strict=True) if m]
  assert len(got) == 30
  np.testing.assert_array_equal(np.stack([x for x, _ in got]), images[:30])
  np.testing.assert_array_equal([y for _, y in got], labels[:30])
