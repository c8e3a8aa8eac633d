"""Post-processing helpers against hand-constructed masks."""

from __future__ import annotations

import numpy as np
import pytest

from semsam_jax.inference import postprocess as pp


def test_remove_small_regions_holes_and_islands():
  m = np.zeros((20, 20), bool)
  m[2:12, 2:12] = True
  m[5:7, 5:7] = False          # 4-pixel hole
  m[15:17, 15:18] = True       # 6-pixel island
  filled, changed = pp.remove_small_regions(m, 5, "holes")
  assert changed and filled[5:7, 5:7].all() and filled[15:17, 15:18].all()
  cleaned, changed = pp.remove_small_regions(filled, 10, "islands")
  assert changed and not cleaned[15:17, 15:18].any() and cleaned[2:12, 2:12].all()
  same, changed = pp.remove_small_regions(cleaned, 10, "islands")
  assert not changed and np.array_equal(same, cleaned)
  # Diagonal neighbours are connected (8-connectivity): no island removed.
  d = np.zeros((6, 6), bool)
  d[0, 0] = d[1, 1] = d[2, 2] = True
  out, changed = pp.remove_small_regions(d, 3, "islands")
  assert not changed
  # Every island small -> the largest is kept.
  tiny = np.zeros((10, 10), bool)
  tiny[0, 0] = True
  tiny[5:7, 5] = True
  out, changed = pp.remove_small_regions(tiny, 100, "islands")
  assert changed and out.sum() == 2 and out[5:7, 5].all()
  with pytest.raises(ValueError):
    pp.remove_small_regions(m, 5, "both")


def test_select_multi_masks_rules():
  h = w = 30
  base = -np.ones((4, h, w), np.float32)
  base[0, 0:10, 0:10] = 1          # A
  base[1, 0:10, 0:10] = 1          # duplicate of A
  base[1, 0, 10] = 1               #   (mask IoU 100/101 > 0.95)
  base[2, 10:30, 10:30] = 1        # B, low IoU
  base[3, 0:20, 0:20] = 1          # C
  ious = np.array([0.9, 0.8, 0.3, 0.7])
  kept, by_area = pp.select_multi_masks(base, ious)
  assert [k.index for k in kept] == [0, 3]           # 1 duplicate, 2 under threshold
  assert [k.index for k in by_area] == [0, 3]
  assert [k.area for k in kept] == [100, 400]
  # Nothing above the threshold: the last (lowest IoU) mask is kept anyway.
  kept, _ = pp.select_multi_masks(base, np.array([0.1, 0.2, 0.3, 0.05]))
  assert [k.index for k in kept] == [3]
  # Holes under 100 pixels are filled in the kept masks.
  holed = -np.ones((1, h, w), np.float32)
  holed[0, 0:20, 0:20] = 1
  holed[0, 5:8, 5:8] = -1
  kept, _ = pp.select_multi_masks(holed, np.array([0.9]))
  assert kept[0].mask[5:8, 5:8].all() and kept[0].area == 391
  # The threshold applies to the IoU rounded to two decimals (0.496 -> 0.5 is kept).
  kept, _ = pp.select_multi_masks(base[[0, 3]], np.array([0.496, 0.494]))
  assert [k.index for k in kept] == [0]
  with pytest.raises(ValueError):
    pp.select_multi_masks(base, np.array([0.5, 0.5]))


def test_select_multi_masks_empty_masks_are_not_duplicates():
  # Two empty masks: mask IoU 0/0 counts as no overlap (as in the original), so
  # both survive when their predicted IoUs pass.
  empty = -np.ones((2, 8, 8), np.float32)
  kept, _ = pp.select_multi_masks(empty, np.array([0.9, 0.8]))
  assert [k.index for k in kept] == [0, 1] and all(k.area == 0 for k in kept)


def test_stability_score_formula():
  logits = np.zeros((2, 4, 4), np.float32)
  logits[0] = 5.0
  logits[1, :2] = 1.5
  logits[1, 2:] = 0.5
  s = pp.stability_score(logits, 0.0, 1.0)
  np.testing.assert_allclose(s, [1.0, 0.5])
  # An empty looser mask gives NaN (0/0 as in the original): fails any threshold.
  empty = pp.stability_score(-np.ones((1, 3, 3)), 0.0, 1.0)[0]
  assert np.isnan(empty) and not empty >= 0.0
  np.testing.assert_allclose(pp.stability_from_counts([3, 0], [4, 0]), [0.75, np.nan])


def test_nms_matches_brute_force():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 50, (40, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (40, 2))], 1)
  scores = rng.uniform(0, 1, 40)
  keep = pp.nms(boxes, scores, 0.5)
  # brute force: a box is kept iff no higher-scored kept box overlaps it > 0.5
  order = np.argsort(-scores)
  expect = []
  for i in order:
    if all(pp.box_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= 0.5 for j in expect):
      expect.append(i)
  assert keep.tolist() == expect


def test_masks_to_boxes_and_rle_roundtrip():
  m = np.zeros((3, 12, 9), bool)
  m[0, 2:5, 3:8] = True
  m[1, 11, 0] = True
  boxes = pp.masks_to_boxes(m)
  np.testing.assert_array_equal(boxes, [[3, 2, 7, 4], [0, 11, 0, 11], [0, 0, 0, 0]])
  for i in range(3):
    rle = pp.encode_rle(m[i])
    assert rle["size"] == [12, 9] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(pp.decode_rle(rle), m[i])
    assert pp.rle_area(rle) == m[i].sum()
    raw = pp.encode_rle(m[i], as_str=False)
    assert isinstance(raw["counts"], bytes) and pp.rle_area(raw) == m[i].sum()
  assert pp.xyxy_to_xywh([1, 2, 4, 8]) == [1.0, 2.0, 3.0, 6.0]


def test_nms_edge_cases():
  assert pp.nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
  # Identical boxes: the higher score wins; equal scores keep the first (stable).
  b = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], float)
  assert pp.nms(b, np.array([0.1, 0.9, 0.5]), 0.7).tolist() == [1, 2]
  assert pp.nms(b, np.array([1.0, 1.0, 0.0]), 0.7).tolist() == [0, 2]
  # Degenerate (zero-area) boxes never suppress each other.
  z = np.array([[5, 5, 5, 5], [5, 5, 5, 5]], float)
  assert pp.nms(z, np.array([1.0, 0.5]), 0.0).tolist() == [0, 1]
