"""Box helpers with the reference's formulas (DETR ``box_ops``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cxcywh_to_xyxy(b: Array) -> Array:
  cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(b: Array) -> Array:
  x0, y0, x1, y1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def _area(b: Array) -> Array:
  return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def generalized_box_iou(a: Array, b: Array) -> Array:
  """Element-wise GIoU of broadcastable xyxy boxes ``a`` and ``b`` (..., 4),
  with the reference's 1e-6 guards in both denominators."""
  area_a, area_b = _area(a), _area(b)
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a + area_b - inter
  iou = inter / (union + 1e-6)
  lt = jnp.minimum(a[..., :2], b[..., :2])
  rb = jnp.maximum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  area = wh[..., 0] * wh[..., 1]
  return iou - (area - union) / (area + 1e-6)
