r"""Speed of the real EsViT train step and of backbone inference, with MFU, on whatever devices JAX sees.

  python benchmarks/train_step.py --config configs/swin_t.py --per_device_batch 64
  python benchmarks/train_step.py --config tests/configs/tiny.py --per_device_batch 2 --steps 3   # CPU smoke run

Reports, after warm-up: compile time, median step time, training images/s (per device and in all), peak
device memory, MFU (esvit_jax.flops analytic FLOPs / step time / peak bf16 FLOP/s of the devices), the
XLA cost-analysis FLOPs as a cross-check, backbone-only inference images/s at the global crop size (the
paper's Table 1 measure, 128 images per forward as DINO's protocol), and the host input pipeline's images/s
on this machine's cores with the number of cores needed to feed the measured step rate.
The batch is synthetic and already on the devices: this measures the step, not the input pipeline.
"""
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Runs as a script.
from esvit_jax import flops  # pylint: disable=g-import-not-at-top,wrong-import-position
from esvit_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from esvit_jax import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", "configs/swin_t.py", "Pretraining config.")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 32, "Images per device per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_INFERENCE_BATCH = flags.DEFINE_integer("inference_batch", 128, "Images per device per inference forward.")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 8, "Host-pipeline batches timed; 0 skips it.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak bf16 TFLOP/s per device (default: known table).")

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L4": 121e12,
                   "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
                   "TPU v6 lite": 918e12, "TPU v6e": 918e12}


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


def synthetic_batch(config, mesh) -> dict[str, jax.Array]:
  b = config.batch_size
  shapes = {"globals": (b, 2, config.global_crop_size, config.global_crop_size, 3),
            "locals": (b, config.num_local_crops, config.local_crop_size, config.local_crop_size, 3)}
  make = jax.jit(lambda key: {k: jax.random.randint(jax.random.fold_in(key, i), s, 0, 256, jnp.int32).astype(jnp.uint8)
                              for i, (k, s) in enumerate(shapes.items())},
                 out_shardings=sharding.batch_sharding(mesh))
  return make(jax.random.PRNGKey(0))


def peak_memory_gib(devices) -> float | None:
  stats = [d.memory_stats() for d in devices]
  if not all(stats) or any("peak_bytes_in_use" not in s for s in stats):
    return None
  return max(s["peak_bytes_in_use"] for s in stats) / 2**30


def benchmark_train_step(config, mesh) -> dict[str, float]:
  state = train_step.create_train_state(config, mesh, jax.random.PRNGKey(0), steps_per_epoch=2502)
  step_fn = train_step.make_train_step(config, mesh, steps_per_epoch=2502)
  batch = synthetic_batch(config, mesh)
  t = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step = statistics.median(times)
  analytic = flops.train_step_flops(config)["step"] * config.batch_size
  peak, peak_source = peak_flops(mesh.devices.flat[0])
  return {
      "compile_s": compile_seconds, "step_ms": 1000 * step, "train_img_s": config.batch_size / step,
      "train_img_s_per_device": config.batch_size / step / mesh.size,
      "peak_memory_gib": peak_memory_gib(mesh.devices.flat),
      "analytic_gflop_per_img": analytic / config.batch_size / 1e9,
      "xla_gflop_per_img": cost.get("flops", float("nan")) * mesh.size / config.batch_size / 1e9,
      "mfu_percent": 100 * analytic / step / (peak * mesh.size), "peak_tflops_per_device": peak / 1e12,
      "peak_source": peak_source, "loss": float(metrics["loss"]),
  }


def benchmark_inference(config, mesh) -> float:
  """Backbone-only images/s at the global crop size (teacher forward, compute dtype)."""
  model = train_step.build_model(config).backbone
  size = config.global_crop_size
  batch = _INFERENCE_BATCH.value * mesh.size
  images = jax.device_put(jnp.zeros((batch, size, size, 3), jnp.dtype(config.compute_dtype)),
                          sharding.batch_sharding(mesh))
  params = jax.jit(lambda k: model.init(k, images[:1]), out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(0))
  forward = jax.jit(lambda p, x: model.apply(p, x)[0])
  forward(params, images).block_until_ready()
  times = [_timed(lambda: forward(params, images).block_until_ready()) for _ in range(max(3, _STEPS.value // 2))]
  return batch / statistics.median(times)


def benchmark_pipeline(config) -> float:
  """Host multi-crop pipeline images/s per core of this machine (CPU time, so shared machines are fair)."""
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
  config = _CONFIG.value.copy_and_resolve_references()
  mesh = sharding.make_mesh()
  config.batch_size = _PER_DEVICE_BATCH.value * mesh.size
  device = mesh.devices.flat[0]
  print(f"{mesh.size} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"{config.model.backbone} W{config.model.window_size}, 2x{config.global_crop_size} + "
        f"{config.num_local_crops}x{config.local_crop_size} crops, K={config.model.out_dim}, "
        f"{config.compute_dtype}, global batch {config.batch_size}")
  results = benchmark_train_step(config, mesh)
  results["inference_img_s_per_device"] = benchmark_inference(config, mesh) / mesh.size
  if _PIPELINE_BATCHES.value:
    per_core = benchmark_pipeline(config)
    results["pipeline_img_s_per_core"] = per_core
    results["cores_to_feed_step"] = results["train_img_s"] / per_core
    results["host_cores"] = os.cpu_count()
  width = max(map(len, results))
  print(f"\n{'field':<{width}}  value\n{'-' * width}  -----")
  for name, value in results.items():
    shown = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
    print(f"{name:<{width}}  {shown}")


if __name__ == "__main__":
  app.run(main)
