"""The train state and its shardings over a ('data', 'fsdp') device mesh."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from semsam_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes (and a checkpoint saves).

  ``step``: iterations done (skipped ones included; the lr schedule follows
  it).  ``rng``: the base key; step ``i`` uses ``fold_in(rng, i)``.
  ``bad_steps``: consecutive skipped (non-finite) steps up to now;
  ``skipped_steps``: all skipped steps of the run.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  bad_steps: jax.Array
  skipped_steps: jax.Array


def make_mesh(config, devices=None):
  """The ('data', 'fsdp') mesh of ``config.mesh`` (-1: all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": int(config.mesh.data), "fsdp": int(config.mesh.fsdp)}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh {sizes}: at most one axis may be -1")
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  if free:
    if len(devices) % fixed:
      raise ValueError(f"config.mesh {sizes}: {len(devices)} devices do not divide by {fixed}")
    sizes[free[0]] = len(devices) // fixed
  return sharding_lib.make_mesh(sizes, devices)


def rules_of(config):
  name = str(config.sharding_rules)
  if name not in sharding_lib.RULES:
    raise ValueError(f"config.sharding_rules = {name!r}; valid: {sorted(sharding_lib.RULES)}")
  return sharding_lib.RULES[name]


def _dict_path(path) -> tuple:
  """Trailing dict keys of a pytree path (the param path inside an optimizer state)."""
  keys = []
  for entry in reversed(path):
    if isinstance(entry, jax.tree_util.DictKey):
      keys.append(str(entry.key))
    else:
      break
  return tuple(reversed(keys))


def tree_shardings_like_params(tree, param_shardings_flat: dict, mesh):
  """Shardings for a pytree whose leaves mirror params (optimizer moments) or are scalars.

  A leaf whose trailing dict path and shape equal a parameter's gets that
  parameter's sharding; every other leaf (counters, hyper-parameters) is
  replicated.
  """
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    key = _dict_path(path)
    for n in range(len(key)):
      hit = param_shardings_flat.get(key[n:])
      if hit is not None:
        sh, shape = hit
        if tuple(leaf.shape) == shape:
          return sh
        break
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(config, mesh, abstract_state: TrainState) -> TrainState:
  """NamedShardings of every leaf of the train state (params by the logical rules)."""
  p_sh = sharding_lib.param_shardings(config.model, mesh, rules_of(config))
  flat_sh = traverse_util.flatten_dict(dict(p_sh))
  flat_shape = traverse_util.flatten_dict(dict(abstract_state.params))
  table = {k: (flat_sh[k], tuple(flat_shape[k].shape)) for k in flat_sh}
  replicated = NamedSharding(mesh, P())
  return TrainState(
      step=replicated,
      params=p_sh,
      opt_state=tree_shardings_like_params(abstract_state.opt_state, table, mesh),
      rng=replicated, bad_steps=replicated, skipped_steps=replicated)


def new_state(params, tx, rng) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng, bad_steps=jnp.zeros((), jnp.int32),
                    skipped_steps=jnp.zeros((), jnp.int32))


def batch_shardings(mesh, rules, batch_spec: dict) -> dict:
  """Batch-first sharding (over ('data', 'fsdp')) of every key of a batch."""
  return {k: sharding_lib.data_sharding(mesh, rules, ndim=len(v.shape))
          for k, v in batch_spec.items()}


def global_batch(local: dict, shardings: dict, global_batch_size: int) -> dict:
  """Per-process numpy batch -> global jax arrays (``make_array_from_process_local_data``)."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(
        shardings[k], v, (global_batch_size,) + v.shape[1:])
  return out
