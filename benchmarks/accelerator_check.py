r"""The accelerator check: the Swin-T or MAE pretraining step with device augmentation, bf16, two batch sizes.

  python benchmarks/accelerator_check.py                   # on a GPU or TPU host, from the checkout's root
  python benchmarks/accelerator_check.py --per_device_batches=64,128 --folder=/data/imagenet
  python benchmarks/accelerator_check.py --config=configs/mae_tiny.py --per_device_batches=256,512
  python benchmarks/accelerator_check.py --config=tests/configs/tiny.py --per_device_batches=1,2 \
      --steps=2 --warmup=0 --num_images=16 --image_size=48,64 --logistic=512,16,4 \
      --out_dir=/tmp/check   # seconds, on a CPU

Run it from a checkout's root with esvit_jax installed (`pip install -e .[cuda12]` or `[tpu]`), or, on a
host without network or TensorFlow, with the wheels of README.md's "Results and speed" installed. Meant to
take under 8 minutes on one GPU or TPU host: two compilations of the full step, a few timed steps each,
the augmentation alone, and the host pipeline. Neither TensorFlow nor tensorflow-datasets is needed: without
them the host pipeline is skipped and the output says so.

Prints one table, one row per per-device batch size: compile s, step ms, images/s, MFU (esvit_jax.flops'
analytic count over the devices' peak bf16 FLOP/s), peak device memory, the augmentation's share of the
step (the augmentation jitted alone, over the step time) and the host CPU ms per image of the device-mode
input pipeline (JPEGs decoded into the canvas: demo JPEGs of --image_size, or the --folder given), with
the host cores that would feed the measured images/s at that cost (host ms per image x images/s / 1000).
Then one more figure: the seconds of the transfer protocol's whole C search with its refit (16 jitted
logistic-regression fits, esvit_jax.evaluate.logistic) on benchmarks/logistic.py's synthetic features
(--logistic: 50,000 x 768, 100 classes), on the first device.
Writes the same figures with the device kind, package versions and the config to
<out_dir>/<device kind>-<date>.json. A batch size that does not fit is reported as such, not fatal.

With an MAE config (configs/mae_tiny.py, configs/mae_base.py) the augmentation is MAE's one crop and flip;
the host's work is the same canvas decode.
"""

from collections.abc import Sequence
import datetime
import importlib.metadata
import json
import os
import platform
import re
import tempfile

from absl import app, flags
import input_pipeline  # A sibling script: benchmarks/ is on sys.path when run as a script.
import jax
import logistic as logistic_benchmark
import train_step as step_benchmark

from esvit_jax import console, sharding
from esvit_jax.data import demo_data

_PER_DEVICE_BATCHES = flags.DEFINE_list(
  "per_device_batches", ["32", "64"], "Per-device batch sizes, ascending (peak memory only grows)."
)
_HOST_BATCHES = flags.DEFINE_integer("host_batches", 8, "Host-pipeline batches of 32 images timed.")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON goes.")
_LOGISTIC = flags.DEFINE_list(
  "logistic", ["50000", "768", "100"], "Examples, dimension, classes of the timed C search; empty skips it."
)
PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "dm-pix",
  "ml-collections",
  "tensorflow-cpu",
  "tensorflow",
  "numpy",
)
COLUMNS = (
  ("per_device_batch", "batch/dev", "d"),
  ("compile_s", "compile s", ".1f"),
  ("step_ms", "step ms", ".1f"),
  ("train_img_s", "images/s", ".1f"),
  ("mfu_percent", "MFU %", ".1f"),
  ("peak_memory_gib", "peak GiB", ".2f"),
  ("augment_share_percent", "augment %", ".1f"),
  ("host_ms_per_img", "host ms/img", ".2f"),
  ("cores_to_feed", "cores to feed", ".2f"),
)


def versions() -> dict[str, str]:
  """Installed versions of the packages the step depends on (those installed)."""
  found = {}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return {"python": platform.python_version(), **found}


def host_ms_per_image(config) -> float:
  """CPU ms per image of the device-mode input pipeline on --folder or on demo JPEGs (batch 32)."""
  from esvit_jax.data import sources  # pylint: disable=g-import-not-at-top  # Needs TensorFlow.

  config = config.copy_and_resolve_references()
  config.update(augment_on="device", batch_size=32, shuffle_buffer=1000)
  with tempfile.TemporaryDirectory(prefix="esvit_check_") as root:
    if input_pipeline.FOLDER.value:
      root = input_pipeline.FOLDER.value
    else:
      size = tuple(int(v) for v in input_pipeline.IMAGE_SIZE.value)
      demo_data.write_jpeg_folder(root, max(input_pipeline.NUM_IMAGES.value, 64), size)
    config.dataset = f"folder:{root}"
    return input_pipeline.time_pretrain_pipeline(
      config, sources.get_source(config.dataset), _HOST_BATCHES.value
    )[1]


def measure(config, mesh, per_device_batch: int) -> dict:
  """One row: the step's figures and the augmentation's share of it, or the error if it failed."""
  config = config.copy_and_resolve_references()
  config.batch_size = per_device_batch * mesh.size
  row = {"per_device_batch": per_device_batch, "global_batch": config.batch_size}
  try:
    row.update(step_benchmark.benchmark_train_step(config, mesh))
    row.update(step_benchmark.benchmark_augmentation(config, mesh))
  except jax.errors.JaxRuntimeError as error:  # Out of memory, most likely: the other row still runs.
    row["error"] = str(error).splitlines()[0][:300]
    return row
  row["augment_share_percent"] = 100 * row["augment_alone_ms"] / row["step_ms"]
  return row


def time_logistic_search(num_examples: int, dim: int, classes: int) -> dict:
  """The transfer protocol's whole C search and refit on synthetic features, on the first device."""
  x, labels = logistic_benchmark.synthetic_features(num_examples, dim, classes)
  result = logistic_benchmark.run_search(logistic_benchmark.Ours(classes, 1000), x, labels, 0.2)
  iterations = sum(f["iterations"] for f in result["fits"]) + result["refit"]["iterations"]
  return {
    "shape": [num_examples, dim, classes],
    "seconds": result["seconds"],
    "fits": len(result["fits"]) + 1,
    "iterations": iterations,
    "best_c": result["best_c"],
    "prepare_s": result["prepare_s"],
  }


def print_table(rows: Sequence[dict]) -> None:
  cells = [
    [row["per_device_batch"], f"failed: {row['error']}"]
    if "error" in row
    else ["n/a" if row.get(key) is None else format(row[key], spec) for key, _, spec in COLUMNS]
    for row in rows
  ]
  print(console.markdown_table([title for _, title, _ in COLUMNS], cells))


def main(argv):
  del argv
  config = step_benchmark.CONFIG.value.copy_and_resolve_references()
  config.augment_on = "device"
  mesh = sharding.make_mesh()
  device = mesh.devices.flat[0]
  print(
    f"{mesh.size} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
    f"{step_benchmark.describe(config)}, from a {config.canvas_size} canvas, {config.compute_dtype}"
  )
  host_pipeline = step_benchmark.host_pipeline_unavailable()
  host_ms = None if host_pipeline else host_ms_per_image(config)
  rows = [measure(config, mesh, int(b)) for b in _PER_DEVICE_BATCHES.value]
  for row in rows:
    row["host_ms_per_img"] = host_ms
    if host_ms is not None and "error" not in row:
      row["cores_to_feed"] = host_ms * row["train_img_s"] / 1000
  print_table(rows)
  print(f"host pipeline: {host_pipeline or 'measured (host ms/img: device-mode decode into the canvas)'}")
  search = time_logistic_search(*map(int, _LOGISTIC.value)) if _LOGISTIC.value else None
  if search:
    print(
      "logistic C search: {shape[0]:,} x {shape[1]} features, {shape[2]} classes: {seconds:.2f} s for "
      "{fits} fits ({iterations} L-BFGS iterations), C = {best_c:.3g}".format(**search)
    )

  now = datetime.datetime.now(datetime.UTC)
  kind = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
  path = os.path.join(_OUT_DIR.value, f"{kind}-{now:%Y-%m-%d}.json")
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(path, "w") as f:
    json.dump(
      {
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "num_devices": mesh.size,
        "date": now.isoformat(timespec="seconds"),
        "versions": versions(),
        "host_cpu_cores": os.cpu_count(),
        "host_ms_per_img": host_ms,
        "host_pipeline": host_pipeline or "measured",
        "rows": rows,
        "logistic_search": search,
        "config": json.loads(config.to_json_best_effort()),
      },
      f,
      indent=2,
    )
  print(f"\nWrote {path}")


if __name__ == "__main__":
  app.run(main)
