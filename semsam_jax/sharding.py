"""Named shardings for data-parallel and FSDP execution over a device mesh.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``,
``conv_in``, ``conv_out``; see :mod:`semsam_jax.models.layers`).  A *rule set*
maps logical names to mesh axes; switching from pure data parallelism to FSDP
is a change of rules, not of model code::

    mesh = make_mesh({"data": 2, "fsdp": 4})
    shardings = param_shardings(config, mesh, RULES["fsdp"])
    params = jax.device_put(params, shardings)
    batch_sharding = data_sharding(mesh)          # images (B, H, W, 3)

A logical axis is only sharded when the dimension divides evenly by the mesh
axis size; otherwise that dimension is replicated (e.g. 3 attention heads over
4 devices), so every released config works on any mesh.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axis (None = replicated).  "batch" is the data axis.
RULES: dict[str, tuple[tuple[str, str | tuple[str, ...] | None], ...]] = {
    "data_parallel": (
        ("batch", ("data", "fsdp")), ("embed", None), ("mlp", None), ("heads", None),
        ("conv_in", None), ("conv_out", None)),
    "fsdp": (
        ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None), ("heads", None),
        ("conv_in", None), ("conv_out", "fsdp")),
}


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with ``Auto`` axis types (what Linen's logical partitioning needs).

  ``axes`` maps names to sizes, e.g. ``{"data": 2, "fsdp": 4}``; the product must
  equal the number of devices used.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(axes.values())
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {dict(axes)} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes),
              axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _mesh_axes(rule, mesh: Mesh):
  if rule is None:
    return None
  names = (rule,) if isinstance(rule, str) else tuple(rule)
  names = tuple(n for n in names if n in mesh.shape)
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[n] for n in names]))


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules) -> P:
  """PartitionSpec of one array from its logical axis names and shape."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape):
    axes = _mesh_axes(table.get(name), mesh) if name is not None else None
    names = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
    if axes is None or dim % _axis_size(mesh, axes) or used & set(names):
      out.append(None)
    else:
      out.append(axes)
      used |= set(names)
  return P(*out)


def param_shardings(config, mesh: Mesh, rules=RULES["fsdp"]):
  """A pytree of ``NamedSharding`` matching the (unboxed) params of ``config``."""
  from semsam_jax.models.semantic_sam import param_shapes
  boxed = param_shapes(config, unbox=False)

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      shape = leaf.value.shape
      return NamedSharding(mesh, spec_for(leaf.names, shape, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def data_sharding(mesh: Mesh, rules=RULES["fsdp"], ndim: int = 4) -> NamedSharding:
  """Sharding of a batch-first array: batch over the data axes, rest replicated."""
  axes = _mesh_axes(dict(rules).get("batch"), mesh)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))
