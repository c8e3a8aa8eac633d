"""Protocol maths of semsam_jax.evaluation on hand-made inputs (no model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from semsam_jax.evaluation import clicks, datasets, evaluator, metrics, scoring


# --------------------------------------------------------------------------
# Clicks

def _cascade_reference(mask: np.ndarray) -> np.ndarray:
  """kornia's cascade written out step by step (float64): each step convolves
  the boundary indicator with exp(-|offset| / 0.35) and gives newly reached
  pixels ``step - h log(S)``."""
  h = 0.35
  b = (~np.pad(mask, 1)).astype(np.float64)
  hh, ww = b.shape
  k = np.exp(-np.hypot(*np.meshgrid([-1, 0, 1], [-1, 0, 1], indexing="ij")) / h)
  out = np.zeros_like(b)
  for step in range(max(hh, ww)):
    bp = np.pad(b, 1, mode="edge")
    s = sum(k[dy, dx] * bp[dy:dy + hh, dx:dx + ww] for dy in range(3) for dx in range(3))
    with np.errstate(divide="ignore"):
      c = np.nan_to_num(-h * np.log(s), posinf=0.0)
    new = c > 0
    if not new.any():
      break
    out[new] = step + c[new]
    b[new] = 1.0
  return out[1:-1, 1:-1]


def _argmax_xy(a):
  i = int(np.argmax(a))
  return i % a.shape[1], i // a.shape[1]


def _ring(size=31, r_out=13.0, r_in=6.0):
  yy, xx = np.mgrid[:size, :size]
  d = np.hypot(yy - size // 2, xx - size // 2)
  return (d <= r_out) & (d >= r_in)


def _l_shape():
  m = np.zeros((24, 24), bool)
  m[2:20, 3:9] = True      # vertical bar, 6 wide
  m[14:20, 3:21] = True    # horizontal bar, 6 high
  return m


SHAPES = {
    "ring": _ring(),
    "l_shape": _l_shape(),
    "one_pixel": np.pad(np.ones((1, 1), bool), ((5, 3), (7, 2))),
    "border_rect": np.pad(np.ones((5, 7), bool), ((0, 5), (0, 3))),
    "full_odd": np.ones((7, 9), bool),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_kornia_transform_matches_stepwise_cascade(name):
  mask = SHAPES[name]
  ours = clicks.kornia_distance_transform(mask)
  ref = _cascade_reference(mask)
  np.testing.assert_allclose(ours, ref, atol=2e-6)
  assert (ours[~mask] == 0).all()
  assert clicks.center_click(mask) == _argmax_xy(ref)


def test_known_click_locations():
  # A single pixel is its own centre.
  assert clicks.center_click(SHAPES["one_pixel"]) == (7, 5)
  # An odd rectangle: its centre, also when the mask fills the whole image
  # (the 1-pixel pad counts as outside) ...
  assert clicks.center_click(SHAPES["full_odd"]) == (4, 3)
  # ... and when it touches the top-left border of a larger image.
  assert clicks.center_click(SHAPES["border_rect"]) == (3, 2)
  # A ring: the click lies on the ring, not in its hole (where the centroid is).
  x, y = clicks.center_click(SHAPES["ring"])
  assert SHAPES["ring"][y, x] and np.hypot(x - 15, y - 15) >= 6
  # An L: inside the mask, in the corner block where both bars meet.
  x, y = clicks.center_click(SHAPES["l_shape"])
  assert SHAPES["l_shape"][y, x] and 14 <= y < 20 and 3 <= x < 9
  # Empty mask: (0, 0), as argmax of zeros in the original.
  assert clicks.center_click(np.zeros((4, 5), bool)) == (0, 0)


@pytest.mark.parametrize("name", ["ring", "l_shape", "border_rect", "one_pixel"])
def test_euclidean_option_is_exact(name):
  mask = SHAPES[name]
  dt = clicks.distance_transform(mask, "euclidean")
  # brute force: distance to the nearest pixel outside the mask or the image
  outside = np.argwhere(~np.pad(mask, 1)) - 1
  ys, xs = np.nonzero(mask)
  d = np.sqrt(((np.stack([ys, xs], 1)[:, None] - outside[None]) ** 2).sum(-1)).min(1)
  np.testing.assert_allclose(dt[ys, xs], d, rtol=1e-6)
  assert clicks.center_click(mask, "euclidean") == _argmax_xy(dt)


def test_click_boxes():
  boxes = clicks.click_boxes(np.array([[10, 20]]), (100, 150), (128, 160))
  np.testing.assert_allclose(boxes, [[10 / 160, 20 / 128, 6 / 160, 6 / 128]], rtol=1e-6)
  with pytest.raises(ValueError):
    clicks.distance_transform(np.ones((3, 3), bool), "nearest")


# --------------------------------------------------------------------------
# IoU, selection and aggregation

def _rle(m):
  return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def test_mask_iou_matches_pycocotools():
  rng = np.random.default_rng(0)
  gt = rng.random((5, 23, 31)) < 0.4
  pred = rng.random((5, 23, 31)) < 0.6
  ours = metrics.mask_iou(gt, pred)
  ref = np.array([mask_utils.iou([_rle(p)], [_rle(g)], [0])[0, 0] for g, p in zip(gt, pred)])
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  assert metrics.mask_iou(gt[0], gt[0]) == 1.0


def test_max_vs_oracle():
  ious = np.array([[0.1, 0.9, 0.3, 0.2, 0.0, 0.5],
                   [0.7, 0.2, 0.2, 0.6, 0.1, 0.1]], np.float32)
  pred = np.array([[0.2, 0.1, 0.8, 0.3, 0.3, 0.1],      # Max picks token 2
                   [0.5, 0.5, 0.1, 0.2, 0.2, 0.2]], np.float32)  # tie: first (token 0)
  mx, orc = metrics.select_max_oracle(ious, pred)
  np.testing.assert_array_equal(mx, np.float32([0.3, 0.7]))
  np.testing.assert_array_equal(orc, np.float32([0.9, 0.7]))


def test_summarize_noc_and_miou():
  ious = np.float32([0.95, 0.85, 0.5, 0.49])
  s = metrics.summarize(ious)
  assert s["noc@0.5"] == (1 + 1 + 1 + 20) / 4
  assert s["noc@0.8"] == (1 + 1 + 20 + 20) / 4
  assert s["noc@0.85"] == (1 + 1 + 20 + 20) / 4      # 0.85 >= 0.85 in float32
  assert s["noc@0.9"] == (1 + 20 + 20 + 20) / 4
  assert s["miou@iter1"] == pytest.approx(np.mean(ious.astype(np.float64)), rel=1e-7)
  assert math.isnan(metrics.summarize(np.zeros(0))["miou@iter1"])


def test_accumulator_pools_instances_and_area_ranges():
  acc = metrics.InteractiveAccumulator()
  # image A: one instance; image B: three -> the mean is over instances, not images
  acc.add("a", [1], [1.0], [1.0], [100.0])
  acc.add("b", [2, 3, 4], [0.0, 0.0, 0.5], [0.0, 0.6, 0.5], [1024.0, 5000.0, 20000.0])
  m = acc.metrics()
  assert m["coco_interactive.miou_max"] == pytest.approx(1.5 / 4)
  assert m["coco_interactive.miou_oracle"] == pytest.approx(2.1 / 4)
  assert m["coco_interactive.noc@0.5_max"] == (1 + 20 + 20 + 1) / 4
  assert m["coco_interactive.num_instances"] == 4
  # COCO ranges, bounds inclusive: 1024 is small and medium
  assert m["coco_interactive.small.num_instances"] == 2
  assert m["coco_interactive.medium.num_instances"] == 2
  assert m["coco_interactive.large.num_instances"] == 1
  assert m["coco_interactive.large.miou_max"] == pytest.approx(0.5)
  assert json.loads(json.dumps(m)) == m


# --------------------------------------------------------------------------
# Multi-granularity pieces

def test_level_targets_nested_masks_and_cut():
  masks = np.zeros((8, 10, 10), bool)
  masks[0, 2:8, 2:8] = True          # object
  masks[1, 4:6, 4:6] = True          # part
  masks[2] = True                    # group (whole image)
  masks[3, 0:2, 0:2] = True          # elsewhere
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(evaluator.level_targets(masks, (5, 5), 6, rng), [0, 1, 2])
  np.testing.assert_array_equal(evaluator.level_targets(masks, (0, 0), 6, rng), [2, 3])
  masks[3:] = True
  masks[0, 9, 9] = True              # 7 masks contain (9, 9) -> cut to 6, seeded
  a = evaluator.level_targets(masks, (9, 9), 6, np.random.default_rng(1))
  b = evaluator.level_targets(masks, (9, 9), 6, np.random.default_rng(1))
  assert len(a) == 6 and len(set(a.tolist())) == 6 and set(a.tolist()) <= {0, 2, 3, 4, 5, 6, 7}
  np.testing.assert_array_equal(a, b)


def test_best_assignment_is_optimal():
  rng = np.random.default_rng(0)
  cost = rng.random((20, 6, 6)).astype(np.float32)
  counts = rng.integers(1, 7, 20)
  valid = np.arange(6)[None] < counts[:, None]
  assign = np.asarray(scoring.best_assignment(cost, valid))
  for b in range(20):
    n = counts[b]
    rows, cols = linear_sum_assignment(cost[b, :, :n])
    best = cost[b, rows, cols].sum()
    ours = cost[b, assign[b, :n], np.arange(n)]
    assert len(set(assign[b, :n].tolist())) == n
    assert ours.sum() == pytest.approx(best, rel=1e-6)


def _giou_ref(a, b):
  ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
  bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
  iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
  ih = max(0.0, min(ay1, by1) - max(ay0, by0))
  inter = iw * ih
  union = a[2] * a[3] + b[2] * b[3] - inter
  hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
  return inter / union - (hull - union) / hull


def test_matching_cost_against_direct_formulas():
  rng = np.random.default_rng(3)
  hp, wp, t = 8, 12, 3
  logits = rng.normal(size=(1, t, hp, wp)).astype(np.float32)
  targets = rng.random((1, 2, hp, wp)) < 0.5
  region = np.zeros((1, hp, wp), bool)
  region[0, :6, :10] = True
  targets &= region[:, None]
  boxes = rng.uniform(0.2, 0.6, (1, t, 4)).astype(np.float32)
  tboxes = rng.uniform(0.2, 0.6, (1, 2, 4)).astype(np.float32)
  w = scoring.MatcherWeights()
  cost = np.asarray(scoring.matching_cost(logits, boxes, targets, tboxes, region, w))
  for o in range(t):
    for j in range(2):
      x = logits[0, o][region[0]].astype(np.float64)
      y = targets[0, j][region[0]].astype(np.float64)
      bce = np.mean(np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0) - x * y)
      p = 1 / (1 + np.exp(-x))
      dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
      l1 = np.abs(boxes[0, o] - tboxes[0, j]).sum()
      giou = _giou_ref(boxes[0, o].astype(np.float64), tboxes[0, j].astype(np.float64))
      ref = w.mask * bce + w.dice * dice + w.box * l1 - w.giou * giou
      assert cost[0, o, j] == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_mask_boxes_follow_bitmasks():
  m = np.zeros((1, 10, 20), bool)
  m[0, 2:5, 3:9] = True      # x 3..8, y 2..4 -> [3, 2, 9, 5]
  np.testing.assert_allclose(evaluator.mask_boxes_cxcywh(m, (10, 20)),
                             [[6 / 20, 3.5 / 10, 6 / 20, 3 / 10]], rtol=1e-6)


def test_buckets():
  assert evaluator.bucket(1, (8, 16)) == 8
  assert evaluator.bucket(9, (8, 16)) == 16
  assert evaluator.bucket(40, (8, 16)) == 48


# --------------------------------------------------------------------------
# Inputs

def _write_coco(tmp_path, images, annotations):
  ann_file = tmp_path / "annotations.json"
  ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                  "categories": [{"id": 1, "name": "thing"}]}))
  return ann_file


def _rle_json(m):
  r = _rle(m)
  r["counts"] = r["counts"].decode()
  return r


def test_coco_reader_reports_and_skips(tmp_path):
  from PIL import Image
  (tmp_path / "images").mkdir()
  img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
  Image.fromarray(img).save(tmp_path / "images" / "a.png")
  Image.fromarray(img).save(tmp_path / "images" / "b.png")
  (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
  full = np.zeros((20, 30), bool)
  full[5:15, 5:25] = True
  images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "b.png", "height": 20, "width": 30},       # no annotations
            {"id": 3, "file_name": "broken.png", "height": 20, "width": 30},
            {"id": 4, "file_name": "missing.png", "height": 20, "width": 30}]
  anns = [
      {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 200.0,
       "segmentation": _rle_json(full)},
      {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 0.0,
       "segmentation": _rle_json(np.zeros((20, 30), bool))},                # empty
      {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 1.0,
       "segmentation": _rle_json(full)},                                    # crowd: ignored
      {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 50.0,
       "segmentation": [[2, 2, 12, 2, 12, 7, 2, 7]]},                       # polygon
      {"id": 14, "image_id": 3, "category_id": 1, "iscrowd": 0, "area": 5.0,
       "segmentation": _rle_json(full)},
      {"id": 15, "image_id": 4, "category_id": 1, "iscrowd": 0, "area": 5.0,
       "segmentation": _rle_json(full)},
  ]
  ann_file = _write_coco(tmp_path, images, anns)
  kind, where = datasets.detect_format(tmp_path)
  assert kind == "coco" and where["image_dir"] == tmp_path / "images"
  log = datasets.SkipLog()
  out = list(datasets.iter_coco(ann_file, tmp_path / "images", min_size=0, skipped=log))
  assert [e.image_id for e in out] == ["1"]
  assert out[0].ann_ids == [10, 13]
  np.testing.assert_array_equal(out[0].masks[0], full)
  ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[2, 2, 12, 2, 12, 7, 2, 7]],
                                                                  20, 30))).astype(bool)
  np.testing.assert_array_equal(out[0].masks[1], ref)
  np.testing.assert_array_equal(out[0].areas, [200.0, 50.0])
  assert log.counts() == {"empty_mask": 1, "image_without_annotations": 1,
                          "unreadable_image": 2}
  assert "missing.png" in log.summary(max_lines=10)
  # --num-images counts evaluated images; the test-time resize scales masks too
  out = list(datasets.iter_coco(ann_file, tmp_path / "images", num_images=1, min_size=40,
                                max_size=1333))
  assert out[0].image.shape == (40, 60, 3) and out[0].masks.shape == (2, 40, 60)
  assert out[0].masks[0].sum() == 4 * full.sum()


def test_resized_shape_like_detectron2():
  assert datasets.resized_shape(480, 640, 800, 1333) == (800, 1067)
  assert datasets.resized_shape(200, 1000, 800, 1333) == (267, 1333)
  assert datasets.resized_shape(50, 60, 0, 0) == (50, 60)


def test_detect_format_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    datasets.detect_format(tmp_path / "nope")
  (tmp_path / "x.txt").write_text("")
  with pytest.raises(ValueError):
    datasets.detect_format(tmp_path / "x.txt")
  assert datasets.detect_format(tmp_path)[0] == "semsam"
