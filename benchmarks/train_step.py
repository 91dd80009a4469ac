r"""Speed of the real train step (EsViT or MAE) and of backbone inference, with MFU, on the devices JAX sees.

  python benchmarks/train_step.py --config configs/swin_t.py --per_device_batch 64
  python benchmarks/train_step.py --config configs/mae_tiny.py --per_device_batch 256
  python benchmarks/train_step.py --config configs/demo.py --per_device_batch 8 --loop_steps 60   # CPU
  python benchmarks/train_step.py --config tests/configs/tiny.py --per_device_batch 2 --steps 3   # smoke run

(Run from the checkout's root, where the config paths point; the package must be installed, as `make install`
does.)

Reports, after warm-up: compile time, median step time, training images/s (per device and in all), peak
device memory, MFU (esvit_jax.flops analytic FLOPs / step time / peak bf16 FLOP/s of the devices), the
XLA cost-analysis FLOPs as a cross-check, backbone-only inference images/s at the global crop size (the
paper's Table 1 measure, 128 images per forward as DINO's protocol), and the host input pipeline's images/s
on this machine's cores with the number of cores needed to feed the measured step rate.
The batch is synthetic and already on the devices: this measures the step, not the input pipeline.
The step needs neither TensorFlow nor tensorflow-datasets (accelerator hosts may lack them); without them the
host pipeline's figures are skipped, and the output says so.

In device mode (config.augment_on, the default) it also reports the augmentation inside the step: its
XLA cost-analysis FLOPs per image against the step's, its share of the step time (the step timed with
and without it: the host-mode step on ready crops), and the host-to-device bytes per image of both modes
and their rate at 2,500 images/s (one H100 at 40% MFU on Swin-T). --loop_steps runs the real train loop
(train.train_and_evaluate, real input pipeline, no evaluation) for that many steps in the config's mode
and reports its images/s and input_wait (the fraction of the loop's wall time spent waiting for a batch);
add --config.augment_on=host for the other mode.

An MAE config (config.method 'mae') has one crop per image and no host mode: "augment" is its crop and
flip alone, and the host pipeline is the canvas decode alone. MAE's step is so cheap per image that its
feed rate is derived from the analytic count: the images/s one H100 trains at 40% MFU, the host-to-device
bytes at that rate and the host cores it takes. D-MAE's teacher is a randomly initialised ViT-Base (its
FLOPs, not its weights, set the step time).
"""

import os
import statistics
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from esvit_jax import console, flops, mae_step, models, sharding, train_step
from esvit_jax.data import device_augment
from esvit_jax.models import mae

CONFIG = config_flags.DEFINE_config_file("config", "configs/swin_t.py", "Pretraining config.")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 32, "Images per device per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_INFERENCE_BATCH = flags.DEFINE_integer("inference_batch", 128, "Images per device per inference forward.")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 8, "Host-pipeline batches timed; 0 skips it.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak bf16 TFLOP/s per device (default: known table).")
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 0, "Steps of the real train loop; 0 skips it.")
FEED_RATE = 2500  # Images/s one H100 trains at 40% MFU on Swin-T (BENCHMARKS.md): the input it needs.
FEED_MFU = 0.4  # The MFU target MAE's feed rate assumes, on an H100.
STEPS_PER_EPOCH = 2502  # ImageNet's 1,281,167 images in batches of 512: only the schedules read it.

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "GH200": 989e12,
  "A100": 312e12,
  "L4": 121e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}


def peak_flops(device: jax.Device) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from)."""
  if _PEAK_TFLOPS.value:
    return _PEAK_TFLOPS.value * 1e12, "--peak_tflops"
  for name, value in PEAK_BF16_FLOPS.items():
    if name.lower() in device.device_kind.lower():
      return value, f"data sheet ({name} bf16 dense)"
  return measured_matmul_flops(device), "measured f32 matmul on this device"


def measured_matmul_flops(device: jax.Device, n: int = 1024) -> float:
  """Best of a few n x n x n float32 matmuls: the reachable matrix throughput of a device without a table."""
  x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = min(_timed(lambda: matmul(x).block_until_ready()) for _ in range(5))
  return 2 * n**3 / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def is_mae(config) -> bool:
  """Whether config is an MAE (or D-MAE) pretraining config."""
  return config.get("method") == "mae"


def build_pretraining(config, mesh) -> train_step.Pretraining | mae_step.MaePretraining:
  """The method's pretraining (as train.build_pretraining, whose clu and TensorFlow an accelerator host may
  lack); D-MAE's teacher is a random ViT-Base with config.distill.teacher_heads heads."""
  if not is_mae(config):
    return train_step.Pretraining(config, mesh, steps_per_epoch=STEPS_PER_EPOCH)
  teacher = None
  if config.distill.enabled:
    size, dtype = config.crop_size, jnp.dtype(config.compute_dtype)
    backbone = models.build_backbone(
      "vit_base", num_heads=config.distill.teacher_heads, drop_path_rate=0.0, dtype=dtype
    )
    init = lambda key: backbone.init(key, jnp.zeros((1, size, size, 3), dtype))["params"]  # noqa: E731
    teacher = (backbone, jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(1)))
  return mae_step.MaePretraining(config, mesh, steps_per_epoch=STEPS_PER_EPOCH, teacher=teacher)


def describe(config) -> str:
  """The model and its inputs in one line, for the headers."""
  backbone = models.backbone_from_config(config.model)
  if is_mae(config):
    patches = (config.crop_size // backbone.patch_size) ** 2
    teacher = ", D-MAE (random ViT-Base teacher)" if config.distill.enabled else ""
    return (
      f"MAE {config.model.backbone} patch {backbone.patch_size}, one {config.crop_size} px crop, "
      f"{mae.num_kept(patches, config.mask_ratio)} of {patches} patches visible, decoder "
      f"{config.model.decoder_dim} x {config.model.decoder_depth}{teacher}"
    )
  shape = f"W{backbone.window_size}" if hasattr(backbone, "window_size") else f"patch {backbone.patch_size}"
  return (
    f"{config.model.backbone} {shape}, 2x{config.global_crop_size} + "
    f"{config.num_local_crops}x{config.local_crop_size} crops, K={config.model.out_dim}"
  )


def batch_shapes(config) -> dict[str, tuple[int, ...]]:
  """Shapes of one global batch as the host ships it, in config.augment_on's mode."""
  b, s = config.batch_size, config.get("canvas_size", 0)
  if config.augment_on == "device":
    return {"canvas": (b, s, s, 3), "image_size": (b, 2)}
  return {
    "globals": (b, 2, config.global_crop_size, config.global_crop_size, 3),
    "locals": (b, config.num_local_crops, config.local_crop_size, config.local_crop_size, 3),
  }


def host_to_device_bytes_per_image(config) -> int:
  """uint8 pixels, plus the int32 image size in device mode."""
  itemsize = {"image_size": 4}
  return sum(int(np.prod(shape[1:])) * itemsize.get(k, 1) for k, shape in batch_shapes(config).items())


def synthetic_batch(config, mesh) -> dict[str, jax.Array]:
  """Random pixels; in device mode each canvas holds a 3:4 image as wide as the canvas (500 x 375-like)."""
  shapes = batch_shapes(config)

  def make(key):
    batch = {
      k: jax.random.randint(jax.random.fold_in(key, i), s, 0, 256, jnp.int32).astype(jnp.uint8)
      for i, (k, s) in enumerate(shapes.items())
      if k != "image_size"
    }
    if "image_size" in shapes:
      size = jnp.array([round(0.75 * config.canvas_size), config.canvas_size], jnp.int32)
      batch["image_size"] = jnp.broadcast_to(size, shapes["image_size"])
    return batch

  return jax.jit(make, out_shardings=sharding.batch_sharding(mesh))(jax.random.PRNGKey(0))


def peak_memory_gib(devices) -> float | None:
  stats = [d.memory_stats() for d in devices]
  if not all(stats) or any("peak_bytes_in_use" not in s for s in stats):
    return None
  return max(s["peak_bytes_in_use"] for s in stats) / 2**30


def benchmark_train_step(config, mesh) -> dict[str, float]:
  pretraining = build_pretraining(config, mesh)
  state = pretraining.create_state(jax.random.PRNGKey(0))
  step_fn = pretraining.train_step()
  batch = synthetic_batch(config, mesh)
  t = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - t
  cost = _cost(compiled)
  for _ in range(1 + _WARMUP.value):  # The first call finds the compiled step in jit's cache.
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step = statistics.median(times)
  analytic = flops.train_step_flops(config)["step"] * config.batch_size
  peak, peak_source = peak_flops(mesh.devices.flat[0])
  return {
    "compile_s": compile_seconds,
    "step_ms": 1000 * step,
    "train_img_s": config.batch_size / step,
    "train_img_s_per_device": config.batch_size / step / mesh.size,
    "peak_memory_gib": peak_memory_gib(mesh.devices.flat),
    "analytic_gflop_per_img": analytic / config.batch_size / 1e9,
    "xla_gflop_per_img": cost.get("flops", float("nan")) * mesh.size / config.batch_size / 1e9,
    "mfu_percent": 100 * analytic / step / (peak * mesh.size),
    "peak_tflops_per_device": peak / 1e12,
    "peak_source": peak_source,
    "loss": float(metrics["loss"]),
  }


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def benchmark_augmentation(config, mesh) -> dict[str, float]:
  """The device augmentation alone on the synthetic canvases (EsViT's multi-crop, MAE's crop and flip): XLA
  GFLOP per image and median ms per step."""
  batch = synthetic_batch(config, mesh)
  dtype = jnp.dtype(config.compute_dtype)
  crops = device_augment.mae_crops if is_mae(config) else device_augment.multicrop
  augment = jax.jit(
    lambda canvas, size: crops(canvas, size, jnp.arange(config.batch_size, dtype=jnp.int32), config, dtype),
    out_shardings=sharding.batch_sharding(mesh),
  )
  compiled = augment.lower(batch["canvas"], batch["image_size"]).compile()
  jax.block_until_ready(compiled(batch["canvas"], batch["image_size"]))
  times = [
    _timed(lambda: jax.block_until_ready(compiled(batch["canvas"], batch["image_size"])))
    for _ in range(max(3, _STEPS.value))
  ]
  return {
    "augment_xla_gflop_per_img": _cost(compiled).get("flops", float("nan"))
    * mesh.size
    / config.batch_size
    / 1e9,
    "augment_alone_ms": 1000 * statistics.median(times),
  }


def benchmark_loop(config, steps: int) -> dict[str, float]:
  """The real train loop on config.dataset for `steps` steps (no evaluation, no checkpoint until the end):
  images/s and input_wait, medians over the logs after the first (which holds the compilation)."""
  from esvit_jax import train, writers  # pylint: disable=g-import-not-at-top  # TensorFlow only when used.

  config = config.copy_and_resolve_references()
  config.update(
    total_steps=steps, eval_every_steps=0, ckpt_every_steps=steps, log_every_steps=max(1, steps // 6)
  )
  with tempfile.TemporaryDirectory(prefix="esvit_bench_loop_") as workdir:
    train.train_and_evaluate(config, workdir)
    logs = [r for r in writers.read_metrics(workdir) if "input_wait" in r][1:]
  return {
    "images_per_sec": statistics.median(r["images_per_sec"] for r in logs),
    "input_wait": statistics.median(r["input_wait"] for r in logs),
  }


def benchmark_inference(config, mesh) -> float:
  """Backbone-only images/s at the crop size (EsViT: the global crops', teacher forward; MAE: the encoder
  on every patch, as evaluations run it), in the compute dtype."""
  model = models.backbone_from_config(config.model, jnp.dtype(config.compute_dtype))
  size = config.crop_size if is_mae(config) else config.global_crop_size
  batch = _INFERENCE_BATCH.value * mesh.size
  images = jax.device_put(
    jnp.zeros((batch, size, size, 3), jnp.dtype(config.compute_dtype)), sharding.batch_sharding(mesh)
  )
  params = jax.jit(lambda k: model.init(k, images[:1]), out_shardings=sharding.replicated(mesh))(
    jax.random.PRNGKey(0)
  )
  forward = jax.jit(lambda p, x: model.apply(p, x)[0])
  forward(params, images).block_until_ready()
  times = [
    _timed(lambda: forward(params, images).block_until_ready()) for _ in range(max(3, _STEPS.value // 2))
  ]
  return batch / statistics.median(times)


def host_pipeline_unavailable() -> str | None:
  """Why the host input pipeline (tf.data) cannot run here, or None when it can.

  Returns:
    The reason, naming the missing module, for a machine without TensorFlow or tensorflow-datasets.
  """
  try:
    from esvit_jax.data import multicrop  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as error:
    return f"skipped: TensorFlow is absent ({error}; it only runs the host input pipeline)"
  return None


def benchmark_pipeline(config) -> float:
  """Host pipeline images/s per core of this machine in config.augment_on's mode (MAE: the canvas decode),
  on the demo set (CPU time, so shared machines are fair)."""
  from esvit_jax.data import multicrop  # pylint: disable=g-import-not-at-top  # TensorFlow only when used.

  config = config.copy_and_resolve_references()
  config.dataset, config.batch_size = "demo", 16
  iterator = multicrop.pretrain_dataset(config, process_index=0, process_count=1).as_numpy_iterator()
  next(iterator)
  cpu = time.process_time()
  for _ in range(_PIPELINE_BATCHES.value):
    next(iterator)
  return _PIPELINE_BATCHES.value * config.batch_size / (time.process_time() - cpu)


def main(argv):
  del argv
  config = CONFIG.value.copy_and_resolve_references()
  mesh = sharding.make_mesh()
  config.batch_size = _PER_DEVICE_BATCH.value * mesh.size
  device = mesh.devices.flat[0]
  print(
    f"{mesh.size} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
    f"{describe(config)}, {config.compute_dtype}, global batch {config.batch_size}"
  )
  results = benchmark_train_step(config, mesh)
  results["host_to_device_bytes_per_img"] = host_to_device_bytes_per_image(config)
  if is_mae(config):  # Its feed rate at 40% MFU, from the analytic count.
    results["h100_img_s_at_40pct_mfu"] = (
      FEED_MFU * PEAK_BF16_FLOPS["H100"] / results["analytic_gflop_per_img"] / 1e9
    )
    results["host_to_device_gb_s_at_h100_40pct_mfu"] = (
      results["host_to_device_bytes_per_img"] * results["h100_img_s_at_40pct_mfu"] / 1e9
    )
  else:
    results[f"host_to_device_gb_s_at_{FEED_RATE}_img_s"] = (
      results["host_to_device_bytes_per_img"] * FEED_RATE / 1e9
    )
  if config.augment_on == "device":
    results.update(benchmark_augmentation(config, mesh))
    results["augment_share_of_step_flops_percent"] = (
      100 * results["augment_xla_gflop_per_img"] / results["xla_gflop_per_img"]
    )
    results["augment_share_of_analytic_step_percent"] = (
      100 * results["augment_xla_gflop_per_img"] / results["analytic_gflop_per_img"]
    )
  if is_mae(config):  # No host mode to time the step without its crop: the crop alone against the step.
    results["augment_alone_share_of_step_time_percent"] = (
      100 * results["augment_alone_ms"] / results["step_ms"]
    )
    results["host_mode"] = "none for MAE (its crop is made in the step only)"
  elif config.augment_on == "device":
    host_mode = config.copy_and_resolve_references()
    host_mode.augment_on = "host"
    without = benchmark_train_step(host_mode, mesh)
    results["step_ms_without_augment"] = without["step_ms"]
    results["augment_share_of_step_time_percent"] = 100 * (1 - without["step_ms"] / results["step_ms"])
    results["host_mode_host_to_device_bytes_per_img"] = host_to_device_bytes_per_image(host_mode)
  results["inference_img_s_per_device"] = benchmark_inference(config, mesh) / mesh.size
  if _PIPELINE_BATCHES.value and (reason := host_pipeline_unavailable()):
    results["host_pipeline"] = reason
  elif _PIPELINE_BATCHES.value:
    per_core = benchmark_pipeline(config)
    results["pipeline_img_s_per_core"] = per_core
    results["cores_to_feed_step"] = results["train_img_s"] / per_core
    if is_mae(config):
      results["cores_to_feed_h100_at_40pct_mfu"] = results["h100_img_s_at_40pct_mfu"] / per_core
    results["host_cores"] = os.cpu_count()
  print_results(results)
  if _LOOP_STEPS.value and (reason := host_pipeline_unavailable()):
    print(f"\n--loop_steps: {reason}")
  elif _LOOP_STEPS.value:
    looped = benchmark_loop(config, _LOOP_STEPS.value)
    print_results({f"loop_{config.augment_on}_mode_{name}": value for name, value in looped.items()})


def print_results(results: dict) -> None:
  print("\n" + console.fields_table(results), flush=True)


if __name__ == "__main__":
  app.run(main)
