"""Device mesh, sharding rules for the train state, and host batches as global arrays.

One mesh axis, 'data', over all devices. The batch is always split along it. Parameters, teacher,
optimizer moments and centres are either replicated ('data': pure data parallelism) or, for 'fsdp',
each large tensor is split along its largest dimension divisible by the axis size. The rule depends only
on a leaf's shape, so params, teacher and the Adam moments of a param get the same sharding.

The mesh uses Auto axes: with Explicit axes (jax.make_mesh's default) the Swin window reshapes of a
batch-sharded array raise a ShardingTypeError.
"""

import collections
from collections.abc import Iterator, Sequence
import itertools
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from esvit_jax import errors

DATA_AXIS = "data"
STRATEGIES = ("data", "fsdp")
FSDP_MIN_SIZE_MB = 4.0  # Smaller tensors stay replicated under 'fsdp' (big_vision's default).


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with an Auto 'data' axis over `devices` (all devices by default).

  Args:
    devices: the devices, in mesh order (None: jax.devices()).

  Returns:
    The mesh.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis.

  Args:
    mesh: the mesh of make_mesh.

  Returns:
    The sharding.
  """
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh.

  Args:
    mesh: the mesh of make_mesh.

  Returns:
    The sharding.
  """
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int) -> P:
  """Shards the largest dimension divisible by `axis_size` of a tensor with >= min_size elements.

  Args:
    shape: the tensor's shape.
    axis_size: number of devices on the data axis.
    min_size: smaller tensors (in elements) stay replicated.

  Returns:
    The partition spec (P() where the tensor stays replicated).
  """
  if int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axis_size == 0:
      return P(*([None] * dim + [DATA_AXIS]))
  return P()


def infer_shardings(
  tree: Any, mesh: Mesh, strategy: str, *, fsdp_min_size_mb: float = FSDP_MIN_SIZE_MB
) -> Any:
  """A NamedSharding for every leaf (arrays or ShapeDtypeStructs) of `tree` under `strategy`.

  Args:
    tree: the pytree to place (e.g. the abstract train state).
    mesh: the mesh of make_mesh.
    strategy: 'data' (replicate everything) or 'fsdp' (split the large tensors, see fsdp_spec).
    fsdp_min_size_mb: under 'fsdp', tensors smaller than this stay replicated.

  Returns:
    A pytree of NamedShardings of the same structure.
  """
  if strategy not in STRATEGIES:
    raise errors.UserError(f"Unknown sharding strategy {strategy!r}; expected one of {STRATEGIES}")
  axis_size = mesh.shape[DATA_AXIS]

  def leaf_sharding(leaf):
    if strategy == "data":
      return replicated(mesh)
    min_size = fsdp_min_size_mb * 2**20 / np.dtype(leaf.dtype).itemsize
    return NamedSharding(mesh, fsdp_spec(leaf.shape, axis_size, min_size))

  return jax.tree.map(leaf_sharding, tree)


def sharded_abstract_state(
  shapes: Any, mesh: Mesh, strategy: str, *, fsdp_min_size_mb: float = FSDP_MIN_SIZE_MB
) -> tuple[Any, Any]:
  """The shardings of a train state's leaves and the state as ShapeDtypeStructs carrying them.

  Args:
    shapes: the state's ShapeDtypeStructs (jax.eval_shape of its init).
    mesh: the mesh of make_mesh.
    strategy: as infer_shardings.
    fsdp_min_size_mb: as infer_shardings.

  Returns:
    (shardings, abstract state): what jit's out_shardings and a checkpoint's restore target need.
  """
  shardings = infer_shardings(shapes, mesh, strategy, fsdp_min_size_mb=fsdp_min_size_mb)
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )
  return shardings, abstract


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """This host's slice of the batch (numpy leaves) -> global jax.Arrays split over the data axis.

  0-d leaves have no batch axis to split: they are per-host metadata (e.g. counters) and stay numpy.

  Args:
    local_batch: a pytree of numpy arrays, this host's rows first axis.
    mesh: the mesh of make_mesh.

  Returns:
    The same pytree with global arrays of batch_sharding(mesh) (0-d leaves unchanged).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: x if np.ndim(x) == 0 else jax.make_array_from_process_local_data(sharding, x), local_batch
  )


def prefetch_to_device(local_batches: Iterator[Any], mesh: Mesh, *, size: int = 2) -> Iterator[Any]:
  """Yields global batches while the next `size` are already being copied (device_put is async).

  Args:
    local_batches: this host's batches (pytrees of numpy arrays).
    mesh: the mesh of make_mesh.
    size: batches in flight ahead of the one yielded.

  Yields:
    The batches as global_batch makes them, in order.
  """
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(local_batches, n):
      queue.append(global_batch(batch, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
