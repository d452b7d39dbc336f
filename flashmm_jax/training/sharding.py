"""The device mesh, logical-axis rules and the placement of params and batches.

Layers name logical axes only ('embed', 'mlp', ...); `config.logical_axis_rules`
maps them onto the mesh axes ('data', 'fsdp', 'tensor'). The same code then runs
on one device or many: only the mesh shape in the config changes.
"""

import contextlib

from flax import nnx
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_config, num_devices):
  """Resolves the one -1 entry of config.mesh against the device count."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh may leave only one axis at -1, got {dict(zip(MESH_AXES, sizes))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} does not divide '
                       f'{num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} '
                     f'devices, but {num_devices} are available')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None):
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def activate(mesh, rules):
  """Mesh and logical-axis rules in force for model creation and steps."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(map(tuple, rules))):
    yield


def state_shardings(abstract_state, mesh, rules):
  """NamedShardings for an (abstract) nnx.State, from the params' logical axes."""
  with nnx.logical_axis_rules(tuple(map(tuple, rules))):
    specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def global_batch(local_batch, mesh):
  """Assembles each process's slice of the batch into global, sharded arrays."""
  def put(x):
    x = np.asarray(x)
    spec = P(BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

  return jax.tree.map(put, local_batch)


def check_batch_divides(batch_size, mesh):
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_size % shards:
    raise ValueError(f'config.train.batch_size={batch_size} must divide over the '
                     f'{shards} data x fsdp shards of the mesh {dict(mesh.shape)}')
