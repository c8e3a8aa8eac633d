"""Point sampling: bilinear reads of maps at normalised points, and the
PointRend uncertainty sampling of the mask losses.

Coordinates are (x, y) in [0, 1] relative to the map's whole extent and are
read as ``torch.nn.functional.grid_sample(..., align_corners=False)`` with zero
padding does on ``2 p - 1`` (detectron2's ``point_sample``): pixel centres sit
at ``(i + 0.5) / size``.

Nothing here materialises a per-target map: predictions are read from the
decoder's (B, K, T, h, w) output with a per-read map index, and targets from
the image's bit-packed masks (B, M, H, W/8) with a per-read mask slot.

Every read takes ``impl``: ``"xla"`` (the formulations below), ``"native"``
(the CPU kernels of :mod:`semsam_jax.kernels.point_sample`, same values) or
``"auto"`` (native when JAX computes on the CPU and the kernels build).

Candidate draws: :func:`draw_point_candidates` draws them with
``jax.random``; :func:`hash_uniform` defines a counter-based stream (one
uint32 seed per group) that the kernel generates on the fly, so the
``K * T * 3P`` candidates of a layer are never written to memory
(:func:`hashed_uncertain_coords`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


IMPLS = ("auto", "native", "xla")


def use_native(impl: str) -> bool:
  """Whether ``impl`` selects the native kernels here (raises when
  ``"native"`` is asked for and they cannot be built)."""
  if impl not in IMPLS:
    raise ValueError(f"point sampling impl {impl!r}; valid: {IMPLS}")
  if impl == "xla":
    return False
  from semsam_jax.kernels import native  # pylint: disable=import-outside-toplevel
  if impl == "native":
    native.load()
    return True
  return native.usable_here()


def _corners(coords: Array, height: int, width: int):
  """The four bilinear taps of grid_sample (nw, ne, sw, se order):
  yields (iy, ix, weight, inside) per tap."""
  g = 2.0 * coords - 1.0
  ix = ((g[..., 0] + 1.0) / 2.0) * width - 0.5
  iy = ((g[..., 1] + 1.0) / 2.0) * height - 0.5
  ix_w = jnp.floor(ix)
  iy_n = jnp.floor(iy)
  ix_e = ix_w + 1.0
  iy_s = iy_n + 1.0
  taps = (
      (iy_n, ix_w, (ix_e - ix) * (iy_s - iy)),
      (iy_n, ix_e, (ix - ix_w) * (iy_s - iy)),
      (iy_s, ix_w, (ix_e - ix) * (iy - iy_n)),
      (iy_s, ix_e, (ix - ix_w) * (iy - iy_n)),
  )
  for ty, tx, w in taps:
    inside = (tx >= 0) & (tx <= width - 1) & (ty >= 0) & (ty <= height - 1)
    yield (jnp.clip(ty, 0, height - 1).astype(jnp.int32),
           jnp.clip(tx, 0, width - 1).astype(jnp.int32), w, inside)


def sample_maps(maps: Array, map_index: Array, coords: Array, impl: str = "xla") -> Array:
  """Bilinear samples of selected maps.

  Args:
    maps: (B, R, h, w) float maps (e.g. the decoder's mask logits with R = K*T).
    map_index: (B, ...) int, which of the R maps each group of points reads.
    coords: (B, ..., P, 2) points (x, y) in [0, 1]; or (B, 1, ..., 1, P, 2):
      one set shared by every group.
    impl: "xla", "native" or "auto" (module docstring).

  Returns:
    (B, ..., P) samples, differentiable w.r.t. ``maps`` (not ``coords``);
    float32 on the native path.
  """
  if use_native(impl):
    from semsam_jax.kernels import point_sample  # pylint: disable=import-outside-toplevel
    return point_sample.sample_maps(maps, map_index, coords)
  coords = jnp.broadcast_to(coords, map_index.shape + coords.shape[-2:])
  b, r, h, w = maps.shape
  flat = maps.reshape(b, r * h * w)
  base = (map_index.astype(jnp.int32) * (h * w))[..., None]
  coords = jax.lax.stop_gradient(coords)
  out = None
  for iy, ix, wt, inside in _corners(coords, h, w):
    idx = (base + iy * w + ix).reshape(b, -1)
    v = jnp.take_along_axis(flat, idx, axis=1, mode="clip").reshape(wt.shape)
    term = jnp.where(inside, v * wt.astype(v.dtype), jnp.zeros((), v.dtype))
    out = term if out is None else out + term
  return out


def sample_packed_masks(masks: Array, mask_index: Array, coords: Array,
                        impl: str = "xla") -> Array:
  """Bilinear samples of 0/1 masks stored bit-packed.

  Args:
    masks: (B, M, H, W/8) uint8, pixel (y, x) = bit ``x % 8`` of byte
      ``[y, x // 8]`` (``np.packbits(..., bitorder="little")``).
    mask_index: (B, ...) int mask slots.
    coords: (B, ..., P, 2) points (x, y) in [0, 1] of the (H, W) canvas.

  Returns:
    (B, ..., P) float32 in [0, 1] (fractional at mask edges).
  """
  if use_native(impl):
    from semsam_jax.kernels import point_sample  # pylint: disable=import-outside-toplevel
    return point_sample.sample_packed_masks(masks, mask_index, coords)
  coords = jnp.broadcast_to(coords, mask_index.shape + coords.shape[-2:])
  b, m, h, wb = masks.shape
  w = wb * 8
  flat = masks.reshape(b, m * h * wb)
  base = (mask_index.astype(jnp.int32) * (h * wb))[..., None]
  out = None
  for iy, ix, wt, inside in _corners(coords, h, w):
    idx = (base + iy * wb + (ix >> 3)).reshape(b, -1)
    byte = jnp.take_along_axis(flat, idx, axis=1, mode="clip").reshape(wt.shape)
    bit = (byte.astype(jnp.int32) >> (ix & 7)) & 1
    term = jnp.where(inside, bit.astype(jnp.float32) * wt, 0.0)
    out = term if out is None else out + term
  return out


def uncertainty(logits: Array) -> Array:
  """The reference's uncertainty of a mask logit: -|logit|."""
  return -jnp.abs(logits)


def num_importance_points(num_points: int, importance_sample_ratio: float) -> int:
  return int(importance_sample_ratio * num_points)


def num_oversampled_points(num_points: int, oversample_ratio: float) -> int:
  return int(num_points * oversample_ratio)


def uncertain_point_coords(sample_logits: Callable[[Array], Array], candidates: Array,
                           extra: Array, num_points: int,
                           importance_sample_ratio: float) -> Array:
  """PointRend's ``get_uncertain_point_coords_with_randomness`` on given draws.

  Args:
    sample_logits: coords (..., C, 2) -> logits (..., C) (detached here).
    candidates: (..., int(P * oversample_ratio), 2) uniform points.
    extra: (..., P - int(P * importance_sample_ratio), 2) uniform points.

  Returns:
    (..., P, 2): the ``int(ratio * P)`` most uncertain candidates, then ``extra``.
  """
  k = num_importance_points(num_points, importance_sample_ratio)
  logits = jax.lax.stop_gradient(sample_logits(candidates))
  if k > 0:
    _, top = jax.lax.top_k(uncertainty(logits), k)
    chosen = jnp.take_along_axis(candidates, top[..., None], axis=-2)
  else:
    chosen = candidates[..., :0, :]
  return jax.lax.stop_gradient(jnp.concatenate([chosen, extra.astype(chosen.dtype)], axis=-2))


def draw_point_candidates(rng: Array, lead_shape: tuple, num_points: int,
                          oversample_ratio: float, importance_sample_ratio: float):
  """Uniform draws for :func:`uncertain_point_coords`: (candidates, extra)."""
  c = num_oversampled_points(num_points, oversample_ratio)
  e = num_points - num_importance_points(num_points, importance_sample_ratio)
  k1, k2 = jax.random.split(rng)
  return (jax.random.uniform(k1, tuple(lead_shape) + (c, 2), jnp.float32),
          jax.random.uniform(k2, tuple(lead_shape) + (e, 2), jnp.float32))


# ------------------------------------------------------------- hashed draws

_WEYL = 0x9E3779B9


def _mix32(x: Array) -> Array:
  """Wellons' ``lowbias32`` integer hash (uint32 -> uint32)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_uniform(seeds: Array, start: int, count: int) -> Array:
  """Points ``start .. start + count - 1`` of each group's hashed stream.

  Value ``j`` of the group with seed ``s`` is ``mix(mix(s) + j * 0x9E3779B9)
  >> 8`` scaled by 2**-24 (uniform on the 24-bit grid of [0, 1), like
  ``torch.rand``); point ``i`` is (value ``2 i``, value ``2 i + 1``) as (x, y).

  Args:
    seeds: (...) uint32, one per group.

  Returns:
    (..., count, 2) float32.
  """
  base = _mix32(jnp.asarray(seeds, jnp.uint32))[..., None]
  j = jnp.arange(2 * start, 2 * (start + count), dtype=jnp.uint32)
  h = _mix32(base + j * jnp.uint32(_WEYL))
  u = (h >> 8).astype(jnp.float32) * jnp.float32(1.0 / 16777216.0)
  return u.reshape(u.shape[:-1] + (count, 2))


def hashed_point_candidates(seeds: Array, num_points: int, oversample_ratio: float,
                            importance_sample_ratio: float):
  """The (candidates, extra) of :func:`draw_point_candidates` from hashed
  streams: candidates are points 0 .. C-1, extra the E after them."""
  c = num_oversampled_points(num_points, oversample_ratio)
  e = num_points - num_importance_points(num_points, importance_sample_ratio)
  return hash_uniform(seeds, 0, c), hash_uniform(seeds, c, e)


def hashed_uncertain_coords(maps: Array, map_index: Array, seeds: Array, num_points: int,
                            oversample_ratio: float, importance_sample_ratio: float,
                            impl: str = "xla") -> Array:
  """PointRend's uncertainty sampling on hashed candidates.

  The ``int(importance_sample_ratio * P)`` candidates with the smallest
  ``|logit|`` (ties: lower candidate index first, as ``lax.top_k`` breaks
  them), in candidate order, then the remaining points of the stream
  (:func:`hashed_point_candidates`).  The native kernel never writes the
  candidates to memory; the XLA path materialises them and gives the same
  points bit for bit.

  Args:
    maps: (B, R, h, w) logits; map_index: (B, ...) int; seeds: (B, ...) uint32.

  Returns:
    (B, ..., P, 2) float32, no gradient.
  """
  k = num_importance_points(num_points, importance_sample_ratio)
  c = num_oversampled_points(num_points, oversample_ratio)
  e = num_points - k
  maps = jax.lax.stop_gradient(maps)
  if use_native(impl):
    from semsam_jax.kernels import point_sample  # pylint: disable=import-outside-toplevel
    return point_sample.uncertain_points(maps, map_index, seeds, c, k, e)
  cand, extra = hashed_point_candidates(seeds, num_points, oversample_ratio,
                                        importance_sample_ratio)
  if k > 0:
    logits = sample_maps(maps, map_index, cand, impl="xla")
    _, top = jax.lax.top_k(uncertainty(logits), k)
    top = jnp.sort(top, axis=-1)
    chosen = jnp.take_along_axis(cand, top[..., None], axis=-2)
  else:
    chosen = cand[..., :0, :]
  return jax.lax.stop_gradient(jnp.concatenate([chosen, extra], axis=-2))
