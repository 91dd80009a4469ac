r"""Host cost of the pretraining input pipeline on a folder of ImageNet-sized JPEGs, in both modes.

  python benchmarks/input_pipeline.py                      # writes 256 demo JPEGs (375x500) to a temp dir
  python benchmarks/input_pipeline.py --folder=/data/imagenet --batches=50
  python benchmarks/input_pipeline.py --image_size=1200,1600  # larger than the canvas: DCT scaling + resize

(Run from the checkout's root, where the config paths point; the package must be installed, as `make install`
does.)

Host mode (config.augment_on='host'): images/s (wall time) and CPU milliseconds per image of the full
pipeline (decode, 2 x 224 + 8 x 96 crops with the DINO augmentations, batching), and of cumulative stages
of it, which shows where the time goes. Device mode (the default): the same JPEGs decoded once into the
uint8 canvas (the crops are made by the train step); the ratio of the two CPU costs per image is what
moving the augmentation to the accelerator saves the host. CPU time per image gives images/s per core
even when other processes share the machine.
"""

import os
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from esvit_jax.data import demo_data

# TensorFlow and esvit_jax's tf.data modules are imported where a pipeline is built: accelerator_check.py
# imports this module for its flags on accelerator hosts that have no TensorFlow.
FOLDER = flags.DEFINE_string("folder", None, "Root with train/<class>/*.jpg; default: write demo JPEGs.")
NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "Demo JPEGs to write when --folder is not given.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_BATCHES = flags.DEFINE_integer("batches", 24, "Batches timed per row (after 4 warm-up batches).")
_STAGES = flags.DEFINE_bool("stages", True, "Also time the cumulative stages of the host-mode pipeline.")
IMAGE_SIZE = flags.DEFINE_list("image_size", ["375", "500"], "Height,width of the demo JPEGs.")
_CANVAS = flags.DEFINE_integer("canvas_size", 512, "Device mode: config.canvas_size.")


def _stage_transforms(config):
  """Cumulative prefixes of the pretraining transform: name -> fn(example, seed) -> dict."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from esvit_jax.data import augment, multicrop  # pylint: disable=g-import-not-at-top

  groups = (
    (config.global_crop_size, 2, config.global_crop_scale),
    (config.local_crop_size, config.num_local_crops, config.local_crop_scale),
  )

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
      example["image"], seed, config
    ),
  }


def time_pretrain_pipeline(config, source, batches: int) -> tuple[float, float]:
  """(images/s of wall time, CPU ms per image) of multicrop.pretrain_dataset in config.augment_on's mode,
  reading the esvit_jax.data.sources.Source given."""
  from esvit_jax.data import multicrop  # pylint: disable=g-import-not-at-top

  ds = multicrop.pretrain_dataset(config, process_index=0, process_count=1, source=source)
  return _time(ds, batches, config.batch_size)


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
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from esvit_jax import console  # pylint: disable=g-import-not-at-top
  from esvit_jax.data import multicrop, sources  # pylint: disable=g-import-not-at-top

  config = CONFIG.value.copy_and_resolve_references()
  config.batch_size, config.augment_on, config.canvas_size = _BATCH.value, "host", _CANVAS.value
  root = FOLDER.value
  if root is None:
    root = tempfile.mkdtemp(prefix="esvit_bench_")
    demo_data.write_jpeg_folder(root, NUM_IMAGES.value, tuple(int(v) for v in IMAGE_SIZE.value))
  config.dataset = f"folder:{root}"
  source = sources.get_source(config.dataset)
  shard = sources.HostShard(0, 1)
  cores = os.cpu_count()

  rows = []
  if _STAGES.value:
    for name, transform in _stage_transforms(config).items():
      ds = multicrop.training_batches(
        config, source, config.train_split, config.batch_size, 0, shard, transform
      )
      rows.append((name, _time(ds, _BATCHES.value, config.batch_size)))
  else:
    rows.append(("full (+ blur, solarize)", time_pretrain_pipeline(config, source, _BATCHES.value)))
  host_ms = rows[-1][1][1]
  config.augment_on = "device"
  rows.append(
    (
      f"device mode: decode into {config.canvas_size} canvas",
      time_pretrain_pipeline(config, source, _BATCHES.value),
    )
  )

  print(
    f"\nInput pipeline, {source.num_examples('train')} JPEGs in {root}, batch {config.batch_size}, "
    f"crops 2 x {config.global_crop_size} + {config.num_local_crops} x {config.local_crop_size}, "
    f"{cores} CPU cores, TensorFlow {tf.__version__}"
  )
  print(
    console.markdown_table(
      ["pipeline", "images/s (wall)", "CPU ms/image", "images/s/core (CPU time)"],
      [[name, f"{rate:.1f}", f"{cpu_ms:.2f}", f"{1000 / cpu_ms:.1f}"] for name, (rate, cpu_ms) in rows],
    )
  )
  rate, device_ms = rows[-1][1]
  print(
    f"\ndevice mode: {rate:.1f} images/s on {cores} cores (wall time), {1000 / device_ms:.1f} images/s "
    f"per fully used core (CPU time); host mode needs {host_ms / device_ms:.1f}x more host CPU per image "
    f"({host_ms:.2f} vs {device_ms:.2f} ms)"
  )


if __name__ == "__main__":
  # Defined here, not at import: accelerator_check.py imports this module next to train_step.py's --config.
  CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/swin_t.py", "Pretraining config: crop sizes, scales and augmentation strengths."
  )
  app.run(main)
