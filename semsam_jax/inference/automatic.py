"""Automatic mask generation with controllable granularity.

A regular grid of clicks is decoded in fixed-size batches against one cached
image embedding; the masks of the chosen granularity levels are filtered by
predicted IoU and stability score, de-duplicated with box NMS, cleaned of small
regions and returned as SAM-style records.

Differences from the original generator (see docs/differences.md): the chosen
``levels`` are honoured for every batch, and only ``crop_n_layers=0`` (one
crop: the whole image, the only mode the original runs) is supported.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from semsam_jax.inference import postprocess as pp
from semsam_jax.inference.predictor import (SemanticSAMPredictor, to_rgb_uint8,
                                            user_levels_to_tokens, LEVEL_TO_TOKEN)

TOKEN_TO_LEVEL = {t: l for l, t in LEVEL_TO_TOKEN.items()}


def point_grid(points_per_side: int) -> np.ndarray:
  """(n*n, 2) relative x, y at the centres of an n x n grid of cells."""
  if points_per_side < 1:
    raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
  offset = 1.0 / (2 * points_per_side)
  side = np.linspace(offset, 1 - offset, points_per_side)
  xs, ys = np.meshgrid(side, side)
  return np.stack([xs.ravel(), ys.ravel()], axis=-1)


class SemanticSAMAutomaticMaskGenerator:
  """Segments a whole image at the chosen granularity levels (1 = finest .. 6).

  Args:
    predictor: a :class:`SemanticSAMPredictor` (its model and buckets are used).
    points_per_side: grid density (``points_per_side ** 2`` clicks).
    points_per_batch: clicks per decoder call; every call has this static size
      (the last batch is padded with masked-out prompts).  All clicks of one
      batch attend to each other, as in the original.
    pred_iou_thresh, stability_score_thresh, stability_score_offset: filters.
    box_nms_thresh: IoU threshold of the box NMS between masks.
    min_mask_region_area: holes/islands smaller than this are removed (0: off).
    levels: user granularity levels 1..6 (mapped to decoder tokens 1->3, 2->2,
      3->0, 4->4, 5->1, 6->5).
    output_mode: ``"binary_mask"`` or ``"coco_rle"``.
    crop_n_layers: only 0 is supported.
    progress: show a progress bar over the batches.
  """

  def __init__(self, predictor: SemanticSAMPredictor, points_per_side: int = 32,
               points_per_batch: int = 200, pred_iou_thresh: float = 0.88,
               stability_score_thresh: float = 0.92, stability_score_offset: float = 1.0,
               box_nms_thresh: float = 0.7, min_mask_region_area: int = 10,
               levels: Sequence[int] = (1, 2, 3, 4, 5, 6), output_mode: str = "binary_mask",
               crop_n_layers: int = 0, progress: bool = True):
    if output_mode not in ("binary_mask", "coco_rle"):
      raise ValueError(f"output_mode must be 'binary_mask' or 'coco_rle', got {output_mode!r}")
    if crop_n_layers != 0:
      raise NotImplementedError("crop_n_layers > 0 is not implemented (the original runs "
                                "one crop only)")
    if points_per_batch < 1:
      raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
    self.predictor = predictor
    self.points = point_grid(points_per_side)
    self.points_per_batch = int(points_per_batch)
    self.pred_iou_thresh = pred_iou_thresh
    self.stability_score_thresh = stability_score_thresh
    self.stability_score_offset = stability_score_offset
    self.box_nms_thresh = box_nms_thresh
    self.min_mask_region_area = min_mask_region_area
    self.levels = tuple(int(l) for l in levels)
    self.tokens = user_levels_to_tokens(self.levels)
    self.output_mode = output_mode
    self.progress = progress

  def _decode_batch(self, points: np.ndarray):
    """(n, L, H, W) logits and (n, L) IoUs of one batch, padded to the static size."""
    n = len(points)
    padded = np.full((self.points_per_batch, 2), 0.5, np.float32)
    padded[:n] = points
    # Pad to exactly points_per_batch; the predictor masks the padding out.
    logits, ious, _ = self.predictor.decode_relative_points(padded, self.tokens, valid_count=n)
    h, w = self.predictor.image_size
    return np.asarray(logits[:n, :, :h, :w]), np.asarray(ious[:n])

  def generate(self, image) -> list[dict[str, Any]]:
    """Masks of ``image`` as a list of records (see the class docstring)."""
    image = to_rgb_uint8(image)
    h, w = image.shape[:2]
    self.predictor.set_image(image)
    masks, ious, stab, points, tokens = [], [], [], [], []
    starts = range(0, len(self.points), self.points_per_batch)
    for s in tqdm(starts, desc="mask generation", disable=not self.progress, unit="batch"):
      batch = self.points[s:s + self.points_per_batch]
      logits, iou = self._decode_batch(batch)
      n, l = iou.shape
      logits = logits.reshape(n * l, h, w)
      iou = iou.reshape(-1)
      keep = iou > self.pred_iou_thresh
      score = pp.stability_score(logits[keep], 0.0, self.stability_score_offset)
      keep_idx = np.flatnonzero(keep)[score >= self.stability_score_thresh]
      score = score[score >= self.stability_score_thresh]
      masks.append(logits[keep_idx] > 0)
      ious.append(iou[keep_idx])
      stab.append(score)
      points.append(np.repeat(batch, l, axis=0)[keep_idx])
      tokens.append(np.tile(np.asarray(self.tokens), n)[keep_idx])
    masks = np.concatenate(masks) if masks else np.zeros((0, h, w), bool)
    ious, stab = np.concatenate(ious), np.concatenate(stab)
    points, tokens = np.concatenate(points), np.concatenate(tokens)

    boxes = pp.masks_to_boxes(masks)
    keep = pp.nms(boxes, ious, self.box_nms_thresh)
    masks, ious, stab, points, tokens, boxes = (
        masks[keep], ious[keep], stab[keep], points[keep], tokens[keep], boxes[keep])

    if self.min_mask_region_area > 0 and len(masks):
      masks, boxes, keep = self._remove_small_regions(masks)
      ious, stab, points, tokens = ious[keep], stab[keep], points[keep], tokens[keep]

    records = []
    for i in range(len(masks)):
      seg = pp.encode_rle(masks[i]) if self.output_mode == "coco_rle" else masks[i]
      records.append({
          "segmentation": seg,
          "area": int(masks[i].sum()),
          "bbox": pp.xyxy_to_xywh(boxes[i]),
          "predicted_iou": float(ious[i]),
          "point_coords": [[float(points[i][0] * w), float(points[i][1] * h)]],
          "stability_score": float(stab[i]),
          "crop_box": [0.0, 0.0, float(w), float(h)],
          "level": TOKEN_TO_LEVEL[int(tokens[i])],
      })
    return records

  def _remove_small_regions(self, masks: np.ndarray):
    """SAM's cleanup: fill holes, drop islands, then NMS preferring unchanged masks."""
    new_masks, scores = [], []
    for m in masks:
      m, changed_h = pp.remove_small_regions(m, self.min_mask_region_area, "holes")
      m, changed_i = pp.remove_small_regions(m, self.min_mask_region_area, "islands")
      new_masks.append(m)
      scores.append(0.0 if (changed_h or changed_i) else 1.0)
    new_masks = np.stack(new_masks)
    boxes = pp.masks_to_boxes(new_masks)
    keep = pp.nms(boxes, np.asarray(scores), self.box_nms_thresh)
    keep = np.sort(keep)
    return new_masks[keep], boxes[keep], keep
