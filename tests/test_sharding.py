"""Sharding rules and the host-to-device batch path on the 8 fake CPU devices."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from esvit_jax import sharding


def test_mesh_has_auto_data_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.axis_types == (AxisType.Auto,) and mesh.size == 8


@pytest.mark.parametrize("shape, expected", [
    ((768, 3072), P(None, "data")),  # Largest dimension.
    ((3072, 768), P("data")),
    ((169, 24), P(None, "data")),  # 169 is not divisible by 8: next largest.
    ((169, 3), P()),  # Nothing divisible: replicated.
    ((64,), P()),  # Below the size threshold.
])
def test_fsdp_spec(shape, expected):
  assert sharding.fsdp_spec(shape, axis_size=8, min_size=100) == expected


def test_infer_shardings():
  mesh = sharding.make_mesh()
  tree = {"kernel": jax.ShapeDtypeStruct((1024, 1024), np.float32), "bias": jax.ShapeDtypeStruct((1024,), np.float32)}
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
