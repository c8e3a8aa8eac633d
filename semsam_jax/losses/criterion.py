"""The reference's many-to-many criterion (``SetCriterionOsPartWholeM2M``),
per decoder layer: mask BCE + dice on uncertainty-sampled points, the IoU-head
MSE against ``1 - dice`` (not detached), box L1 and GIoU.

Every function returns per-pair values (B, K, Tt) for the target slots; the
objective sums the valid ones and divides by the normaliser.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semsam_jax.losses import boxes as box_ops
from semsam_jax.losses import points as pts

Array = jax.Array

# Names of the per-layer terms, in the reference's loss-dict order.
TERMS = ("loss_mask_bce", "loss_mask_dice", "iou_score_loss", "loss_bbox", "loss_giou")


def sigmoid_bce(logits: Array, labels: Array) -> Array:
  """Element-wise ``binary_cross_entropy_with_logits``."""
  return (1.0 - labels) * logits - jax.nn.log_sigmoid(logits)


def dice_loss(logits: Array, labels: Array) -> Array:
  """(..., P) -> (...): ``1 - (2 sum(s t) + 1) / (sum s + sum t + 1)``, s = sigmoid."""
  s = jax.nn.sigmoid(logits)
  num = 2.0 * (s * labels).sum(-1)
  den = s.sum(-1) + labels.sum(-1)
  return 1.0 - (num + 1.0) / (den + 1.0)


def mask_terms(point_logits: Array, point_labels: Array, src_ious: Array | None,
               detach_iou_target: bool = False) -> dict:
  """BCE (mean over points), dice and IoU-score terms per pair.

  ``point_logits``/``point_labels`` (..., P); ``src_ious`` (...) or None.
  """
  x = point_logits.astype(jnp.float32)
  t = point_labels.astype(jnp.float32)
  out = {"loss_mask_bce": sigmoid_bce(x, t).mean(-1)}
  dice = dice_loss(x, t)
  out["loss_mask_dice"] = dice
  if src_ious is not None:
    target = 1.0 - dice
    if detach_iou_target:
      target = jax.lax.stop_gradient(target)
    out["iou_score_loss"] = (src_ious.astype(jnp.float32) - target) ** 2
  return out


def box_terms(src_boxes: Array, tgt_boxes: Array) -> dict:
  """L1 (summed over the 4 coordinates) and 1 - GIoU per pair, cxcywh."""
  s = src_boxes.astype(jnp.float32)
  t = tgt_boxes.astype(jnp.float32)
  giou = box_ops.generalized_box_iou(box_ops.cxcywh_to_xyxy(s), box_ops.cxcywh_to_xyxy(t))
  return {"loss_bbox": jnp.abs(s - t).sum(-1), "loss_giou": 1.0 - giou}


def layer_terms(layer: dict, token: Array, target_index: Array, target_boxes: Array,
                masks: Array, candidates, extra, cfg,
                point_sampler=None, seeds=None) -> dict:
  """All five terms of one decoder layer, per target slot.

  Args:
    layer: the decoder's outputs of the layer: ``pred_masks`` (B, K, T, h, w),
      ``pred_boxes`` (B, K, T, 4), ``pred_ious`` (B, K, T).
    token: (B, K, Tt) matched token of each target slot.
    target_index: (B, K, Tt) mask slot of each target; target_boxes (B, K, Tt, 4).
    masks: (B, M, H, W/8) bit-packed target masks.
    candidates, extra: the uniform draws of the point sampler
      ((B, K, Tt, C, 2), (B, K, Tt, E, 2)); None when ``seeds`` are given.
    point_sampler: optional replacement of :func:`semsam_jax.losses.points.
      uncertain_point_coords` with the same signature.
    seeds: instead of explicit draws, (B, K, Tt) uint32 seeds of hashed
      streams (:func:`semsam_jax.losses.points.hashed_uncertain_coords`; a
      ``point_sampler`` then gets the streams' candidates as arrays).

  Returns:
    ``{term: (B, K, Tt)}`` plus ``"point_coords"`` (B, K, Tt, P, 2),
    ``"point_logits"`` and ``"point_labels"`` (B, K, Tt, P).
  """
  impl = cfg.get("point_impl", "auto")
  pm = layer["pred_masks"]
  b, k, t = pm.shape[:3]
  maps = pm.reshape((b, k * t) + pm.shape[3:]).astype(jnp.float32)
  map_index = jnp.arange(k, dtype=jnp.int32)[None, :, None] * t + token

  def read(coords):
    return pts.sample_maps(maps, map_index, coords, impl=impl)

  if seeds is not None and point_sampler is None:
    coords = pts.hashed_uncertain_coords(maps, map_index, seeds, cfg.train_num_points,
                                         cfg.oversample_ratio, cfg.importance_sample_ratio,
                                         impl=impl)
  else:
    if seeds is not None:
      candidates, extra = pts.hashed_point_candidates(
          seeds, cfg.train_num_points, cfg.oversample_ratio, cfg.importance_sample_ratio)
    sampler = point_sampler or pts.uncertain_point_coords
    coords = sampler(read, candidates, extra, cfg.train_num_points,
                     cfg.importance_sample_ratio)
  logits = read(coords)
  labels = jax.lax.stop_gradient(pts.sample_packed_masks(masks, target_index, coords,
                                                         impl=impl))
  src_ious = None
  if cfg.iou_loss:
    src_ious = jnp.take_along_axis(layer["pred_ious"], token, axis=2)
  out = mask_terms(logits, labels, src_ious, cfg.detach_iou_target)
  src_boxes = jnp.take_along_axis(layer["pred_boxes"], token[..., None], axis=2)
  out.update(box_terms(src_boxes, target_boxes))
  out.update(point_coords=coords, point_logits=logits, point_labels=labels)
  return out
