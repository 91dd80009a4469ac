r"""Throughput of the multi-crop input pipeline on a folder of ImageNet-sized JPEGs.

  python benchmarks/input_pipeline.py                      # writes 256 demo JPEGs (375x500) to a temp dir
  python benchmarks/input_pipeline.py --folder=/data/imagenet --batches=50

Prints images/s (wall time) and CPU milliseconds per image for the full pipeline (decode, 2 x 224 + 8 x 96
crops with the DINO augmentations, batching), and for cumulative stages of it, which shows where the time
goes. CPU time per image gives images/s per core even when other processes share the machine.
"""
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from PIL import Image
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Runs as a script.
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from esvit_jax.data import augment  # pylint: disable=g-import-not-at-top,wrong-import-position
from esvit_jax.data import demo_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from esvit_jax.data import multicrop  # pylint: disable=g-import-not-at-top,wrong-import-position
from esvit_jax.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position

_FOLDER = flags.DEFINE_string("folder", None, "Root with train/<class>/*.jpg; default: write demo JPEGs.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "Demo JPEGs to write when --folder is not given.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", 24, "Batches timed per row (after 4 warm-up batches).")
_STAGES = flags.DEFINE_bool("stages", True, "Also time the cumulative stages of the pipeline.")


def write_demo_jpegs(root: str, num: int, size=(375, 500)) -> None:
  """num demo images as root/train/<class>/<i>.jpg (quality 90), drawn in chunks to bound memory."""
  for start in range(0, num, 64):
    images, labels = demo_data.generate(min(64, num - start), size, seed=start)
    for i, (image, label) in enumerate(zip(images, labels)):
      folder = os.path.join(root, "train", demo_data.CLASS_NAMES[label])
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(image).save(os.path.join(folder, f"{start + i:06d}.jpg"), quality=90)


def _stage_transforms(config):
  """Cumulative prefixes of the pretraining transform: name -> fn(example, seed) -> dict."""
  groups = ((config.global_crop_size, 2, config.global_crop_scale),
            (config.local_crop_size, config.num_local_crops, config.local_crop_scale))

  def crops(example, seed, photometric):
    out = {}
    for k, (size, num, scale) in enumerate(groups):
      seed_crop, seed_photo = augment.split_seed(tf.random.experimental.stateless_fold_in(seed, k), 2)
      x = augment.random_resized_crops(example["image"], seed_crop, num, size, scale)
      if photometric:  # Flip, jitter and grayscale; blur and solarization never chosen.
        x = augment.apply_photometric(x, augment.sample_photometric(seed_photo, [0.0] * num, [0.0] * num))
      out[str(size)] = augment.to_uint8(x)
    return out
  return {
      "decode only": lambda example, seed: {"shape": tf.shape(example["image"])},
      "+ 10 random resized crops": lambda example, seed: crops(example, seed, False),
      "+ flip, colour jitter, grayscale": lambda example, seed: crops(example, seed, True),
      "full (+ blur, solarize)": lambda example, seed: multicrop.multicrop_views(
          example["image"], seed, config),
  }


def _time(ds, batches: int, batch_size: int) -> tuple[float, float]:
  """(images per second of wall time, CPU milliseconds per image) over `batches` batches after 4
  warm-up batches. CPU time counts all of this process's threads, so it holds on a shared machine."""
  it = iter(ds)
  for _ in range(4):
    next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  images = batches * batch_size
  return images / (time.perf_counter() - wall), 1000 * (time.process_time() - cpu) / images


def main(_):
  config = common.pretrain_config("swin_tiny", 0.1)
  config.batch_size = _BATCH.value
  root = _FOLDER.value
  if root is None:
    root = tempfile.mkdtemp(prefix="esvit_bench_")
    write_demo_jpegs(root, _NUM_IMAGES.value)
  config.dataset = f"folder:{root}"
  source = sources.get_source(config.dataset)
  shard = sources.HostShard(0, 1)
  cores = os.cpu_count()

  rows = []
  if _STAGES.value:
    for name, transform in _stage_transforms(config).items():
      ds = multicrop.training_batches(config, source, config.train_split, config.batch_size, 0, shard,
                                      transform)
      rows.append((name, _time(ds, _BATCHES.value, config.batch_size)))
  else:
    ds = multicrop.pretrain_dataset(config, process_index=0, process_count=1, source=source)
    rows.append(("full (+ blur, solarize)", _time(ds, _BATCHES.value, config.batch_size)))

  print(f"\nInput pipeline, {source.num_examples('train')} JPEGs in {root}, batch {config.batch_size}, "
        f"crops 2 x {config.global_crop_size} + {config.num_local_crops} x {config.local_crop_size}, "
        f"{cores} CPU cores, TensorFlow {tf.__version__}")
  print(f"| {'pipeline':34s} | images/s (wall) | CPU ms/image | images/s/core (CPU time) |")
  print(f"|{'-' * 36}|----------------:|-------------:|-------------------------:|")
  for name, (rate, cpu_ms) in rows:
    print(f"| {name:34s} | {rate:15.1f} | {cpu_ms:12.1f} | {1000 / cpu_ms:24.1f} |")
  rate, cpu_ms = rows[-1][1]
  print(f"\nfull pipeline: {rate:.1f} images/s on {cores} cores ({rate / cores:.1f} per core, wall time); "
        f"{1000 / cpu_ms:.1f} images/s per fully used core (CPU time)")


if __name__ == "__main__":
  app.run(main)
