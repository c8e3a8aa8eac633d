"""Automatic mask generation with controllable granularity.

A regular grid of clicks is decoded in fixed-size batches against one cached
image embedding.  The masks of the chosen granularity levels are filtered by
predicted IoU and stability score, de-duplicated with box NMS, cleaned of
small holes and islands (then NMS again) and returned as SAM-style records.

Device/host split (static shapes, bounded memory): per batch one jitted call
decodes all ``points_per_batch`` slots (the last batch is padded with hidden
prompts), a second one computes the stability counts of every mask at full
resolution without keeping the upsampled logits around, and only the masks
that pass both filters are upsampled again and brought to the host, in chunks
of fixed size.  The results equal thresholding the fully upsampled logits as
the original does.

Differences from the original Semantic-SAM generator are listed in
docs/differences.md (``point_coords`` in pixels, crop layers supported, a
``level`` field in every record).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from semsam_jax.inference import postprocess as pp
from semsam_jax.kernels import mask_stats, native
from semsam_jax.models.layers import linear_upsample, linear_upsample_phases
from semsam_jax.inference.predictor import (LEVEL_TO_TOKEN, TOKEN_TO_LEVEL, SemanticSAMPredictor,
                                            resolve_tokens, to_rgb_uint8)

__all__ = ["SemanticSAMAutomaticMaskGenerator", "point_grid", "crop_boxes", "TOKEN_TO_LEVEL",
           "LEVEL_TO_TOKEN"]

# Masks brought to the host per transfer (static, so one compilation).
_TRANSFER_CHUNK = 16
# Prompts upsampled at once while computing stability counts.
_STATS_CHUNK = 8


def point_grid(points_per_side: int) -> np.ndarray:
  """(n*n, 2) relative ``x, y`` at the centres of an n x n grid of cells, row-major."""
  if points_per_side < 1:
    raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
  offset = 1.0 / (2 * points_per_side)
  side = np.linspace(offset, 1 - offset, points_per_side)
  xs, ys = np.meshgrid(side, side)
  return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def crop_boxes(image_hw: tuple[int, int], n_layers: int, overlap_ratio: float
               ) -> tuple[list[list[int]], list[int]]:
  """SAM's crop pyramid: the whole image, then (2**(i+1))**2 overlapping crops
  for layer i+1.  Returns XYXY crop boxes and their layer indices."""
  im_h, im_w = image_hw
  boxes, layers = [[0, 0, im_w, im_h]], [0]
  short = min(im_h, im_w)
  for layer in range(n_layers):
    per_side = 2 ** (layer + 1)
    overlap = int(overlap_ratio * short * (2 / per_side))
    crop_w = int(math.ceil((overlap * (per_side - 1) + im_w) / per_side))
    crop_h = int(math.ceil((overlap * (per_side - 1) + im_h) / per_side))
    x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
    y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
    for x0, y0 in itertools.product(x0s, y0s):
      boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
      layers.append(layer + 1)
  return boxes, layers


def _near_crop_edge(boxes: np.ndarray, crop_box: Sequence[int], image_box: Sequence[int],
                    atol: float = 20.0) -> np.ndarray:
  """Boxes (crop frame XYXY) touching a crop edge that is not an image edge."""
  x0, y0 = crop_box[:2]
  b = np.asarray(boxes, np.float64) + [x0, y0, x0, y0]
  near_crop = np.abs(b - np.asarray(crop_box, np.float64)) <= atol
  near_image = np.abs(b - np.asarray(image_box, np.float64)) <= atol
  return np.any(near_crop & ~near_image, axis=1)


def _upsample_factor(lowres_hw: tuple[int, int], padded_hw: tuple[int, int]) -> int | None:
  """The common integer upsampling factor of both axes, if there is one."""
  (h, w), (hp, wp) = lowres_hw, padded_hw
  if hp % h or wp % w or hp // h != wp // w:
    return None
  return hp // h


def upsample_bilinear(x, padded_hw: tuple[int, int]):
  """(..., h, w) -> (..., Hp, Wp) bilinear (align_corners=False, no antialias).

  For an integer factor (the decoder's masks are a quarter of the padded
  canvas) :func:`~semsam_jax.models.layers.linear_upsample` on both axes, in
  float32; otherwise ``jax.image.resize``.  Equal to ``jax.image.resize(..., "linear")`` up to
  float rounding.
  """
  f = _upsample_factor(x.shape[-2:], padded_hw)
  if f is None:
    return jax.image.resize(x, x.shape[:-2] + tuple(padded_hw), method="linear",
                            antialias=False)
  x = x.astype(jnp.float32)
  return linear_upsample(linear_upsample(x, f, x.ndim - 2), f, x.ndim - 1)


def threshold_counts_xla(lowres, image_hw, thresholds, padded_hw: tuple[int, int]):
  """(N, h, w) logits -> (N, K) int32 counts of upsampled logits > thresholds[k]
  inside the (H, W) = ``image_hw`` region of the ``padded_hw`` canvas.

  Pure XLA.  With an integer upsampling factor f the f * f phase images of
  the upsampled logits are thresholded and counted one by one, so the
  full-resolution logits are never materialised.
  """
  hp, wp = padded_hw
  h, w = lowres.shape[-2:]
  f = _upsample_factor((h, w), padded_hw)
  thresholds = jnp.asarray(thresholds, jnp.float32)

  def count(val, inside):  # (n, a, b) values, (a, b) mask -> (n, K)
    hit = (val[..., None] > thresholds) & inside[..., None]
    return jnp.sum(hit, axis=(1, 2), dtype=jnp.int32)

  if f is None:
    inside = (jnp.arange(hp)[:, None] < image_hw[0]) & (jnp.arange(wp)[None, :] < image_hw[1])
    return count(upsample_bilinear(lowres, padded_hw), inside)
  iy = jnp.arange(h)[:, None] * f
  ix = jnp.arange(w)[None, :] * f
  total = jnp.zeros((lowres.shape[0], thresholds.shape[0]), jnp.int32)
  for ry, rows in enumerate(linear_upsample_phases(lowres.astype(jnp.float32), f, 1)):
    for rx, val in enumerate(linear_upsample_phases(rows, f, 2)):
      total = total + count(val, (iy + ry < image_hw[0]) & (ix + rx < image_hw[1]))
  return total


@functools.partial(jax.jit, static_argnames=("padded_hw",))
def _stability_counts(lowres, image_hw, offset, padded_hw: tuple[int, int]):
  """(S, L, h, w) low-res logits -> (S, L) counts of upsampled logits > +offset
  and > -offset inside the (H, W) image region.

  On CPU the native kernel (:mod:`semsam_jax.kernels.mask_stats`) counts
  without upsampling to memory; elsewhere :func:`threshold_counts_xla`, over
  chunks of masks.
  """
  s, l, h, w = lowres.shape
  flat = lowres.reshape(s * l, h, w)
  thresholds = jnp.stack([offset, -offset]).astype(jnp.float32)
  factor = _upsample_factor((h, w), padded_hw)
  if factor is not None and native.usable_here():
    counts = mask_stats.mask_threshold_counts(flat, image_hw, thresholds, factor)
  else:
    counts = jax.lax.map(lambda x: threshold_counts_xla(x, image_hw, thresholds, padded_hw),
                         flat.reshape(s, l, h, w), batch_size=_STATS_CHUNK).reshape(s * l, 2)
  counts = counts.reshape(s, l, 2)
  return counts[..., 0], counts[..., 1]


@functools.partial(jax.jit, static_argnames=("padded_hw",))
def _binary_masks(lowres, index, padded_hw: tuple[int, int]):
  """Upsampled ``logits > 0`` of the masks ``index`` (K,) of (S, L, h, w) logits,
  flattened prompt-major: (K, Hp, Wp) bool."""
  flat = lowres.reshape((-1,) + lowres.shape[2:])
  x = jnp.take(flat, index, axis=0)
  return upsample_bilinear(x, padded_hw) > 0


class SemanticSAMAutomaticMaskGenerator:
  """Segments a whole image at the chosen granularity levels (1 = finest .. 6).

  Args:
    predictor: a :class:`SemanticSAMPredictor` (its model, buckets and
      ``independent_prompts`` setting are used; its current image is replaced).
    points_per_side: grid density (``points_per_side ** 2`` clicks on the
      whole image); exclusive with ``point_grids``.
    points_per_batch: clicks per decoder call.  Every call has this static size
      (the last batch is padded with hidden prompts).  All clicks of one batch
      attend to each other, as in the original (unless the predictor was made
      with ``independent_prompts=True``).
    pred_iou_thresh: keep masks with predicted IoU above this.
    stability_score_thresh, stability_score_offset: keep masks whose stability
      score (IoU of the masks thresholded at +offset and -offset) is at least
      this.
    box_nms_thresh: IoU threshold of the box NMS between masks of one crop.
    crop_n_layers: extra crop layers as in SAM (layer i has (2**i)**2 crops,
      each embedded separately); 0 (default) runs on the whole image only, the
      only mode the original Semantic-SAM generator supports.
    crop_nms_thresh: box NMS threshold between masks of different crops.
    crop_overlap_ratio: overlap of the crops of the first crop layer.
    crop_n_points_downscale_factor: points per side of layer i are divided by
      this to the power i.
    point_grids: explicit relative ``x, y`` grids, one per crop layer.
    min_mask_region_area: holes/islands smaller than this are removed, then
      NMS runs again preferring untouched masks (0: off).
    output_mode: ``"binary_mask"`` (H, W) bool or ``"coco_rle"`` (pycocotools
      RLE with ``counts`` as str).
    levels: user granularity levels 1..6 (mapped to decoder tokens 1->3,
      2->2, 3->0, 4->4, 5->1, 6->5); honoured for every batch.
    progress: show a progress bar over the batches.
    tokens: instead of ``levels``, decoder tokens 0..5 (as
      ``SemanticSAMPredictor.predict(tokens=...)``).

  After ``generate`` the predictor holds the embedding of the whole image
  (crops are embedded first, the whole image last), so a following
  ``predictor.predict`` decodes against the image just segmented.

  ``generate(image)`` returns one record per mask: ``segmentation``, ``area``,
  ``bbox`` (XYWH), ``predicted_iou``, ``point_coords`` ([[x, y]] in pixels),
  ``stability_score``, ``crop_box`` (XYWH) and ``level`` (1..6).
  """

  def __init__(self, predictor: SemanticSAMPredictor, points_per_side: int | None = 32,
               points_per_batch: int = 200, pred_iou_thresh: float = 0.88,
               stability_score_thresh: float = 0.92, stability_score_offset: float = 1.0,
               box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
               crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
               crop_n_points_downscale_factor: int = 1,
               point_grids: Sequence[np.ndarray] | None = None,
               min_mask_region_area: int = 10, output_mode: str = "binary_mask",
               levels: Sequence[int] | None = (1, 2, 3, 4, 5, 6), progress: bool = True,
               *, tokens: Sequence[int] | None = None):
    if not (hasattr(predictor, "decode_points") and hasattr(predictor, "set_image")):
      raise TypeError("predictor must be a SemanticSAMPredictor (use "
                      "SemanticSAMAutomaticMaskGenerator.from_checkpoint/from_torch to "
                      f"build one), got {type(predictor).__name__}")
    if output_mode not in ("binary_mask", "coco_rle"):
      raise ValueError(f"output_mode must be 'binary_mask' or 'coco_rle', got {output_mode!r}")
    if (points_per_side is None) == (point_grids is None):
      raise ValueError("give exactly one of points_per_side and point_grids")
    if crop_n_layers < 0:
      raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
    if points_per_batch < 1:
      raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
    if crop_n_points_downscale_factor < 1:
      raise ValueError("crop_n_points_downscale_factor must be >= 1")
    if point_grids is None:
      self.point_grids = [point_grid(int(points_per_side / crop_n_points_downscale_factor ** i))
                          for i in range(crop_n_layers + 1)]
    else:
      self.point_grids = [np.asarray(g, np.float64).reshape(-1, 2) for g in point_grids]
      if len(self.point_grids) != crop_n_layers + 1:
        raise ValueError(f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), "
                         f"got {len(self.point_grids)}")
      for g in self.point_grids:
        if len(g) == 0 or (g < 0).any() or (g > 1).any():
          raise ValueError("point_grids must hold relative x, y in [0, 1]")
    self.predictor = predictor
    self.points_per_batch = int(points_per_batch)
    self.pred_iou_thresh = float(pred_iou_thresh)
    self.stability_score_thresh = float(stability_score_thresh)
    self.stability_score_offset = float(stability_score_offset)
    self.box_nms_thresh = float(box_nms_thresh)
    self.crop_n_layers = int(crop_n_layers)
    self.crop_nms_thresh = float(crop_nms_thresh)
    self.crop_overlap_ratio = float(crop_overlap_ratio)
    self.min_mask_region_area = int(min_mask_region_area)
    if tokens is not None and levels == (1, 2, 3, 4, 5, 6):
      levels = None  # the default gives way to explicit tokens
    self.tokens = resolve_tokens(levels, tokens)
    self.levels = tuple(TOKEN_TO_LEVEL[t] for t in self.tokens)
    self.output_mode = output_mode
    self.progress = progress
    try:  # masks are kept as COCO RLE between the steps
      import pycocotools.mask  # noqa: F401
    except ImportError as e:
      raise ImportError("the automatic mask generator needs pycocotools "
                        "(pip install pycocotools)") from e

  @classmethod
  def from_checkpoint(cls, directory, predictor_kwargs: dict | None = None,
                      **kwargs) -> "SemanticSAMAutomaticMaskGenerator":
    """A generator on a predictor loaded from an orbax checkpoint directory."""
    return cls(SemanticSAMPredictor.from_checkpoint(directory, **(predictor_kwargs or {})),
               **kwargs)

  @classmethod
  def from_torch(cls, torch_checkpoint, reference_config, predictor_kwargs: dict | None = None,
                 **kwargs) -> "SemanticSAMAutomaticMaskGenerator":
    """A generator on a predictor converted from an original ``.pth`` + YAML."""
    return cls(SemanticSAMPredictor.from_torch(torch_checkpoint, reference_config,
                                               **(predictor_kwargs or {})), **kwargs)

  # ------------------------------------------------------------------ batches

  def _process_batch(self, points: np.ndarray, crop_box: list[int], image_hw: tuple[int, int]
                     ) -> dict[str, list]:
    """Decodes one batch of relative clicks of the current (crop) image and
    returns the masks that pass the IoU, stability and crop-edge filters."""
    n = len(points)
    slots = self.points_per_batch
    padded = np.full((slots, 2), 0.5, np.float64)
    padded[:n] = points
    lowres, ious = self.predictor.decode_points(padded, self.tokens, valid_count=n, slots=slots)
    ch, cw = self.predictor.image_size
    hp, wp = self.predictor.padded_image_size
    hi, lo = _stability_counts(lowres, np.asarray([ch, cw], np.int32),
                               np.float32(self.stability_score_offset), padded_hw=(hp, wp))
    num_l = len(self.tokens)
    ious = np.asarray(ious)[:n].reshape(-1)
    stab = pp.stability_from_counts(np.asarray(hi)[:n].reshape(-1), np.asarray(lo)[:n].reshape(-1))
    # The original's order: IoU filter, then stability filter.
    keep = np.flatnonzero(ious > self.pred_iou_thresh)
    keep = keep[stab[keep] >= self.stability_score_thresh]

    out: dict[str, list] = {k: [] for k in ("rles", "boxes", "ious", "stab", "points", "tokens")}
    x0, y0 = crop_box[:2]
    full_h, full_w = image_hw
    for s in range(0, len(keep), _TRANSFER_CHUNK):
      idx = keep[s:s + _TRANSFER_CHUNK]
      index = np.zeros((_TRANSFER_CHUNK,), np.int32)
      index[:len(idx)] = idx
      masks = np.asarray(_binary_masks(lowres, index, padded_hw=(hp, wp)))[:len(idx), :ch, :cw]
      boxes = pp.masks_to_boxes(masks)
      ok = ~_near_crop_edge(boxes, crop_box, [0, 0, full_w, full_h])
      for j in np.flatnonzero(ok):
        i = int(idx[j])
        if (ch, cw) == (full_h, full_w):
          full = masks[j]
        else:
          full = np.zeros((full_h, full_w), bool)
          full[y0:y0 + ch, x0:x0 + cw] = masks[j]
        out["rles"].append(pp.encode_rle(full, as_str=False))
        out["boxes"].append(boxes[j] + [x0, y0, x0, y0])
        out["ious"].append(float(ious[i]))
        out["stab"].append(float(stab[i]))
        px, py = points[i // num_l]
        out["points"].append([float(px * cw + x0), float(py * ch + y0)])
        out["tokens"].append(self.tokens[i % num_l])
    return out

  def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int,
                    bar: tqdm) -> dict[str, list]:
    x0, y0, x1, y1 = crop_box
    crop = image[y0:y1, x0:x1]
    self.predictor.set_image(crop)
    grid = self.point_grids[layer]
    data: dict[str, list] = {k: [] for k in ("rles", "boxes", "ious", "stab", "points", "tokens")}
    for s in range(0, len(grid), self.points_per_batch):
      batch = self._process_batch(grid[s:s + self.points_per_batch], crop_box, image.shape[:2])
      for k in data:
        data[k] += batch[k]
      bar.update(1)
    # NMS within the crop, by predicted IoU (kept in decreasing score order).
    keep = pp.nms(np.asarray(data["boxes"]).reshape(-1, 4), np.asarray(data["ious"]),
                  self.box_nms_thresh)
    data = {k: [v[i] for i in keep] for k, v in data.items()}
    data["crop_box"] = [list(crop_box)] * len(keep)
    return data

  # ------------------------------------------------------------------ main

  def generate(self, image) -> list[dict[str, Any]]:
    """Masks of ``image`` (uint8 RGB / grayscale / RGBA) as a list of records."""
    image = to_rgb_uint8(image)
    h, w = image.shape[:2]
    boxes, layers = crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
    total = sum(-(-len(self.point_grids[l]) // self.points_per_batch) for l in layers)
    data: dict[str, list] = {}
    per_crop: list[dict | None] = [None] * len(boxes)
    # The crops first and the whole image (crop 0) last, so the predictor is
    # left on the whole image; the results are gathered in the crop order.
    order = list(range(1, len(boxes))) + [0]
    try:
      with tqdm(total=total, desc="mask generation", unit="batch",
                disable=not self.progress) as bar:
        for i in order:
          per_crop[i] = self._process_crop(image, boxes[i], layers[i], bar)
    except BaseException:
      if hasattr(self.predictor, "reset_image"):  # never leave a crop's embedding behind
        self.predictor.reset_image()
      raise
    for crop_data in per_crop:
      for k, v in crop_data.items():
        data.setdefault(k, []).extend(v)
    if len(boxes) > 1 and data["rles"]:
      # Between crops prefer masks from smaller crops.
      areas = np.asarray([(b[2] - b[0]) * (b[3] - b[1]) for b in data["crop_box"]], np.float64)
      keep = pp.nms(np.asarray(data["boxes"]), 1.0 / areas, self.crop_nms_thresh)
      data = {k: [v[i] for i in keep] for k, v in data.items()}

    if self.min_mask_region_area > 0 and data["rles"]:
      data = self._postprocess_small_regions(data)

    records = []
    for i, rle in enumerate(data["rles"]):
      if self.output_mode == "coco_rle":
        seg = dict(rle, counts=rle["counts"].decode("utf-8"))
      else:
        seg = pp.decode_rle(rle)
      cb = data["crop_box"][i]
      records.append({
          "segmentation": seg,
          "area": pp.rle_area(rle),
          "bbox": pp.xyxy_to_xywh(data["boxes"][i]),
          "predicted_iou": data["ious"][i],
          "point_coords": [data["points"][i]],
          "stability_score": data["stab"][i],
          "crop_box": [float(cb[0]), float(cb[1]), float(cb[2] - cb[0]), float(cb[3] - cb[1])],
          "level": TOKEN_TO_LEVEL[int(data["tokens"][i])],
      })
    return records

  def _postprocess_small_regions(self, data: dict[str, list]) -> dict[str, list]:
    """SAM's cleanup: fill small holes, drop small islands, then NMS preferring
    masks that did not change (order: unchanged first, each group in the order
    before)."""
    masks, scores = [], []
    for rle in data["rles"]:
      m = pp.decode_rle(rle)
      m, changed_h = pp.remove_small_regions(m, self.min_mask_region_area, "holes")
      m, changed_i = pp.remove_small_regions(m, self.min_mask_region_area, "islands")
      masks.append(m)
      scores.append(0.0 if (changed_h or changed_i) else 1.0)
    boxes = pp.masks_to_boxes(np.stack(masks))
    keep = pp.nms(boxes, np.asarray(scores), max(self.box_nms_thresh, self.crop_nms_thresh))
    out = {k: [v[i] for i in keep] for k, v in data.items()}
    for j, i in enumerate(keep):
      if scores[i] == 0.0:
        out["rles"][j] = pp.encode_rle(masks[i], as_str=False)
        out["boxes"][j] = boxes[i]
    return out
