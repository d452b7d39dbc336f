"""Kernels run on each device's shard: jax.shard_map at the attention seams.

XLA partitions jnp code and JAX's cuDNN attention by itself, but a Pallas call (our
sparse kernels, tokamax's attention) is opaque to it: with the batch sharded, XLA
would gather every row onto every device and compute them all there. `per_shard`
runs such a kernel under jax.shard_map instead, each device on its own batch rows
and heads, over the mesh axes that the active logical rules (sharding.activate)
give 'batch' and 'heads' / 'kv_heads'. Outside a mesh of several devices it calls
the kernel as it is.
"""

import math

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec as P

# Query and key/value heads split together or not at all: a GQA group must stay on
# one device with its kv head.
_HEADS = ('heads', 'kv_heads')

# Layouts of the seams' arguments (leading dimensions; see per_shard).
Q = ('batch', None, 'heads')         # q, out [B, T, Hq, D]
KV = ('batch', None, 'kv_heads')     # k, v and KV caches [B, S, Hkv, D]
PER_KV_HEAD = ('batch', 'kv_heads')  # block tables, kv_ids/kv_count, scores [B, Hkv, ...]
PER_ROW = ('batch',)                 # a MaskSpec's [B] vectors


def _mesh_axes(logical, mesh):
  """The mesh axes of size > 1 that the active logical rules map `logical` to."""
  for name, target in spmd.get_logical_axis_rules():
    if name == logical:
      axes = (target,) if isinstance(target, str) else tuple(target or ())
      return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
  return ()


def _named_sizes(args, layouts):
  """{logical name: the sizes of every dimension it names, over all array leaves}."""
  sizes = {}
  for arg, layout in zip(args, layouts):
    for leaf in jax.tree.leaves(arg):
      for name, size in zip(layout, leaf.shape):
        if name is not None:
          sizes.setdefault(name, []).append(size)
  return sizes


def split_axes(args, layouts, mesh):
  """{logical name: mesh axes}, dropping a name whose mesh axes do not divide
  every dimension it names (then it stays whole on each device)."""
  sizes = _named_sizes(args, layouts)
  axes = {}
  for name, dims in sizes.items():
    mesh_axes = _mesh_axes(name, mesh)
    n = math.prod(mesh.shape[a] for a in mesh_axes)
    axes[name] = mesh_axes if all(d % n == 0 for d in dims) else ()
  if any(name in axes and not axes[name] for name in _HEADS):
    axes.update({name: () for name in _HEADS if name in axes})
  return axes


def per_shard(kernel, args, layouts, out_layout):
  """kernel(*args) on each device's shard of args.

  layouts: per argument, the logical axis names (or None) of the leading
  dimensions of every array in it, e.g. ('batch', None, 'heads') for q
  [B, T, Hq, D] or ('batch',) for a MaskSpec of [B] vectors; out_layout the
  same for the kernel's array output (a list of them: one per output of a
  kernel that returns a tuple). Dimensions left out are whole on every device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(*args)
  axes = split_axes(args, layouts, mesh)
  if not any(axes.values()):
    return kernel(*args)
  spec = lambda layout: P(*(axes.get(name) or None for name in layout))
  out_specs = (tuple(spec(l) for l in out_layout) if isinstance(out_layout, list)
               else spec(out_layout))
  return jax.shard_map(kernel, mesh=mesh, in_specs=tuple(spec(l) for l in layouts),
                       out_specs=out_specs, check_vma=False)(*args)
