"""Multi-scale deformable attention as a native XLA:CPU kernel.

XLA:CPU executes gathers element by element, which makes the bilinear
sampling of deformable attention its slowest part by far at full resolution.
``msda_cpu.cc`` (next to this file) does the same computation as
:func:`semsam_jax.models.deformable_attention.ms_deform_attn` in C++: forward
and backward are typed-FFI custom calls running on XLA's intra-op thread
pool, wired together with :func:`jax.custom_vjp`.  Building, caching and
registration: :mod:`semsam_jax.kernels.native`.

Limits: float32 compute (other dtypes are cast), CPU only, no second-order
derivatives (the backward pass is itself a custom call); under SPMD
partitioning the calls are batch-partitionable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from semsam_jax.kernels import native
from semsam_jax.kernels.native import KernelUnavailableError, available, unavailable_reason

__all__ = ["msda_cpu", "available", "unavailable_reason", "KernelUnavailableError"]

FWD_TARGET = "semsam_msda_cpu_forward"
BWD_TARGET = "semsam_msda_cpu_backward"


def _shapes_attr(shapes) -> np.ndarray:
  return np.asarray(shapes, np.int64).reshape(-1)


def _forward_call(value, shapes, loc, aw):
  b, _, m, d = value.shape
  q = loc.shape[1]
  out = jax.ffi.ffi_call(FWD_TARGET, jax.ShapeDtypeStruct((b, q, m, d), jnp.float32),
                         vmap_method="sequential")(value, loc, aw, shapes=_shapes_attr(shapes))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _core(value, shapes, loc, aw):
  return _forward_call(value, shapes, loc, aw)


def _core_fwd(value, shapes, loc, aw):
  return _forward_call(value, shapes, loc, aw), (value, loc, aw)


def _core_bwd(shapes, residuals, g):
  value, loc, aw = residuals
  outs = (jax.ShapeDtypeStruct(value.shape, jnp.float32),
          jax.ShapeDtypeStruct(loc.shape, jnp.float32),
          jax.ShapeDtypeStruct(aw.shape, jnp.float32))
  g_value, g_loc, g_aw = jax.ffi.ffi_call(BWD_TARGET, outs, vmap_method="sequential")(
      value, loc, aw, g.astype(jnp.float32), shapes=_shapes_attr(shapes))
  return g_value, g_loc, g_aw


_core.defvjp(_core_fwd, _core_bwd)


def msda_cpu(value, spatial_shapes, sampling_locations, attention_weights):
  """``ms_deform_attn`` through the native CPU kernel.

  Same contract as the other implementations: value (B, S, M, D), static
  ``spatial_shapes`` ((H, W), ...), sampling_locations (B, Lq, M, L, P, 2),
  attention_weights (B, Lq, M, L, P) -> (B, Lq, M * D) in ``value.dtype``.
  Raises :class:`KernelUnavailableError` when the kernel cannot be built.
  """
  native.load()
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  b, _, m, d = value.shape
  lq = sampling_locations.shape[1]
  out = _core(value.astype(jnp.float32), shapes, sampling_locations.astype(jnp.float32),
              attention_weights.astype(jnp.float32))
  return out.reshape(b, lq, m * d).astype(value.dtype)


QUERY_FWD_TARGET = "semsam_msda_cpu_query_forward"


def msda_cpu_query_forward(value, spatial_shapes, reference_points, offsets, logits):
  """Forward-only kernel call on the module's raw inputs (no gradient rule).

  value (B, S, M, D), reference_points (B, Lq, L, 2 | 4), offsets
  (B, Lq, M, L, P, 2), logits (B, Lq, M, L * P) -> (B, Lq, M, D) float32:
  the softmax of the logits and the sampling locations are formed inside the
  kernel exactly as :meth:`MSDeformAttn.attend` forms them.
  """
  native.load()
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  b, _, m, d = value.shape
  lq = offsets.shape[1]
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return jax.ffi.ffi_call(QUERY_FWD_TARGET, jax.ShapeDtypeStruct((b, lq, m, d), jnp.float32),
                          vmap_method="sequential")(
      f32(value), f32(reference_points), f32(offsets), f32(logits),
      shapes=_shapes_attr(shapes))
