"""Sharding rules and the host-to-device batch path on the 8 fake CPU devices."""

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from esvit_jax import sharding


def test_mesh_has_auto_data_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.axis_types == (AxisType.Auto,) and mesh.size == 8


@pytest.mark.parametrize(
  "shape, expected",
  [
    ((768, 3072), P(None, "data")),  # Largest dimension.
    ((3072, 768), P("data")),
    ((169, 24), P(None, "data")),  # 169 is not divisible by 8: next largest.
    ((169, 3), P()),  # Nothing divisible: replicated.
    ((64,), P()),  # Below the size threshold.
  ],
)
def test_fsdp_spec(shape, expected):
  assert sharding.fsdp_spec(shape, axis_size=8, min_size=100) == expected


def test_infer_shardings():
  mesh = sharding.make_mesh()
  tree = {
    "kernel": jax.ShapeDtypeStruct((1024, 1024), np.float32),
    "bias": jax.ShapeDtypeStruct((1024,), np.float32),
  }
  assert {s.spec for s in jax.tree.leaves(sharding.infer_shardings(tree, mesh, "data"))} == {P()}
  fsdp = sharding.infer_shardings(tree, mesh, "fsdp", fsdp_min_size_mb=1.0)  # 4 MiB kernel, 4 KiB bias.
  assert fsdp["kernel"].spec == P("data") and fsdp["bias"].spec == P()
  with pytest.raises(ValueError, match="tensor"):
    sharding.infer_shardings(tree, mesh, "tensor")


def test_prefetch_to_device():
  mesh = sharding.make_mesh()
  host = [{"images": np.full((16, 2, 3), i, np.uint8), "count": np.int64(i)} for i in range(5)]
  batches = list(sharding.prefetch_to_device(iter(host), mesh, size=2))
  assert len(batches) == 5
  for i, batch in enumerate(batches):
    assert isinstance(batch["images"], jax.Array) and batch["images"].sharding.spec == P("data")
    assert len(batch["images"].addressable_shards) == 8
    np.testing.assert_array_equal(batch["images"], host[i]["images"])
    assert isinstance(batch["count"], np.integer) and batch["count"] == i  # 0-d: stays on the host.


def _canvases(batch=16, canvas=40, seed=0):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(20, canvas + 1, (batch, 2)).astype(np.int32)
  images = np.zeros((batch, canvas, canvas, 3), np.uint8)
  for image, (h, w) in zip(images, sizes, strict=False):
    image[:h, :w] = rng.integers(0, 256, (h, w, 3))
  return images, sizes


def _augment(mesh):
  """device_augment.multicrop jitted with the train step's batch sharding over `mesh`."""
  from esvit_jax.configs import common  # pylint: disable=g-import-not-at-top
  from esvit_jax.data import device_augment  # pylint: disable=g-import-not-at-top

  config = common.pretrain_config("swin_tiny", 0.1)
  config.update(global_crop_size=24, local_crop_size=12, num_local_crops=2)
  batch = sharding.batch_sharding(mesh)
  return jax.jit(
    lambda canvas, sizes, positions: device_augment.multicrop(canvas, sizes, positions, config, np.float32),
    in_shardings=batch,
    out_shardings=batch,
  )


def test_device_crops_are_the_same_on_one_and_eight_devices_without_communication():
  canvas, sizes = _canvases()
  positions = np.arange(100, 116, dtype=np.int32)
  crops = {
    n: jax.device_get(_augment(sharding.make_mesh(devices))(canvas, sizes, positions))
    for n, devices in ((1, jax.devices()[:1]), (8, jax.devices()))
  }
  level = 1 / 255 / 0.224  # One 8-bit level after normalisation (the smallest std).
  for name in ("globals", "locals"):
    # The resampling matmuls sum in another order for another per-device batch, so a value that lands on a
    # rounding boundary can move by one level (measured: 1 of 55,296 values); everything else is equal.
    diff = np.abs(crops[8][name] - crops[1][name])
    assert diff.max() <= 1.01 * level and np.mean(diff > 1e-6) < 1e-4, (
      name,
      diff.max(),
      np.mean(diff > 1e-6),
    )
  # Each device augments its own examples: the partitioned program moves no data between devices.
  hlo = _augment(sharding.make_mesh()).lower(canvas, sizes, positions).compile().as_text()
  for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
    assert collective not in hlo, collective
