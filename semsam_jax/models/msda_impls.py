"""The ``"fused"`` multi-scale deformable attention core (pure XLA).

Same contract as ``deformable_attention._msda_gather``::

  fn(value (B, S, M, D), spatial_shapes ((H, W), ...) static,
     sampling_locations (B, Lq, M, L, P, 2), attention_weights (B, Lq, M, L, P))
  -> (B, Lq, M * D)

with ``grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``
semantics: a normalised location ``loc`` maps to the pixel coordinate
``loc * size - 0.5`` and bilinear corners outside the map read zero.

Design (all in plain XLA ops, so it runs on every backend):

* **One flat row table.**  ``value`` is used as it is stored, reshaped to
  ``(B * S * M, D)``: row ``(b * S + s) * M + m`` holds the D channels of head
  ``m`` at position ``s``.  No per-level split and no head transpose; the
  rows of all levels, batches and heads are addressed by one precomputed
  int32 index per bilinear corner (level offset folded in).
* **Weights folded before the gather.**  Each corner's weight is
  ``bilinear weight * in-map mask * attention weight``; corners outside the
  map get weight 0 and an index clipped into the map, so no fill/bounds
  logic is needed in the gathers (``PROMISE_IN_BOUNDS``).
* **Forward without the big intermediate.**  The weighted sum over the
  ``K = L * P * 4`` corners is written as K single-row gathers added
  together.  Every gather has one consumer, so XLA fuses all of them into a
  single loop that writes only the (B, Lq, M, D) output; the
  (B, Lq, M, K, D) tensor of gathered rows is never materialised (at the
  encoder's size it is ~1 GiB, and writing/reading it dominates the
  reference implementation).
* **Hand-written backward** (``jax.custom_vjp``).  With the cotangent
  ``g`` (B, Lq, M, D) and ``c_k = <value row of corner k, g>``:
  ``d attention_weight = sum_k bilinear_k * mask_k * c_k``, the location
  gradient follows from the four ``c`` of a sample and its fractional
  offsets, and ``d value`` is a scatter-add of ``weight_k * g`` into the
  corner rows.  Both run in one ``lax.scan`` over blocks of queries: per
  block, ``c`` is D single-element gathers added together (one fused loop, no
  (..., K, D) intermediate) and the block's (chunk, M, K, D) updates are
  scattered into the carried gradient table.  On CPU the blocks are small
  enough for the updates to stay in cache (XLA:CPU cannot fuse the update
  computation into a scatter); autodiff of the forward instead builds one
  zero-initialised table per corner.  Only the inputs are kept as residuals;
  the corner geometry is recomputed in the backward pass.

XLA:CPU executes gathers and scatters element by element, so their cost is
set by the number of elements touched (about 4 * L * P * D per query and
head) and by avoiding large intermediates, not by FLOPs.

It is registered as ``"fused"`` in ``deformable_attention.MSDA_IMPLS`` and is
the ``"auto"`` choice on CPU when the native kernel
(:mod:`semsam_jax.kernels.msda_cpu`) cannot be built.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Shapes = tuple[tuple[int, int], ...]

_IN_BOUNDS = lax.GatherScatterMode.PROMISE_IN_BOUNDS
# Gradient rows scattered per step of the backward loop on CPU (~2 MiB of
# float32 updates at D=32: the step's updates stay in cache).  Other backends
# scatter in parallel and fuse the update computation into the scatter, so
# they take (practically) all rows in one step.
_CPU_ROWS_PER_STEP = 16384
_ACCEL_ROWS_PER_STEP = 1 << 26


def _as_shapes(spatial_shapes) -> Shapes:
  return tuple((int(h), int(w)) for h, w in spatial_shapes)


def level_starts(shapes: Shapes) -> tuple[int, ...]:
  """Offset of each level inside the flattened sequence (static ints)."""
  starts, total = [], 0
  for h, w in shapes:
    starts.append(total)
    total += h * w
  return tuple(starts)


def _corner_geometry(value_shape: tuple[int, ...], shapes: Shapes, loc: Array):
  """Row indices, in-map masks and fractional offsets of all bilinear corners.

  Args:
    value_shape: (B, S, M, D) of the value tensor.
    shapes: the L static level sizes.
    loc: (B, Lq, M, L, P, 2) float32 normalised (x, y).

  Returns:
    rows: (B, Lq, M, L, P, 4) int32 rows of ``value.reshape(B * S * M, D)``;
      corners ordered (top-left, top-right, bottom-left, bottom-right);
      corners outside the map point to a clipped (valid) row.
    inside: (B, Lq, M, L, P, 4) bool, True where the corner lies in the map.
    fx, fy: (B, Lq, M, L, P) float32 fractional offsets from the top-left corner.
  """
  b, s, m, _ = value_shape
  # Per-level constants broadcast against the (L, P) trailing axes.
  widths = jnp.asarray([w for _, w in shapes], jnp.float32)[:, None]
  heights = jnp.asarray([h for h, _ in shapes], jnp.float32)[:, None]
  starts = jnp.asarray(level_starts(shapes), jnp.int32)[:, None]
  widths_i = widths.astype(jnp.int32)
  heights_i = heights.astype(jnp.int32)

  x = loc[..., 0] * widths - 0.5
  y = loc[..., 1] * heights - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  # Bring NaN / huge corners to just outside the map (where they still are
  # outside) so that the integer conversion below stays in range.
  x0 = jnp.clip(jnp.where(jnp.isnan(x0), -2.0, x0), -2.0, widths)
  y0 = jnp.clip(jnp.where(jnp.isnan(y0), -2.0, y0), -2.0, heights)
  # (b * S + s) * M + m  ==  b * S * M + m + s * M
  base = (jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None] * (s * m)
          + jnp.arange(m, dtype=jnp.int32)[None, None, :, None, None])
  rows, inside = [], []
  for dy in (0.0, 1.0):
    for dx in (0.0, 1.0):
      xi = x0 + dx
      yi = y0 + dy
      inside.append((xi >= 0) & (xi <= widths - 1) & (yi >= 0) & (yi <= heights - 1))
      xc = jnp.clip(xi.astype(jnp.int32), 0, widths_i - 1)
      yc = jnp.clip(yi.astype(jnp.int32), 0, heights_i - 1)
      rows.append(base + (starts + yc * widths_i + xc) * m)
  return jnp.stack(rows, -1), jnp.stack(inside, -1), fx, fy


def _bilinear(fx: Array, fy: Array) -> Array:
  """(..., 4) bilinear weights in corner order (tl, tr, bl, br)."""
  gx = 1.0 - fx
  gy = 1.0 - fy
  return jnp.stack([gy * gx, gy * fx, fy * gx, fy * fx], -1)


def _take_rows(table: Array, idx: Array) -> Array:
  """``table[idx]`` for a 2-D table and in-range int indices: (*idx.shape, D)."""
  dnums = lax.GatherDimensionNumbers(offset_dims=(idx.ndim,), collapsed_slice_dims=(0,),
                                     start_index_map=(0,))
  return lax.gather(table, idx[..., None], dnums, slice_sizes=(1, table.shape[1]),
                    mode=_IN_BOUNDS)


def _take_elems(table: Array, row: Array, col: int) -> Array:
  """``table[row, col]`` for in-range int ``row`` and a static column."""
  idx = jnp.stack([row, jnp.full_like(row, col)], -1)
  dnums = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0, 1),
                                     start_index_map=(0, 1))
  return lax.gather(table, idx, dnums, slice_sizes=(1, 1), mode=_IN_BOUNDS)


def _add_rows(table: Array, idx: Array, updates: Array) -> Array:
  """``table.at[idx].add(updates)`` for a 2-D table and in-range indices."""
  dnums = lax.ScatterDimensionNumbers(update_window_dims=(idx.ndim,), inserted_window_dims=(0,),
                                      scatter_dims_to_operand_dims=(0,))
  return lax.scatter_add(table, idx[..., None], updates, dnums, mode=_IN_BOUNDS)


def _weighted_row_sum(table: Array, idx: Array, weights: Array) -> Array:
  """sum_k weights[..., k] * table[idx[..., k]] -> (..., D) float32.

  Written as one gather per k so that XLA fuses the whole sum into a single
  loop (no (..., K, D) intermediate).
  """
  out = None
  for k in range(idx.shape[-1]):
    term = _take_rows(table, idx[..., k]).astype(jnp.float32) * weights[..., k, None]
    out = term if out is None else out + term
  return out


def _row_dots(table: Array, idx: Array, vec: Array) -> Array:
  """<table[idx[..., k]], vec[...]> for every k -> (..., K) float32.

  One scalar gather per channel, added up: a single fused loop over the
  (..., K) output instead of a materialised (..., K, D) product.
  """
  out = None
  for col in range(table.shape[1]):
    term = _take_elems(table, idx, col).astype(jnp.float32) * vec[..., col, None]
    out = term if out is None else out + term
  return out


def _corner_arrays(value_shape: tuple[int, ...], shapes: Shapes, loc: Array, aw: Array):
  """(B, Lq, M, K) corner rows and folded weights (bilinear * in-map * attention)."""
  b, _, m, _ = value_shape
  lq = loc.shape[1]
  rows, inside, fx, fy = _corner_geometry(value_shape, shapes, loc)
  weights = jnp.where(inside, _bilinear(fx, fy), 0.0) * aw[..., None]
  return rows.reshape(b, lq, m, -1), weights.reshape(b, lq, m, -1)


def _fused_forward(value: Array, shapes: Shapes, loc: Array, aw: Array) -> Array:
  b, s, m, d = value.shape
  lq = loc.shape[1]
  rows, weights = _corner_arrays(value.shape, shapes, loc.astype(jnp.float32),
                                 aw.astype(jnp.float32))
  out = _weighted_row_sum(value.reshape(b * s * m, d), rows, weights)
  return out.reshape(b, lq, m * d).astype(value.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fused_core(value: Array, shapes: Shapes, loc: Array, aw: Array) -> Array:
  return _fused_forward(value, shapes, loc, aw)


def _fused_core_fwd(value, shapes, loc, aw):
  return _fused_forward(value, shapes, loc, aw), (value, loc, aw)


def _chunked(x: Array, n_chunks: int, chunk: int) -> Array:
  """(N, ...) -> (n_chunks, chunk, ...), zero-padded at the end."""
  pad = n_chunks * chunk - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(n_chunks, chunk, *x.shape[1:])


def _fused_core_bwd(shapes, residuals, g):
  value, loc, aw = residuals
  b, s, m, d = value.shape
  lq, n_lvl, p = loc.shape[1], loc.shape[3], loc.shape[4]
  k_all = n_lvl * p * 4
  locf = loc.astype(jnp.float32)
  a = aw.astype(jnp.float32)
  rows, weights = _corner_arrays(value.shape, shapes, locf, a)
  table = value.reshape(b * s * m, d)

  # One loop over blocks of queries: per block, the corner dot products
  # c = <row, g> (loop output) and the scatter-add of weight * g into the
  # gradient table (loop carry).  Blocks keep the (chunk, M, K, D) updates
  # cache-sized; padded queries have weight 0.  Emitting c as the loop's
  # output also pins its D gathers into one fused loop: computed outside,
  # XLA would fuse the cheap adds into each consumer below and materialise
  # the D gathered (..., K) arrays instead.
  n = b * lq
  per_step = _CPU_ROWS_PER_STEP if jax.default_backend() == "cpu" else _ACCEL_ROWS_PER_STEP
  chunk = max(1, min(n, per_step // (m * k_all)))
  n_chunks = -(-n // chunk)
  xs = (_chunked(rows.reshape(n, m, k_all), n_chunks, chunk),
        _chunked(weights.reshape(n, m, k_all), n_chunks, chunk),
        _chunked(g.reshape(n, m, d).astype(jnp.float32), n_chunks, chunk))

  def step(acc, x):
    idx, w, gq = x
    c = _row_dots(table, idx, gq)
    return _add_rows(acc, idx, gq[:, :, None, :] * w[..., None]), c

  g_table, c = lax.scan(step, jnp.zeros((b * s * m, d), jnp.float32), xs)

  # Location and attention gradients from the four c of each sample.
  _, inside, fx, fy = _corner_geometry(value.shape, shapes, locf)
  c = jnp.where(inside, c.reshape(n_chunks * chunk, m, k_all)[:n].reshape(inside.shape), 0.0)
  c_tl, c_tr, c_bl, c_br = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
  gx, gy = 1.0 - fx, 1.0 - fy
  g_aw = gy * (gx * c_tl + fx * c_tr) + fy * (gx * c_bl + fx * c_br)
  # d sample / d x = (1 - fy) (c_tr - c_tl) + fy (c_br - c_bl); dx / d loc_x = W.
  widths = jnp.asarray([w for _, w in shapes], jnp.float32)[:, None]
  heights = jnp.asarray([h for h, _ in shapes], jnp.float32)[:, None]
  g_x = (gy * (c_tr - c_tl) + fy * (c_br - c_bl)) * a * widths
  g_y = (gx * (c_bl - c_tl) + fx * (c_br - c_tr)) * a * heights
  g_loc = jnp.stack([g_x, g_y], -1)
  return (g_table.reshape(value.shape).astype(value.dtype), g_loc.astype(loc.dtype),
          g_aw.astype(aw.dtype))


_fused_core.defvjp(_fused_core_fwd, _fused_core_bwd)


def msda_fused(value: Array, spatial_shapes, sampling_locations: Array,
               attention_weights: Array) -> Array:
  """Fused-gather deformable attention with a hand-written backward pass.

  See the module docstring.  ``spatial_shapes`` must be static (H, W) ints.
  """
  b, s, m, _ = value.shape
  if b * s * m >= 2 ** 31:
    raise ValueError(f"value has {b * s * m} rows (B * S * M); int32 row indices need < 2**31")
  return _fused_core(value, _as_shapes(spatial_shapes), sampling_locations, attention_weights)
