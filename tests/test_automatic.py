"""Automatic mask generation on planted decoder outputs (known right answer)."""

from __future__ import annotations

import numpy as np
import pytest

from semsam_jax.inference import postprocess as pp
from semsam_jax.inference.automatic import SemanticSAMAutomaticMaskGenerator, point_grid

H = W = 40


def _square(y0, x0, y1, x1, inside=5.0, outside=-5.0):
  m = np.full((H, W), outside, np.float32)
  m[y0:y1, x0:x1] = inside
  return m


class PlantedPredictor:
  """Stands in for SemanticSAMPredictor: returns fixed logits/IoUs per (point, token)."""

  def __init__(self, plan):
    self.plan = plan          # {(point_index, token): (logits (H, W), iou)}
    self.calls = []
    self.image_size = None

  def set_image(self, image):
    self.image_size = image.shape[:2]

  def decode_relative_points(self, points, tokens, valid_count=None):
    self.calls.append((len(points), tuple(tokens), valid_count))
    grid = point_grid(2)
    logits = np.full((len(points), len(tokens), H, W), -5.0, np.float32)
    ious = np.zeros((len(points), len(tokens)), np.float32)
    for i, p in enumerate(points[:valid_count]):
      pi = int(np.argmin(np.abs(grid - p).sum(1)))
      for j, t in enumerate(tokens):
        if (pi, t) in self.plan:
          logits[i, j], ious[i, j] = self.plan[(pi, t)]
    return logits, ious, len(points)


def _plan():
  b_with_island = _square(15, 15, 25, 25)
  b_with_island[35:37, 35:37] = 5.0   # 4-pixel island, removed (min area 10)
  unstable = _square(0, 20, 10, 30, inside=0.5, outside=-0.5)
  return {
      (0, 3): (_square(0, 0, 10, 10), 0.95),          # A, level 1
      (0, 0): (_square(0, 0, 10, 11), 0.90),          # near-duplicate of A -> NMS
      (1, 3): (_square(0, 20, 10, 30), 0.50),         # low predicted IoU
      (1, 0): (unstable, 0.99),                       # unstable
      (2, 3): (b_with_island, 0.93),                  # B, level 1 (island removed)
      (2, 0): (_square(28, 0, 38, 12), 0.92),         # C, level 3
      (3, 3): (_square(28, 20, 34, 30), 0.99),        # D, level 1 (second batch)
      (3, 0): (_square(0, 32, 20, 40), 0.89),         # E, level 3
      (3, 2): (_square(0, 0, 40, 40), 0.99),          # level 2 token: not requested
  }


@pytest.mark.parametrize("output_mode", ["binary_mask", "coco_rle"])
def test_filters_nms_levels_and_records(output_mode):
  pred = PlantedPredictor(_plan())
  gen = SemanticSAMAutomaticMaskGenerator(
      pred, points_per_side=2, points_per_batch=3, levels=(1, 3),
      output_mode=output_mode, progress=False)
  records = gen.generate(np.zeros((H, W, 3), np.uint8))
  # Two static-size batches (3 points each, the second holding 1 real point),
  # each asking for the tokens of levels 1 and 3 -> 3 and 0.
  assert pred.calls == [(3, (3, 0), 3), (3, (3, 0), 1)]
  got = {(r["level"], tuple(r["bbox"])): r for r in records}
  expect = {
      (1, (0.0, 0.0, 9.0, 9.0)): 100,     # A
      (1, (15.0, 15.0, 9.0, 9.0)): 100,   # B without its island
      (3, (0.0, 28.0, 11.0, 9.0)): 120,   # C
      (1, (20.0, 28.0, 9.0, 5.0)): 60,    # D
      (3, (32.0, 0.0, 7.0, 19.0)): 160,   # E
  }
  assert set(got) == set(expect)
  for key, area in expect.items():
    r = got[key]
    assert r["area"] == area
    seg = r["segmentation"]
    mask = pp.decode_rle(seg) if output_mode == "coco_rle" else seg
    assert mask.shape == (H, W) and mask.sum() == area
    assert r["crop_box"] == [0.0, 0.0, float(W), float(H)]
    assert r["stability_score"] == 1.0
    assert set(r) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                      "stability_score", "crop_box", "level"}
  assert got[(1, (0.0, 0.0, 9.0, 9.0))]["predicted_iou"] == pytest.approx(0.95)
  assert got[(1, (20.0, 28.0, 9.0, 5.0))]["point_coords"] == [[30.0, 30.0]]


def test_thresholds_are_applied():
  pred = PlantedPredictor(_plan())
  gen = SemanticSAMAutomaticMaskGenerator(
      pred, points_per_side=2, points_per_batch=4, levels=(1, 3), pred_iou_thresh=0.0,
      stability_score_thresh=0.0, box_nms_thresh=1.0, min_mask_region_area=0, progress=False)
  records = gen.generate(np.zeros((H, W, 3), np.uint8))
  # Nothing filtered: all 8 planted masks of tokens 3 and 0 come back (the
  # near-duplicate, the low-IoU and the unstable one included), island kept.
  assert len(records) == 8
  island = [r for r in records if r["level"] == 1 and r["bbox"][0] == 15.0]
  assert island[0]["area"] == 104


def test_point_grid_and_argument_errors():
  g = point_grid(4)
  assert g.shape == (16, 2)
  np.testing.assert_allclose(g[:4, 0], [0.125, 0.375, 0.625, 0.875])
  with pytest.raises(ValueError):
    SemanticSAMAutomaticMaskGenerator(PlantedPredictor({}), levels=(0,))
  with pytest.raises(ValueError):
    SemanticSAMAutomaticMaskGenerator(PlantedPredictor({}), output_mode="png")
  with pytest.raises(NotImplementedError):
    SemanticSAMAutomaticMaskGenerator(PlantedPredictor({}), crop_n_layers=1)


def test_real_model_every_batch_honours_levels():
  """With the tiny converted model: every batch returns only the chosen levels."""
  from tests import golden
  from tests.test_predictor import _predictor
  dirs = golden.model_dirs()
  if not dirs:
    golden.require_golden()
    pytest.fail("no tiny_* model folder")
  pred = _predictor(str(dirs[0]))
  gen = SemanticSAMAutomaticMaskGenerator(
      pred, points_per_side=4, points_per_batch=6, levels=(2, 5), pred_iou_thresh=-1e9,
      stability_score_thresh=0.0, box_nms_thresh=1.0, min_mask_region_area=0, progress=False)
  img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8)
  records = gen.generate(img)
  # 16 points x 2 levels, nothing filtered.
  assert {r["level"] for r in records} == {2, 5}
  assert len(records) == 32
  # The records equal a direct predict() of the same clicks (3 batches of 6, last padded).
  grid = point_grid(4)
  for start in range(0, 16, 6):
    pts = grid[start:start + 6]
    pred.set_image(img)
    res = pred.predict(points=pts, levels=(2, 1), coords="relative")
    for i, p in enumerate(pts):
      for j, level in enumerate((2, 5)):
        rec = [r for r in records if r["level"] == level and
               np.allclose(r["point_coords"], [[p[0] * 80, p[1] * 64]])]
        assert len(rec) == 1
        assert rec[0]["predicted_iou"] == pytest.approx(float(res.ious[i, j]), rel=1e-4, abs=1e-5)
        assert rec[0]["area"] == int(res.masks[i, j].sum())
