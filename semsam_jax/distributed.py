"""JAX's multi-process runtime for ``train.py`` and ``eval.py`` (docs/reliability.md).

:func:`initialize_from_env` calls ``jax.distributed.initialize`` when
``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) is set, passing
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when present, or without
arguments (cluster auto-detection: Cloud TPU pod slices, SLURM) when asked to.
With ``JAX_PLATFORMS=cpu`` it first switches the cross-process CPU
collectives to gloo (the default ones cannot cross processes).
``scripts/local_multiprocess.py`` sets this environment for a job on one
machine.
"""

from __future__ import annotations

import os


def initialize_from_env(auto: bool = False) -> bool:
  """Joins the multi-process job described by the environment; True if it did.

  Must run before anything touches a JAX backend.
  """
  import jax
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not addr and not auto:
    return False
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if addr:
    kwargs = {"coordinator_address": addr}
    if "JAX_NUM_PROCESSES" in os.environ:
      kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in os.environ:
      kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
  else:
    jax.distributed.initialize()
  return True


def allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's ``payload``, in process order, on every process.

  Two ``multihost_utils.process_allgather`` calls (the lengths, then the
  payloads padded to the longest); every process must call it.
  """
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return [payload]
  from jax.experimental import multihost_utils
  lengths = np.asarray(multihost_utils.process_allgather(np.int64(len(payload)))).ravel()
  buf = np.zeros(int(lengths.max()) or 1, np.uint8)
  buf[:len(payload)] = np.frombuffer(payload, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [rows[i, :int(n)].tobytes() for i, n in enumerate(lengths)]
