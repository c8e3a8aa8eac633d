"""Automatic mask generation on planted decoder outputs (known right answer),
plus the real tiny model for batching/level behaviour and crop layers."""

from __future__ import annotations

import numpy as np
import pytest

from semsam_jax.inference import postprocess as pp
from semsam_jax.inference.automatic import (SemanticSAMAutomaticMaskGenerator, crop_boxes,
                                            point_grid)
from tests import golden

H = W = 40
PAD = 8  # the planted canvas is (H + PAD, W + PAD), like a padded image


def _square(y0, x0, y1, x1, inside=5.0, outside=-5.0):
  m = np.full((H, W), outside, np.float32)
  m[y0:y1, x0:x1] = inside
  return m


class PlantedPredictor:
  """Stands in for SemanticSAMPredictor: fixed logits/IoUs per (grid point, token).

  The "low-resolution" logits it returns are already at canvas resolution
  (so the generator's upsampling is the identity), and the canvas padding is
  filled with positive logits that must never leak into masks or scores.
  """

  def __init__(self, plan):
    self.plan = plan          # {(point_index, token): (logits (H, W), iou)}
    self.calls = []
    self.image_size = None
    self.padded_image_size = None

  def set_image(self, image):
    self.image_size = image.shape[:2]
    self.padded_image_size = (image.shape[0] + PAD, image.shape[1] + PAD)

  def decode_points(self, points, tokens, valid_count=None, slots=None):
    self.calls.append((len(points), tuple(tokens), valid_count, slots))
    grid = point_grid(2)
    logits = np.full((len(points), len(tokens), H + PAD, W + PAD), 5.0, np.float32)
    logits[:, :, :H, :W] = -5.0
    ious = np.full((len(points), len(tokens)), 0.99, np.float32)  # padding slots: high IoU
    for i, p in enumerate(points):
      if i >= valid_count:
        logits[i, :, :H, :W] = 5.0  # garbage in hidden slots must be ignored
        continue
      ious[i] = 0.0
      pi = int(np.argmin(np.abs(grid - p).sum(1)))
      for j, t in enumerate(tokens):
        if (pi, t) in self.plan:
          logits[i, j, :H, :W], ious[i, j] = self.plan[(pi, t)]
    return logits, ious


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
      (3, 0): (_square(0, 32, 20, 40), 0.89),         # E, level 3 (touches the image edge)
      (3, 2): (_square(0, 0, 40, 40), 0.99),          # level 2 token: not requested
  }


@pytest.mark.parametrize("output_mode", ["binary_mask", "coco_rle"])
def test_filters_nms_levels_and_records(output_mode):
  pred = PlantedPredictor(_plan())
  gen = SemanticSAMAutomaticMaskGenerator(
      pred, points_per_side=2, points_per_batch=3, levels=(1, 3),
      output_mode=output_mode, progress=False)
  records = gen.generate(np.zeros((H, W, 3), np.uint8))
  # Two static-size batches (3 slots each, the second holding 1 real point),
  # each asking for the tokens of levels 1 and 3 -> 3 and 0.
  assert pred.calls == [(3, (3, 0), 3, 3), (3, (3, 0), 1, 3)]
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
    if output_mode == "coco_rle":
      assert isinstance(seg["counts"], str) and seg["size"] == [H, W]
      mask = pp.decode_rle(seg)
    else:
      mask = seg
    assert mask.dtype == bool and mask.shape == (H, W) and mask.sum() == area
    assert r["crop_box"] == [0.0, 0.0, float(W), float(H)]
    assert r["stability_score"] == 1.0
    assert set(r) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                      "stability_score", "crop_box", "level"}
  assert got[(1, (0.0, 0.0, 9.0, 9.0))]["predicted_iou"] == pytest.approx(0.95)
  assert got[(1, (20.0, 28.0, 9.0, 5.0))]["point_coords"] == [[30.0, 30.0]]
  # Order: NMS order (decreasing predicted IoU), then masks changed by the
  # small-region cleanup (B) after the unchanged ones.
  order = [(r["level"], tuple(r["bbox"])) for r in records]
  assert order == [(1, (20.0, 28.0, 9.0, 5.0)), (1, (0.0, 0.0, 9.0, 9.0)),
                   (3, (0.0, 28.0, 11.0, 9.0)), (3, (32.0, 0.0, 7.0, 19.0)),
                   (1, (15.0, 15.0, 9.0, 9.0))]


def test_thresholds_are_applied():
  pred = PlantedPredictor(_plan())
  base = dict(points_per_side=2, points_per_batch=4, levels=(1, 3), progress=False)
  gen = SemanticSAMAutomaticMaskGenerator(
      pred, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
      min_mask_region_area=0, **base)
  records = gen.generate(np.zeros((H, W, 3), np.uint8))
  # Nothing filtered: all 8 planted masks of tokens 3 and 0 come back (the
  # near-duplicate, the low-IoU and the unstable one included), island kept.
  assert len(records) == 8
  island = [r for r in records if r["level"] == 1 and r["bbox"][0] == 15.0]
  assert island[0]["area"] == 104
  unstable = [r for r in records if r["level"] == 3 and r["bbox"] == [20.0, 0.0, 9.0, 9.0]]
  assert unstable[0]["stability_score"] == 0.0
  # Each filter alone.
  def levels_boxes(**kw):
    args = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
                min_mask_region_area=0)
    args.update(kw)
    recs = SemanticSAMAutomaticMaskGenerator(PlantedPredictor(_plan()), **base, **args
                                             ).generate(np.zeros((H, W, 3), np.uint8))
    return {(r["level"], tuple(r["bbox"])) for r in recs}
  everything = levels_boxes()
  assert everything - levels_boxes(pred_iou_thresh=0.88) == {(1, (20.0, 0.0, 9.0, 9.0))}
  assert everything - levels_boxes(stability_score_thresh=0.92) == {(3, (20.0, 0.0, 9.0, 9.0))}
  # NMS: A' duplicates A, and the low-IoU mask has the unstable mask's box.
  assert everything - levels_boxes(box_nms_thresh=0.7) == {(3, (0.0, 0.0, 10.0, 9.0)),
                                                            (1, (20.0, 0.0, 9.0, 9.0))}


def test_point_grid_crop_boxes_and_argument_errors():
  g = point_grid(4)
  assert g.shape == (16, 2)
  np.testing.assert_allclose(g[:4, 0], [0.125, 0.375, 0.625, 0.875])
  np.testing.assert_allclose(g[:4, 1], 0.125)   # row-major: x varies fastest
  boxes, layers = crop_boxes((64, 64), 1, 512 / 1500)
  assert boxes == [[0, 0, 64, 64], [0, 0, 43, 43], [0, 22, 43, 64], [22, 0, 64, 43],
                   [22, 22, 64, 64]]
  assert layers == [0, 1, 1, 1, 1]
  assert crop_boxes((30, 50), 0, 0.3) == ([[0, 0, 50, 30]], [0])
  p = PlantedPredictor({})
  with pytest.raises(ValueError, match="levels are 1..6"):
    SemanticSAMAutomaticMaskGenerator(p, levels=(0,))
  # tokens= (decoder tokens 0..5) as in SemanticSAMPredictor.predict.
  g = SemanticSAMAutomaticMaskGenerator(p, tokens=(3, 5))
  assert g.levels == (1, 6) and g.tokens == (3, 5)
  with pytest.raises(ValueError, match="tokens are 0..5"):
    SemanticSAMAutomaticMaskGenerator(p, tokens=(6,))
  with pytest.raises(ValueError, match="not both"):
    SemanticSAMAutomaticMaskGenerator(p, levels=(2,), tokens=(3,))
  with pytest.raises(ValueError, match="output_mode"):
    SemanticSAMAutomaticMaskGenerator(p, output_mode="png")
  with pytest.raises(ValueError, match="exactly one"):
    SemanticSAMAutomaticMaskGenerator(p, point_grids=[point_grid(2)])
  with pytest.raises(ValueError, match="one grid per crop layer"):
    SemanticSAMAutomaticMaskGenerator(p, points_per_side=None, point_grids=[point_grid(2)],
                                      crop_n_layers=1)
  with pytest.raises(ValueError, match="points_per_batch"):
    SemanticSAMAutomaticMaskGenerator(p, points_per_batch=0)
  with pytest.raises(ValueError, match="uint8"):
    SemanticSAMAutomaticMaskGenerator(p, progress=False).generate(np.zeros((4, 4, 3)))
  with pytest.raises(TypeError, match="SemanticSAMPredictor"):
    SemanticSAMAutomaticMaskGenerator(object())


class CoordinatePredictor:
  """A fake whose image pixels encode their own (y, x), so it knows where a
  crop lies; a click returns the planted object under it, clipped to the crop."""

  def __init__(self, objects):
    self.objects = objects    # list of (y0, x0, y1, x1) in full-image pixels
    self.crops = []

  def set_image(self, image):
    self.offset = (int(image[0, 0, 0]), int(image[0, 0, 1]))
    self.image_size = self.padded_image_size = image.shape[:2]
    self.crops.append((self.offset, self.image_size))

  def decode_points(self, points, tokens, valid_count=None, slots=None):
    (oy, ox), (h, w) = self.offset, self.image_size
    logits = np.full((len(points), len(tokens), h, w), -5.0, np.float32)
    ious = np.zeros((len(points), len(tokens)), np.float32)
    for i, (px, py) in enumerate(points[:valid_count]):
      x, y = px * w + ox, py * h + oy
      for (y0, x0, y1, x1) in self.objects:
        if y0 <= y < y1 and x0 <= x < x1:
          logits[i, 0, max(y0 - oy, 0):max(y1 - oy, 0), max(x0 - ox, 0):max(x1 - ox, 0)] = 5.0
          ious[i, 0] = 0.95
    return logits, ious


def test_crop_layers_uncrop_filter_edges_and_prefer_small_crops():
  yy, xx = np.mgrid[:64, :64]
  image = np.stack([yy, xx, np.zeros_like(xx)], -1).astype(np.uint8)
  small = (5, 5, 16, 16)     # inside the full image and the top-left crop
  long = (30, 10, 41, 56)    # crosses crop borders: only whole-image masks survive
  pred = CoordinatePredictor([small, long])
  gen = SemanticSAMAutomaticMaskGenerator(pred, points_per_side=4, points_per_batch=16,
                                          crop_n_layers=1, levels=(1,), progress=False)
  records = gen.generate(image)
  # The crops are embedded first and the whole image last (it stays set).
  assert [c[0] for c in pred.crops] == [(0, 0), (22, 0), (0, 22), (22, 22), (0, 0)]
  assert pred.crops[-1][1] == (64, 64)
  by_box = {tuple(r["bbox"]): r for r in records}
  assert set(by_box) == {(5.0, 5.0, 10.0, 10.0), (10.0, 30.0, 45.0, 10.0)}
  r_small = by_box[(5.0, 5.0, 10.0, 10.0)]
  assert r_small["crop_box"] == [0.0, 0.0, 43.0, 43.0]      # the smaller crop wins
  np.testing.assert_allclose(r_small["point_coords"], [[43 / 8, 43 / 8]])
  mask = r_small["segmentation"]
  assert mask.shape == (64, 64) and mask.sum() == 121 and mask[5:16, 5:16].all()
  r_long = by_box[(10.0, 30.0, 45.0, 10.0)]
  assert r_long["crop_box"] == [0.0, 0.0, 64.0, 64.0] and r_long["area"] == 11 * 46


@pytest.fixture(scope="module")
def tiny_predictor():
  from tests.test_predictor import _predictor
  dirs = golden.model_dirs()
  if not dirs:
    golden.require_golden()
    pytest.fail("no tiny_* model folder")
  return _predictor(str(dirs[0]))


def test_real_model_every_batch_honours_levels(tiny_predictor):
  """With the tiny converted model: every batch returns only the chosen levels
  and equals a direct predict() of the same clicks."""
  pred = tiny_predictor
  gen = SemanticSAMAutomaticMaskGenerator(
      pred, points_per_side=4, points_per_batch=6, levels=(2, 5), pred_iou_thresh=-1e9,
      stability_score_thresh=-1.0, box_nms_thresh=1.0, min_mask_region_area=0, progress=False)
  img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8)
  records = gen.generate(img)
  # 16 points x 2 levels, nothing filtered (except masks empty at the
  # looser threshold, whose stability is NaN as in the original).
  assert {r["level"] for r in records} == {2, 5}
  grid = point_grid(4)
  seen = 0
  for start in range(0, 16, 6):  # 3 batches of 6 points, the last padded
    pts = grid[start:start + 6]
    pred.set_image(img)
    res = pred.predict(points=pts, levels=(2, 5), coords="relative")
    for i, p in enumerate(pts):
      for j, level in enumerate((2, 5)):
        rec = [r for r in records if r["level"] == level and
               np.allclose(r["point_coords"], [[p[0] * 80, p[1] * 64]])]
        if np.isnan(pp.stability_score(res.logits[i, j])):
          assert not rec
          continue
        assert len(rec) == 1
        seen += 1
        assert rec[0]["predicted_iou"] == pytest.approx(float(res.ious[i, j]), rel=1e-4, abs=1e-5)
        assert rec[0]["area"] == int(res.masks[i, j].sum())
        assert rec[0]["stability_score"] == pytest.approx(
            float(pp.stability_score(res.logits[i, j])), abs=1e-3)
  assert seen == len(records) >= 16


def test_real_model_crop_layers_run(tiny_predictor):
  from semsam_jax.inference.predictor import SemanticSAMPredictor
  # One size bucket for the image and its crops: one compiled embedding.
  pred = SemanticSAMPredictor(tiny_predictor.config, tiny_predictor.params,
                              size_buckets=(128,))
  gen = SemanticSAMAutomaticMaskGenerator(
      pred, points_per_side=2, points_per_batch=6, crop_n_layers=1, levels=(2, 5),
      pred_iou_thresh=-1e9, stability_score_thresh=-1.0, output_mode="coco_rle", progress=False)
  img = np.random.default_rng(1).integers(0, 255, (60, 90, 3), np.uint8)
  records = gen.generate(img)
  assert pred.embedding_calls == 5     # the image and its 4 crops
  # The predictor is left on the whole image (crops first, the image last):
  # a following predict() equals one on a freshly set image.
  assert pred.image_size == (60, 90)
  after = pred.predict(points=[[70, 10]], levels=(2,))
  pred.set_image(img)
  np.testing.assert_array_equal(after.logits, pred.predict(points=[[70, 10]], levels=(2,)).logits)
  assert records and {r["level"] for r in records} <= {2, 5}
  for r in records:
    x, y, w, h = r["crop_box"]
    (px, py), = r["point_coords"]
    assert x <= px <= x + w and y <= py <= y + h
    assert r["segmentation"]["size"] == [60, 90]
    assert pp.decode_rle(r["segmentation"]).sum() == r["area"]


def test_real_model_second_image_compiles_nothing(tiny_predictor):
  """Steady state of the generator: another image of the same padded size (a
  different number of masks passing the filters, so a different number of
  transfer chunks) runs without a single new XLA compilation."""
  from tests.test_predictor import CompileCounter
  gen = SemanticSAMAutomaticMaskGenerator(
      tiny_predictor, points_per_side=4, points_per_batch=6, levels=(1, 3, 6),
      pred_iou_thresh=-1e9, stability_score_thresh=-1.0, progress=False)
  rng = np.random.default_rng(5)
  first = gen.generate(rng.integers(0, 255, (64, 80, 3), np.uint8))     # pads to 64 x 96
  with CompileCounter() as cc:
    second = gen.generate(rng.integers(0, 255, (50, 70, 3), np.uint8))   # also pads to 64 x 96
  assert first and second
  assert cc.count == 0, f"{cc.count} compilation(s) for the second image"
