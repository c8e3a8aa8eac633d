"""IoU and the original evaluator's aggregation.

``JointBoxPointInteractiveEvaluator`` (``datasets/evaluation/
interactive_evaluation.py`` of the original) receives one IoU per instance
(one click, ``iou_iter = 1``) and reports, over *all instances of all
images* (no per-image averaging):

* ``noc@t`` for t in 0.5, 0.8, 0.85, 0.9: the mean of 1 (IoU >= t after the
  first click) or ``max_clicks`` = 20 otherwise;
* ``miou@iter1``: the mean IoU.

This runs once with the Max selection (the token with the highest predicted
IoU) and once with the Oracle (best of the tokens).  The same numbers are also
given per COCO area range (``small`` area <= 32^2, ``medium`` 32^2..96^2,
``large`` >= 96^2, bounds inclusive as in ``COCOeval``).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

NOC_THRESHOLDS = (0.5, 0.8, 0.85, 0.9)
MAX_CLICKS = 20
AREA_RANGES = {"small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2),
               "large": (96.0 ** 2, 1e10)}


def mask_iou(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """IoU of bool masks (..., H, W) -> (...) float32, |gt & pred| / |gt | pred|
  (the original's ``get_iou``; NaN when both are empty, as there)."""
  gt = np.asarray(gt, bool)
  pred = np.asarray(pred, bool)
  inter = np.logical_and(gt, pred).sum((-2, -1))
  union = np.logical_or(gt, pred).sum((-2, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return (inter.astype(np.float32) / union.astype(np.float32)).astype(np.float32)


def select_max_oracle(ious: np.ndarray, pred_ious: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, T) IoUs of every token and (N, T) predicted IoUs -> (Max, Oracle) IoUs (N,).

  Max takes the token with the highest predicted IoU (the first on ties, as
  ``torch.max``); Oracle the best IoU of all tokens.
  """
  ious = np.asarray(ious, np.float32)
  token = np.argmax(np.asarray(pred_ious), axis=-1)
  return np.take_along_axis(ious, token[..., None], -1)[..., 0], ious.max(-1)


def noc(ious: np.ndarray, threshold: float, max_clicks: int = MAX_CLICKS) -> np.ndarray:
  """Clicks needed per instance with one click: 1 if IoU >= threshold else
  ``max_clicks`` (the comparison in float32, as the original's tensors)."""
  ious = np.asarray(ious, np.float32)
  return np.where(ious >= np.float32(threshold), 1, max_clicks)


def summarize(ious: np.ndarray, max_clicks: int = MAX_CLICKS) -> dict[str, float]:
  """The evaluator's numbers for one selection: ``noc@t`` and ``miou@iter1``."""
  ious = np.asarray(ious, np.float32).ravel()
  out = {}
  if ious.size == 0:
    for t in NOC_THRESHOLDS:
      out[f"noc@{t}"] = math.nan
    out["miou@iter1"] = math.nan
    return out
  for t in NOC_THRESHOLDS:
    out[f"noc@{t}"] = float(noc(ious, t, max_clicks).sum()) / ious.size
  # The original sums the float32 IoUs in float32, then divides in Python.
  out["miou@iter1"] = float(np.sum(ious, dtype=np.float32)) / ious.size
  return out


def area_range_of(area: float) -> list[str]:
  return [name for name, (lo, hi) in AREA_RANGES.items() if lo <= area <= hi]


class InteractiveAccumulator:
  """Collects per-instance Max / Oracle IoUs and reports the COCO metrics."""

  def __init__(self, max_clicks: int = MAX_CLICKS):
    self.max_clicks = max_clicks
    self.iou_max: list[float] = []
    self.iou_oracle: list[float] = []
    self.areas: list[float] = []
    self.records: list[dict] = []

  def add(self, image_id, ann_ids: Iterable, iou_max, iou_oracle, areas, clicks=None) -> None:
    iou_max = np.asarray(iou_max, np.float32).ravel()
    iou_oracle = np.asarray(iou_oracle, np.float32).ravel()
    areas = np.asarray(areas, np.float64).ravel()
    self.iou_max.extend(iou_max.tolist())
    self.iou_oracle.extend(iou_oracle.tolist())
    self.areas.extend(areas.tolist())
    for i, ann in enumerate(ann_ids):
      rec = {"image_id": str(image_id), "ann_id": str(ann), "iou_max": float(iou_max[i]),
             "iou_oracle": float(iou_oracle[i]), "area": float(areas[i])}
      if clicks is not None:
        rec["click_xy"] = [int(v) for v in clicks[i]]
      self.records.append(rec)

  @property
  def count(self) -> int:
    return len(self.iou_max)

  def running(self) -> dict[str, float]:
    if not self.iou_max:
      return {}
    return {"miou_max": float(np.mean(self.iou_max)), "miou_oracle": float(np.mean(self.iou_oracle))}

  def metrics(self, prefix: str = "coco_interactive") -> dict[str, float]:
    iou_max = np.asarray(self.iou_max, np.float32)
    iou_oracle = np.asarray(self.iou_oracle, np.float32)
    areas = np.asarray(self.areas, np.float64)
    out: dict[str, float] = {}

    def put(scope: str, sel):
      for name, vals in (("max", iou_max[sel]), ("oracle", iou_oracle[sel])):
        s = summarize(vals, self.max_clicks)
        out[f"{scope}.miou_{name}"] = s["miou@iter1"]
        for t in NOC_THRESHOLDS:
          out[f"{scope}.noc@{t}_{name}"] = s[f"noc@{t}"]
      out[f"{scope}.num_instances"] = int(np.count_nonzero(sel))

    put(prefix, np.ones(iou_max.shape, bool))
    for rng, (lo, hi) in AREA_RANGES.items():
      put(f"{prefix}.{rng}", (areas >= lo) & (areas <= hi))
    return out


class GranularityAccumulator:
  """Collects the IoUs of matched (click, level target) pairs."""

  def __init__(self):
    self.ious: list[float] = []
    self.areas: list[float] = []
    self.num_clicks = 0

  def add(self, ious, areas, num_clicks: int) -> None:
    self.ious.extend(np.asarray(ious, np.float32).ravel().tolist())
    self.areas.extend(np.asarray(areas, np.float64).ravel().tolist())
    self.num_clicks += int(num_clicks)

  @property
  def count(self) -> int:
    return len(self.ious)

  def running(self) -> dict[str, float]:
    return {"miou": float(np.mean(self.ious))} if self.ious else {}

  def metrics(self, prefix: str = "multi_granularity") -> dict[str, float]:
    ious = np.asarray(self.ious, np.float32)
    areas = np.asarray(self.areas, np.float64)

    def mean(v):
      return float(np.sum(v, dtype=np.float32)) / v.size if v.size else math.nan

    out = {f"{prefix}.miou": mean(ious), f"{prefix}.num_pairs": int(ious.size),
           f"{prefix}.num_clicks": int(self.num_clicks)}
    for rng, (lo, hi) in AREA_RANGES.items():
      sel = (areas >= lo) & (areas <= hi)
      out[f"{prefix}.{rng}.miou"] = mean(ious[sel])
      out[f"{prefix}.{rng}.num_pairs"] = int(np.count_nonzero(sel))
    return out
