"""The training objective's point reads as native CPU kernels.

``point_sample_cpu.cc`` (next to this file) implements, as XLA typed-FFI
custom calls on the intra-op thread pool:

* :func:`sample_maps` -- bilinear reads of selected float maps, with a
  :func:`jax.custom_vjp` whose backward pass is a scatter-add kernel;
* :func:`sample_packed_masks` -- bilinear reads of bit-packed 0/1 masks;
* :func:`uncertain_points` -- PointRend's uncertainty sampling on hashed
  uniform candidates (generated, read and selected inside the kernel, never
  written to memory).

They compute exactly what the pure-XLA functions of
:mod:`semsam_jax.losses.points` compute (forward values bit for bit; the
gradient up to the order of the additions), which remain the fallback
(``SEMSAM_JAX_NATIVE=0``, other backends).  Every operand is batch-major, so
under SPMD the calls are batch-partitionable.  Building and registration:
:mod:`semsam_jax.kernels.native`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from semsam_jax.kernels import native

SAMPLE_TARGET = "semsam_point_sample_cpu"
SAMPLE_GRAD_TARGET = "semsam_point_sample_grad_cpu"
PACKED_TARGET = "semsam_packed_sample_cpu"
UNCERTAIN_TARGET = "semsam_uncertain_points_cpu"


def _groups(index, coords):
  """(B, ...) index and (B, ..., P, 2) or (B, 1.., P, 2) coords -> flat
  (B, N) index, (B, N | 1, P, 2) coords and the (B, ...) group shape."""
  b = index.shape[0]
  lead = index.shape
  n = math.prod(lead[1:])
  p = coords.shape[-2]
  if coords.shape[:-2] == lead:
    flat = coords.reshape(b, n, p, 2)
  elif coords.shape[0] == b and all(int(s) == 1 for s in coords.shape[1:-2]):
    flat = coords.reshape(b, 1, p, 2)
  else:
    raise ValueError(f"coords {coords.shape} do not match the index {lead} "
                     "(one set of points per group, or one shared by all)")
  return index.reshape(b, n).astype(jnp.int32), flat.astype(jnp.float32), lead + (p,)


def _sample_call(maps, index, coords):
  b, n = index.shape
  return jax.ffi.ffi_call(SAMPLE_TARGET, jax.ShapeDtypeStruct((b, n, coords.shape[2]),
                                                              jnp.float32),
                          vmap_method="sequential")(maps, index, coords)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sample(maps, index, coords, map_shape):
  del map_shape
  return _sample_call(maps, index, coords)


def _fwd(maps, index, coords, map_shape):
  del map_shape
  return _sample_call(maps, index, coords), (index, coords)


def _bwd(map_shape, res, g):
  index, coords = res
  shape = (index.shape[0],) + tuple(map_shape)
  grad = jax.ffi.ffi_call(SAMPLE_GRAD_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(g.astype(jnp.float32), index, coords)
  return grad, None, None


_sample.defvjp(_fwd, _bwd)


def sample_maps(maps, map_index, coords):
  """Kernel version of :func:`semsam_jax.losses.points.sample_maps`:
  (B, R, h, w) maps, (B, ...) map index, (B, ..., P, 2) coords (or coords
  with size-1 group dims, shared by every group) -> (B, ..., P) float32,
  differentiable w.r.t. ``maps`` only."""
  native.load()
  index, flat, out_shape = _groups(map_index, coords)
  coords_const = jax.lax.stop_gradient(flat)
  return _sample(maps.astype(jnp.float32), index, coords_const,
                 tuple(int(s) for s in maps.shape[1:])).reshape(out_shape)


def sample_packed_masks(masks, mask_index, coords):
  """Kernel version of :func:`semsam_jax.losses.points.sample_packed_masks`
  (same shapes; coords may be shared as in :func:`sample_maps`)."""
  native.load()
  index, flat, out_shape = _groups(mask_index, coords)
  b, n = index.shape
  out = jax.ffi.ffi_call(PACKED_TARGET, jax.ShapeDtypeStruct((b, n, flat.shape[2]),
                                                             jnp.float32),
                         vmap_method="sequential")(
      jnp.asarray(masks, jnp.uint8), index, jax.lax.stop_gradient(flat))
  return out.reshape(out_shape)


def uncertain_points(maps, map_index, seeds, num_candidates: int, num_uncertain: int,
                     num_random: int):
  """Kernel version of :func:`semsam_jax.losses.points.hashed_uncertain_coords`:
  (B, R, h, w) maps, (B, ...) map index, (B, ...) uint32 seeds ->
  (B, ..., num_uncertain + num_random, 2) float32 points (no gradient)."""
  native.load()
  lead = map_index.shape
  b = lead[0]
  n = math.prod(lead[1:])
  p = int(num_uncertain) + int(num_random)
  out = jax.ffi.ffi_call(UNCERTAIN_TARGET, jax.ShapeDtypeStruct((b, n, p, 2), jnp.float32),
                         vmap_method="sequential")(
      jax.lax.stop_gradient(maps).astype(jnp.float32),
      map_index.reshape(b, n).astype(jnp.int32),
      jnp.asarray(seeds, jnp.uint32).reshape(b, n),
      num_candidates=int(num_candidates), num_uncertain=int(num_uncertain),
      num_random=int(num_random))
  return out.reshape(lead + (p, 2))
