r"""Reading + decoding throughput of the pretraining sources: an image folder against the same JPEGs in a TFDS
dataset stored as ArrayRecord (read by index) and as TFRecord (the fallback).

  python benchmarks/data_sources.py                     # 256 demo JPEGs of 375 x 500 in a temp dir
  python benchmarks/data_sources.py --num_images=1024 --epochs=2

Every source is read as pretraining reads it (one host, shuffled epochs cut into global batches), without
augmentation: decode only. One warm-up epoch, then --epochs timed. CPU milliseconds per image (all threads
of the process) do not depend on other load on the machine; images/s (wall) do.
"""

import os
import resource
import shutil
import tempfile
import time

from absl import app, flags
import tensorflow as tf
import tensorflow_datasets as tfds

from esvit_jax import console
from esvit_jax.data import demo_data, sources

_NUM = flags.DEFINE_integer("num_images", 256, "Demo JPEGs to write.")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs timed per source, after one warm-up epoch.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch the epochs are cut into.")
_SHARDS = flags.DEFINE_integer("shards", 8, "Files per TFDS split.")


class BenchmarkJpegs(tfds.core.GeneratorBasedBuilder):
  """The benchmark's JPEG files, bytes unchanged, as a TFDS dataset."""

  VERSION = tfds.core.Version("1.0.0")
  paths: list[str] = []

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=demo_data.CLASS_NAMES),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, path in enumerate(self.paths):
      with open(path, "rb") as f:
        yield i, {"image": f.read(), "label": os.path.basename(os.path.dirname(path))}


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(source: sources.Source, epochs: int, batch_size: int) -> tuple[float, float]:
  """(images/s, CPU ms per image) of reading and decoding `epochs` shuffled epochs of the train split."""

  def one_epoch(epoch: int) -> int:
    records = source.epoch_records(
      "train",
      epoch,
      shard=sources.HostShard(),
      seed=0,
      shuffle=True,
      shuffle_buffer=1000,
      host_batch=batch_size,
    )
    ds = source.load(records, "train").map(lambda e: tf.shape(e["image"])).prefetch(64)
    return sum(1 for _ in ds.as_numpy_iterator())

  one_epoch(0)
  wall, cpu = time.time(), _cpu_seconds()
  count = sum(one_epoch(e) for e in range(1, epochs + 1))
  wall, cpu = time.time() - wall, _cpu_seconds() - cpu
  return count / wall, 1000 * cpu / count


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix="esvit_jax_sources_")
  BenchmarkJpegs.paths = demo_data.write_jpeg_folder(os.path.join(root, "folder"), _NUM.value)
  rows = {"image folder": sources.get_source(f"folder:{os.path.join(root, 'folder')}")}
  for file_format in ("array_record", "tfrecord"):
    data_dir = os.path.join(root, file_format)
    BenchmarkJpegs(data_dir=data_dir, file_format=file_format).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=_SHARDS.value)
    )
    rows[f"TFDS, {file_format}"] = sources.get_source("benchmark_jpegs", data_dir=data_dir)

  try:
    results = {name: measure(source, _EPOCHS.value, _BATCH.value) for name, source in rows.items()}
  finally:
    shutil.rmtree(root, ignore_errors=True)
  folder_cpu = results["image folder"][1]
  print(
    console.markdown_table(
      ["source", "images/s (wall)", "CPU ms/image", "CPU vs folder"],
      [
        [name, f"{rate:.1f}", f"{cpu:.2f}", f"{cpu / folder_cpu:.2f}x"]
        for name, (rate, cpu) in results.items()
      ],
    )
  )
  print(f"{_NUM.value} JPEGs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
