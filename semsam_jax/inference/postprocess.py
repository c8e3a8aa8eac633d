"""Mask post-processing with numpy/scipy (no OpenCV): small-region cleanup,
the interactive predictor's multi-mask selection, stability scores, box NMS and
COCO run-length encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str
                         ) -> tuple[np.ndarray, bool]:
  """Fills holes (``mode="holes"``) or removes islands (``"islands"``) smaller
  than ``area_thresh`` pixels, with 8-connectivity.

  Returns the new mask and whether anything changed.  When every island is
  below the threshold the largest one is kept (as SAM does).
  """
  if mode not in ("holes", "islands"):
    raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
  mask = np.asarray(mask, bool)
  holes = mode == "holes"
  work = ~mask if holes else mask
  labels, n = ndimage.label(work, structure=_EIGHT_CONNECTED)
  if n == 0:
    return mask, False
  sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  small = np.flatnonzero(sizes < area_thresh) + 1
  if small.size == 0:
    return mask, False
  if holes:
    return mask | np.isin(labels, small), True
  keep = np.setdiff1d(np.arange(1, n + 1), small)
  if keep.size == 0:
    keep = np.array([int(np.argmax(sizes)) + 1])
  return np.isin(labels, keep), True


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two bool masks (0 when both are empty)."""
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 0.0


@dataclass
class SelectedMask:
  mask: np.ndarray   # (H, W) bool, after hole filling and island removal
  iou: float         # predicted IoU
  area: int          # area before the cleanup (what the original sorts by)
  index: int         # position in the input (which granularity token)


def select_multi_masks(logits: np.ndarray, ious: np.ndarray, iou_thresh: float = 0.5,
                       dedup_thresh: float = 0.95, hole_area: int = 100,
                       island_area: int = 100) -> tuple[list[SelectedMask], list[SelectedMask]]:
  """The original interactive predictor's selection of one prompt's masks.

  Masks (``logits`` (T, H, W), ``ious`` (T,)) are visited by decreasing
  predicted IoU.  A mask is dropped when its IoU, rounded to two decimals as
  the original does, is under ``iou_thresh``, or when it overlaps an already
  kept mask with mask IoU above ``dedup_thresh`` -- except that the last mask
  is kept when nothing was kept before it (the original's rule).  Kept masks
  get holes under ``hole_area`` filled and islands under ``island_area``
  removed (8-connectivity).  Returns (kept masks in IoU order, the same sorted
  by area ascending, the area measured before the cleanup as the original
  does).
  """
  logits = np.asarray(logits)
  ious = np.asarray(ious, np.float64).reshape(-1)
  if logits.ndim != 3 or logits.shape[0] != ious.shape[0]:
    raise ValueError(f"expected logits (T, H, W) and T IoUs, got {logits.shape} and "
                     f"{ious.shape[0]} IoUs")
  order = np.argsort(-ious, kind="stable")
  kept: list[SelectedMask] = []
  raw: list[np.ndarray] = []
  for rank, i in enumerate(order):
    mask = logits[i] > 0
    drop = round(float(ious[i]), 2) < iou_thresh
    if not drop:
      drop = any(mask_iou(mask, m) > dedup_thresh for m in raw)
    if rank == len(order) - 1 and not raw:
      drop = False
    if drop:
      continue
    raw.append(mask)
    area = int(mask.sum())
    clean, _ = remove_small_regions(mask, hole_area, "holes")
    clean, _ = remove_small_regions(clean, island_area, "islands")
    kept.append(SelectedMask(clean, float(ious[i]), area, int(i)))
  by_area = [kept[j] for j in np.argsort([k.area for k in kept], kind="stable")]
  return kept, by_area


def stability_score(logits: np.ndarray, threshold: float = 0.0, offset: float = 1.0) -> np.ndarray:
  """IoU between the masks binarised at ``threshold + offset`` and ``threshold - offset``.

  ``logits`` (..., H, W) -> (...).  NaN where the looser mask is empty (the
  original divides 0 by 0), so such masks fail any stability threshold.
  """
  logits = np.asarray(logits)
  hi = (logits > threshold + offset).sum(axis=(-1, -2), dtype=np.int64)
  lo = (logits > threshold - offset).sum(axis=(-1, -2), dtype=np.int64)
  return stability_from_counts(hi, lo)


def stability_from_counts(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
  """``hi / lo`` as float64, NaN where ``lo`` is 0."""
  hi = np.asarray(hi, np.float64)
  lo = np.asarray(lo, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.nan)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
  """(N, H, W) bool -> (N, 4) XYXY boxes (inclusive max, as SAM); empty -> zeros."""
  masks = np.asarray(masks, bool)
  n = masks.shape[0]
  out = np.zeros((n, 4), np.float32)
  rows = masks.any(axis=2)
  cols = masks.any(axis=1)
  for i in range(n):
    ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
    if ys.size:
      out[i] = (xs[0], ys[0], xs[-1], ys[-1])
  return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N, 4) x (M, 4) XYXY boxes -> (N, M) IoU (0 where the union is empty)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
  """Greedy non-maximum suppression (torchvision semantics); kept indices by score."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  if order.size == 0:
    return order
  iou = box_iou(boxes, boxes)
  suppressed = np.zeros(len(boxes), bool)
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    suppressed |= iou[i] > iou_thresh
  return np.asarray(keep, np.int64)


def encode_rle(mask: np.ndarray, as_str: bool = True) -> dict:
  """COCO RLE of one (H, W) bool mask via pycocotools (``counts`` as str, or
  bytes with ``as_str=False``)."""
  from pycocotools import mask as mask_utils
  rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  if as_str:
    rle["counts"] = rle["counts"].decode("utf-8")
  return rle


def decode_rle(rle: dict) -> np.ndarray:
  """(H, W) bool mask of a COCO RLE (``counts`` as str or bytes)."""
  from pycocotools import mask as mask_utils
  r = dict(rle)
  if isinstance(r["counts"], str):
    r["counts"] = r["counts"].encode("utf-8")
  return mask_utils.decode(r).astype(bool)


def rle_area(rle: dict) -> int:
  """Pixel count of a COCO RLE."""
  from pycocotools import mask as mask_utils
  r = dict(rle)
  if isinstance(r["counts"], str):
    r["counts"] = r["counts"].encode("utf-8")
  return int(mask_utils.area(r))


def xyxy_to_xywh(box: Sequence[float]) -> list[float]:
  """``[x0, y0, x1, y1]`` -> ``[x0, y0, x1 - x0, y1 - y0]`` as floats."""
  x0, y0, x1, y1 = (float(v) for v in box)
  return [x0, y0, x1 - x0, y1 - y0]
