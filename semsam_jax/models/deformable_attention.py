"""Multi-scale deformable attention (Deformable DETR), NHWC / batch-first.

Two layers:

* :func:`ms_deform_attn` -- the parameter-free core.  Every query head reads
  ``n_points`` bilinear samples from each feature level of a flattened value
  tensor and sums them with its attention weights.  Sampling follows
  ``torch.nn.functional.grid_sample(mode='bilinear', padding_mode='zeros',
  align_corners=False)`` applied to ``2 * loc - 1``: a location ``loc`` in
  ``[0, 1]`` maps to the pixel coordinate ``loc * size - 0.5`` and every
  bilinear corner outside the map contributes zero.  Several implementations
  with the same signature live in :data:`MSDA_IMPLS`; ``impl`` picks one
  (``"auto"``: the fastest measured one for the backend, see :func:`resolve_impl`).
* :class:`MSDeformAttn` -- the learned module (``sampling_offsets``,
  ``attention_weights``, ``value_proj``, ``output_proj``).  Its value projection
  (:meth:`MSDeformAttn.project_value`) and the sampling step
  (:meth:`MSDeformAttn.attend`) can be called separately so a fixed memory is
  projected once and attended to by many query batches.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semsam_jax.models import msda_impls
from semsam_jax.models.layers import dense

Array = jax.Array
Dtype = Any
SpatialShapes = Sequence[tuple[int, int]]


def _static_shapes(spatial_shapes) -> tuple[tuple[int, int], ...]:
  """Normalises ``spatial_shapes`` to a tuple of (H, W) Python ints."""
  try:
    shapes = tuple((int(h), int(w)) for h, w in np.asarray(spatial_shapes).reshape(-1, 2))
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError) as e:
    raise TypeError("spatial_shapes must be static (H, W) Python ints, not traced "
                    f"values: {spatial_shapes!r}") from e
  return shapes


def level_start_index(spatial_shapes: SpatialShapes) -> tuple[int, ...]:
  """Offset of each level inside the flattened sequence (static ints)."""
  return msda_impls.level_starts(_static_shapes(spatial_shapes))


def _check_inputs(value, shapes, sampling_locations, attention_weights):
  b, s, m, _ = value.shape
  total = sum(h * w for h, w in shapes)
  if s != total:
    raise ValueError(f"value has {s} positions but spatial_shapes {shapes} sum to {total}")
  loc = sampling_locations.shape
  if len(loc) != 6 or loc[-1] != 2 or loc[0] != b or loc[2] != m or loc[3] != len(shapes):
    raise ValueError(f"sampling_locations must be (B={b}, Lq, M={m}, L={len(shapes)}, P, 2), "
                     f"got {loc}")
  if attention_weights.shape != loc[:-1]:
    raise ValueError(f"attention_weights must be {loc[:-1]}, got {attention_weights.shape}")


def _bilinear_corners(loc: Array, height: int, width: int):
  """Flat indices (..., 4) and weights (..., 4) of the 4 bilinear corners.

  ``loc`` (..., 2) holds normalised (x, y).  Weights of corners outside the
  ``height x width`` map are zero and their indices are clipped into range.
  """
  x = loc[..., 0] * width - 0.5
  y = loc[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  xs = (x0, x0 + 1.0)
  ys = (y0, y0 + 1.0)
  wxs = (1.0 - fx, fx)
  wys = (1.0 - fy, fy)
  idx, wts = [], []
  for yi, wy in zip(ys, wys):
    for xi, wx in zip(xs, wxs):
      inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
      xc = jnp.clip(xi, 0, width - 1).astype(jnp.int32)
      yc = jnp.clip(yi, 0, height - 1).astype(jnp.int32)
      idx.append(yc * width + xc)
      wts.append(jnp.where(inside, wx * wy, 0.0))
  return jnp.stack(idx, -1), jnp.stack(wts, -1)


def _msda_gather(value: Array, spatial_shapes: tuple[tuple[int, int], ...],
                 sampling_locations: Array, attention_weights: Array) -> Array:
  """Reference implementation: one gather of the 4 corners per level."""
  b, _, m, d = value.shape
  _, lq, _, _, p, _ = sampling_locations.shape
  loc = sampling_locations.astype(jnp.float32)
  aw = attention_weights.astype(jnp.float32)
  out = jnp.zeros((b, m, lq, d), jnp.float32)
  start = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    # (B, H*W, M, D) -> (B, M, H*W, D)
    v = jnp.swapaxes(value[:, start:start + h * w], 1, 2)
    start += h * w
    idx, wts = _bilinear_corners(loc[:, :, :, lvl], h, w)        # (B, Lq, M, P, 4)
    wts = wts * aw[:, :, :, lvl, :, None]                         # fold in attention
    idx = jnp.transpose(idx, (0, 2, 1, 3, 4)).reshape(b, m, lq * p * 4)
    wts = jnp.transpose(wts, (0, 2, 1, 3, 4)).reshape(b, m, lq, p * 4)
    picked = jnp.take_along_axis(v, idx[..., None], axis=2)       # (B, M, Lq*P*4, D)
    picked = picked.reshape(b, m, lq, p * 4, d)
    out = out + jnp.einsum("bmqk,bmqkd->bmqd", wts.astype(value.dtype), picked,
                           preferred_element_type=jnp.float32)
  # (B, M, Lq, D) -> (B, Lq, M*D), head-major channels.
  return jnp.transpose(out, (0, 2, 1, 3)).reshape(b, lq, m * d).astype(value.dtype)


def _msda_patch(value: Array, spatial_shapes: tuple[tuple[int, int], ...],
                sampling_locations: Array, attention_weights: Array) -> Array:
  """One gather of a contiguous 2x2xD patch per sample on a zero-bordered map.

  Each level is laid out (B*M, H+2, W+2, D) with a one-pixel zero border, so
  the four bilinear corners of a sample are one (2, 2, D) slice and corners
  outside the map read the border's zeros (grid_sample's zero padding).
  Samples lying entirely outside get zero weight.  Four times fewer gather
  indices than :func:`_msda_gather`, each moving two rows of 2*D values.
  """
  b, _, m, d = value.shape
  _, lq, _, _, p, _ = sampling_locations.shape
  loc = sampling_locations.astype(jnp.float32)
  aw = attention_weights.astype(jnp.float32)
  bm = b * m
  out = jnp.zeros((bm, lq, d), jnp.float32)
  dnums = jax.lax.GatherDimensionNumbers(offset_dims=(2, 3, 4), collapsed_slice_dims=(0,),
                                         start_index_map=(0, 1, 2))
  batch_index = jnp.broadcast_to(jnp.arange(bm, dtype=jnp.int32)[:, None, None],
                                 (bm, lq * p, 1))
  start = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    v = value[:, start:start + h * w].reshape(b, h, w, m, d)
    start += h * w
    v = jnp.transpose(v, (0, 3, 1, 2, 4)).reshape(bm, h, w, d)
    v = jnp.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xy = jnp.transpose(loc[:, :, :, lvl], (0, 2, 1, 3, 4)).reshape(bm, lq * p, 2)
    a = jnp.transpose(aw[:, :, :, lvl], (0, 2, 1, 3)).reshape(bm, lq * p)
    x = xy[..., 0] * w - 0.5
    y = xy[..., 1] * h - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    inside = (x0 >= -1) & (x0 <= w - 1) & (y0 >= -1) & (y0 <= h - 1)
    corner_w = jnp.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx],
                         -1) * a[..., None]                              # (BM, Q, 4)
    # After the product, so that NaN locations (never inside) weigh exactly 0.
    corner_w = jnp.where(inside[..., None], corner_w, 0.0)
    # Top-left corner in the bordered map; clipping only moves samples that
    # are entirely outside (and already have zero weight).
    xi = jnp.clip(x0 + 1, 0, w).astype(jnp.int32)
    yi = jnp.clip(y0 + 1, 0, h).astype(jnp.int32)
    idx = jnp.concatenate([batch_index, yi[..., None], xi[..., None]], -1)
    patch = jax.lax.gather(v, idx, dnums, slice_sizes=(1, 2, 2, d),
                           mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    patch = patch.reshape(bm, lq, p * 4, d)
    out = out + jnp.einsum("nqk,nqkd->nqd", corner_w.reshape(bm, lq, p * 4).astype(value.dtype),
                           patch, preferred_element_type=jnp.float32)
  out = out.reshape(b, m, lq, d)
  return jnp.transpose(out, (0, 2, 1, 3)).reshape(b, lq, m * d).astype(value.dtype)


def _msda_cpu_native(value, spatial_shapes, sampling_locations, attention_weights):
  from semsam_jax.kernels import msda_cpu  # builds the kernel on first use
  return msda_cpu.msda_cpu(value, spatial_shapes, sampling_locations, attention_weights)


# name -> pure function(value, spatial_shapes, sampling_locations, attention_weights).
# ``spatial_shapes`` reaches the function as a tuple of (H, W) Python ints.
MSDA_IMPLS: dict[str, Callable[..., Array]] = {
    "gather": _msda_gather,
    "patch": _msda_patch,
    "fused": msda_impls.msda_fused,
    "cpu_native": _msda_cpu_native,
}
# Valid values of ``impl`` / ``config.msda_impl``: the implementations and "auto".
IMPL_CHOICES = ("auto",) + tuple(MSDA_IMPLS)


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """The implementation ``impl`` stands for on ``backend`` (default: JAX's).

  ``"auto"`` is the fastest measured choice (``benchmarks/RESULTS.md``): on
  CPU the native kernel (``"cpu_native"``) when it can be built here, else
  ``"fused"``; on other backends ``"gather"``.  Other names are returned as
  they are (after validation).
  """
  if impl != "auto":
    if impl not in MSDA_IMPLS:
      raise ValueError(f"unknown ms_deform_attn implementation {impl!r}; "
                       f"valid names: {list(IMPL_CHOICES)}")
    return impl
  backend = backend or jax.default_backend()
  if backend == "cpu":
    from semsam_jax.kernels import msda_cpu
    return "cpu_native" if msda_cpu.available() else "fused"
  return "gather"


def ms_deform_attn(value: Array, spatial_shapes: SpatialShapes, sampling_locations: Array,
                   attention_weights: Array, impl: str = "auto") -> Array:
  """Multi-scale deformable attention core.

  Args:
    value: (B, S, M, D) per-head values of all levels, flattened level after
      level (row-major H, W inside a level); S = sum(H_l * W_l).
    spatial_shapes: static ((H_0, W_0), ...) of the L levels.
    sampling_locations: (B, Lq, M, L, P, 2) normalised (x, y); (0, 0) is the
      top-left corner of the map, (1, 1) the bottom-right one; values outside
      [0, 1] are allowed (they read zeros outside the map).
    attention_weights: (B, Lq, M, L, P), usually a softmax over L * P.
    impl: a key of :data:`MSDA_IMPLS`, or ``"auto"`` (see :func:`resolve_impl`).

  Returns:
    (B, Lq, M * D).
  """
  fn = MSDA_IMPLS[resolve_impl(impl)]
  shapes = _static_shapes(spatial_shapes)
  _check_inputs(value, shapes, sampling_locations, attention_weights)
  return fn(value, shapes, sampling_locations, attention_weights)


def sampling_inputs(reference_points: Array, offsets: Array, logits: Array,
                    spatial_shapes: SpatialShapes) -> tuple[Array, Array]:
  """Sampling locations and attention weights of :meth:`MSDeformAttn.attend`.

  Args:
    reference_points: (B, Lq, L, 2) normalised (x, y) points (offsets are in
      pixels of each level) or (B, Lq, L, 4) (cx, cy, w, h) boxes (offsets are
      in units of half the box size divided by the number of points).
    offsets: (B, Lq, M, L, P, 2) raw ``sampling_offsets`` outputs.
    logits: (B, Lq, M, L * P) raw ``attention_weights`` outputs.

  Returns:
    locations (B, Lq, M, L, P, 2) and weights (B, Lq, M, L, P), float32; the
    weights are a softmax over the L * P samples of a head.
  """
  shapes = _static_shapes(spatial_shapes)
  b, lq, m, l, p, _ = offsets.shape
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(b, lq, m, l, p)
  offsets = offsets.astype(jnp.float32)
  ref = reference_points.astype(jnp.float32)
  if ref.shape[-1] == 2:
    norm = jnp.asarray([[w, h] for h, w in shapes], jnp.float32)   # (L, 2)
    loc = ref[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
  else:
    loc = (ref[:, :, None, :, None, :2]
           + offsets / p * ref[:, :, None, :, None, 2:] * 0.5)
  return loc, weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _attend_cpu_native(value, shapes, reference_points, offsets, logits):
  """Sampling of :meth:`MSDeformAttn.attend` in one native call (CPU).

  The forward pass forms weights and locations inside the kernel; the
  backward pass differentiates :func:`sampling_inputs` followed by the
  native core (whose own VJP is a kernel too).  Returns (B, Lq, M, D) float32.
  """
  from semsam_jax.kernels import msda_cpu
  return msda_cpu.msda_cpu_query_forward(value, shapes, reference_points, offsets, logits)


def _attend_cpu_native_fwd(value, shapes, reference_points, offsets, logits):
  return (_attend_cpu_native(value, shapes, reference_points, offsets, logits),
          (value, reference_points, offsets, logits))


def _attend_cpu_native_bwd(shapes, residuals, g):
  from semsam_jax.kernels import msda_cpu

  def composite(value, reference_points, offsets, logits):
    loc, weights = sampling_inputs(reference_points, offsets, logits, shapes)
    out = msda_cpu.msda_cpu(value, shapes, loc, weights)
    return out.reshape(out.shape[:2] + (value.shape[2], value.shape[3])).astype(jnp.float32)

  _, vjp = jax.vjp(composite, *residuals)
  return vjp(g)


_attend_cpu_native.defvjp(_attend_cpu_native_fwd, _attend_cpu_native_bwd)


def sampling_offsets_bias_init(n_heads: int, n_levels: int, n_points: int):
  """Initializer of the ``sampling_offsets`` bias used by the reference.

  Head ``h`` looks in direction ``angle = 2*pi*h/n_heads`` (scaled so that the
  larger of |cos|, |sin| is 1); point ``p`` sits ``p + 1`` steps along it, the
  same on every level.  Layout (heads, levels, points, xy) flattened.
  """

  def init(key, shape, dtype=jnp.float32):
    del key
    angles = np.arange(n_heads, dtype=np.float64) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
    grid = grid * np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
    grid = grid.reshape(-1)
    if tuple(shape) != grid.shape:
      raise ValueError(f"sampling_offsets bias shape {shape} != {grid.shape}")
    return jnp.asarray(grid, dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention module (``MSDeformAttn`` of the reference).

  Attributes:
    d_model: channels of queries / values.
    n_levels, n_heads, n_points: feature levels, heads and samples per head and level.
    impl: :data:`MSDA_IMPLS` key of the sampling core, or "auto" (:func:`resolve_impl`).
  """
  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
    if self.impl not in IMPL_CHOICES:
      raise ValueError(f"unknown ms_deform_attn implementation {self.impl!r}; "
                       f"valid names: {list(IMPL_CHOICES)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    m, l, p = self.n_heads, self.n_levels, self.n_points
    self.sampling_offsets = dense(
        m * l * p * 2, name="sampling_offsets", axes=("embed", None),
        kernel_init=nn.initializers.zeros,
        bias_init=sampling_offsets_bias_init(m, l, p), **kw)
    self.attention_weights = dense(
        m * l * p, name="attention_weights", axes=("embed", None),
        kernel_init=nn.initializers.zeros, **kw)
    self.value_proj = dense(self.d_model, name="value_proj", axes=("embed", "mlp"),
                            kernel_init=nn.initializers.xavier_uniform(), **kw)
    self.output_proj = dense(self.d_model, name="output_proj", axes=("mlp", "embed"),
                             kernel_init=nn.initializers.xavier_uniform(), **kw)

  def project_value(self, input_flatten: Array,
                    input_padding_mask: Optional[Array] = None) -> Array:
    """(B, S, C) memory -> (B, S, n_heads, C / n_heads) values.

    ``input_padding_mask`` (B, S), True at padded positions, zeroes their values.
    """
    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
      value = jnp.where(input_padding_mask[..., None], jnp.zeros((), value.dtype), value)
    b, s, _ = value.shape
    return value.reshape(b, s, self.n_heads, self.d_model // self.n_heads)

  def _offsets_and_logits(self, query: Array) -> tuple[Array, Array]:
    """``sampling_offsets(query)`` and ``attention_weights(query)``, as one
    matrix product with the two layers' kernels side by side (one pass over
    the queries instead of two; the parameters stay those of two layers)."""
    if self.is_initializing():
      return self.sampling_offsets(query), self.attention_weights(query)
    p_off = nn.meta.unbox(self.sampling_offsets.variables["params"])
    p_aw = nn.meta.unbox(self.attention_weights.variables["params"])
    kernel = jnp.concatenate([p_off["kernel"], p_aw["kernel"]], 1).astype(self.dtype)
    bias = jnp.concatenate([p_off["bias"], p_aw["bias"]]).astype(self.dtype)
    y = jnp.dot(query.astype(self.dtype), kernel) + bias
    n_off = p_off["kernel"].shape[1]
    return y[..., :n_off], y[..., n_off:]

  def attend(self, query: Array, reference_points: Array, value: Array,
             spatial_shapes: SpatialShapes) -> Array:
    """Samples projected ``value`` around ``reference_points``.

    Args:
      query: (B, Lq, C).
      reference_points: (B, Lq, L, 2) normalised (x, y) points, offsets are in
        pixels of each level; or (B, Lq, L, 4) (cx, cy, w, h) boxes, offsets are
        in units of half the box size divided by ``n_points``.
      value: (B, S, n_heads, C / n_heads) from :meth:`project_value`.
      spatial_shapes: static ((H, W), ...) of the ``n_levels`` levels.

    Returns:
      (B, Lq, C).
    """
    shapes = _static_shapes(spatial_shapes)
    if len(shapes) != self.n_levels:
      raise ValueError(f"got {len(shapes)} spatial shapes for n_levels={self.n_levels}")
    b, lq, _ = query.shape
    m, l, p = self.n_heads, self.n_levels, self.n_points
    if reference_points.shape[-1] not in (2, 4):
      raise ValueError("reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), "
                       f"got shape {reference_points.shape}")
    offsets, logits = self._offsets_and_logits(query)
    offsets = offsets.reshape(b, lq, m, l, p, 2)
    logits = logits.reshape(b, lq, m, l * p)
    impl = resolve_impl(self.impl)
    if impl == "cpu_native":
      out = _attend_cpu_native(value, shapes, reference_points, offsets, logits)
      out = out.reshape(b, lq, m * value.shape[-1]).astype(value.dtype)
    else:
      loc, weights = sampling_inputs(reference_points, offsets, logits, shapes)
      out = ms_deform_attn(value, shapes, loc, weights, impl=impl)
    return self.output_proj(out.astype(self.dtype))

  def __call__(self, query: Array, reference_points: Array, input_flatten: Array,
               spatial_shapes: SpatialShapes,
               input_padding_mask: Optional[Array] = None) -> Array:
    """query (B, Lq, C), input_flatten (B, S, C) -> (B, Lq, C)."""
    value = self.project_value(input_flatten, input_padding_mask)
    return self.attend(query, reference_points, value, spatial_shapes)
