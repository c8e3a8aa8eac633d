"""Click sampling, slots and augmentation of ``prepare_example``, checked
against the masks put on the canvas independently (decode every mask, flip,
PIL-nearest resize, crop, pad: ``tests.test_data_transforms._naive``)."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from semsam_jax.data import transforms as T
from semsam_jax.data.pipeline import ExampleOptions, prepare_example
from tests.test_data_transforms import _boxes, _naive


def _rle(m):
  return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"]


def _unpack(packed):
  return np.unpackbits(packed, axis=-1, bitorder="little").astype(bool)


def _check_example(out, dbg, masks, opt):
  """Every invariant of one example against the naive canvas masks; returns
  (canvas masks, per valid prompt: (click, orig prompt mask, orig targets, orig containing))."""
  g = dbg["geometry"]
  pad = opt.mask_pad_value
  C = _naive(masks, g, pad) if masks else np.zeros((0, g.size, g.size), bool)
  S, K, Tn, M = opt.image_size, opt.max_num_instance, opt.num_tokens, opt.max_masks_per_image
  nonempty = np.flatnonzero(C.reshape(len(C), -1).any(1)) if len(C) else np.zeros(0, int)
  np.testing.assert_array_equal(dbg["kept"], nonempty)       # masks emptied by the crop go
  n = len(nonempty)
  if n == 0:
    assert not out["mask_valid"].any() and not out["prompt_valid"].any()
    assert not out["target_valid"].any() and not out["masks"].any()
    return C, []
  # Slots: the referenced masks in GT order, then zeros.
  nslots = int(out["mask_valid"].sum())
  assert out["mask_valid"][:nslots].all() and nslots <= M
  slot_orig = nonempty[dbg["slots"]]
  assert len(slot_orig) == nslots and (np.diff(slot_orig) > 0).all()
  np.testing.assert_array_equal(_unpack(out["masks"][:nslots]), C[slot_orig])
  assert not out["masks"][nslots:].any() and not out["mask_boxes"][nslots:].any()
  np.testing.assert_array_equal(out["mask_boxes"][:nslots], _boxes(C[slot_orig]))
  # Prompts.
  nk = int(out["prompt_valid"].sum())
  assert out["prompt_valid"][:nk].all()
  assert int(out["num_dropped_prompts"]) == K - nk
  prompts = []
  referenced = set()
  for k in range(nk):
    x, y = (int(v) for v in out["click_xy"][k])
    assert 0 <= x < S and 0 <= y < S
    pm = slot_orig[out["prompt_mask"][k]]
    assert C[pm, y, x], "click outside its prompt mask"
    containing = np.flatnonzero(C[:, y, x])
    tv = out["target_valid"][k]
    nt = int(tv.sum())
    assert tv[:nt].all() and not out["target_index"][k, nt:].any()
    tgt = slot_orig[out["target_index"][k, :nt]]
    assert C[tgt, y, x].all(), "click outside one of its targets"
    if len(containing) <= Tn:
      np.testing.assert_array_equal(tgt, containing)       # all of them, in GT order
    else:
      assert nt == Tn and len(set(tgt.tolist())) == Tn and set(tgt) <= set(containing)
    referenced |= set(tgt.tolist()) | {int(pm)}
    prompts.append(((x, y), int(pm), tgt, containing))
  assert referenced == set(slot_orig.tolist())
  # Invalid prompts are all zero.
  assert not out["click_xy"][nk:].any() and not out["prompt_mask"][nk:].any()
  assert not out["target_valid"][nk:].any() and not out["target_index"][nk:].any()
  return C, prompts


def _nested_masks(h, w, rng):
  """9 nested rectangles around a point, some ellipses, some disjoint blobs."""
  masks = []
  cy, cx = h // 2, w // 3
  for r in range(1, 10):
    m = np.zeros((h, w), bool)
    m[max(cy - 2 * r, 0):cy + 2 * r, max(cx - 2 * r, 0):cx + 3 * r] = True
    masks.append(m)
  yy, xx = np.mgrid[0:h, 0:w]
  for _ in range(4):
    ey, ex = rng.uniform(0, h), rng.uniform(0, w)
    masks.append(((yy - ey) / rng.uniform(3, h / 2)) ** 2 + ((xx - ex) / rng.uniform(3, w / 2)) ** 2 <= 1)
  for i in range(3):
    m = np.zeros((h, w), bool)
    m[2 + 3 * i:4 + 3 * i, w - 4:w - 1] = True
    masks.append(m)
  order = rng.permutation(len(masks))
  return [masks[i] for i in order]


@pytest.mark.parametrize("pad", [255, 0])
def test_clicks_and_targets_nested(pad):
  rng = np.random.default_rng(0)
  h, w = 40, 56
  masks = _nested_masks(h, w, rng)
  rles = [_rle(m) for m in masks]
  opt = ExampleOptions(image_size=48, max_num_instance=60, num_tokens=6, mask_pad_value=pad)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  subsets, over6 = set(), 0
  for seed in range(6):
    out, dbg = prepare_example(image, rles, np.random.default_rng(seed), opt, return_debug=True)
    C, prompts = _check_example(out, dbg, masks, opt)
    n = len(dbg["kept"])
    assert len(prompts) == 60 and n < 60
    pm = np.array([p[1] for p in prompts])
    # A permutation of the masks, tiled to K.
    assert sorted(pm[:n]) == sorted(dbg["kept"])
    np.testing.assert_array_equal(pm[n:], np.tile(pm[:n], 60 // n + 1)[: 60 - n])
    for _, _, tgt, containing in prompts:
      if len(containing) > 6:
        over6 += 1
        subsets.add(tuple(sorted(tgt)))
  assert over6 >= 10                    # the > 6 case is exercised ...
  assert len(subsets) >= 3              # ... and the subset is drawn at random


@pytest.mark.parametrize("pad_region", [False, True])
def test_one_mask(pad_region):
  rng = np.random.default_rng(1)
  h, w = (32, 32) if not pad_region else (24, 32)
  yy, xx = np.mgrid[0:h, 0:w]
  m = ((yy - 12) / 6) ** 2 + ((xx - 14) / 9) ** 2 <= 1
  opt = ExampleOptions(image_size=32, min_scale=1.0, max_scale=1.0, max_num_instance=60,
                       num_tokens=6, max_masks_per_image=8)
  out, dbg = prepare_example(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), [_rle(m)],
                             np.random.default_rng(3), opt, example_id=7, return_debug=True)
  _check_example(out, dbg, [m], opt)
  assert out["prompt_valid"].all() and not out["prompt_mask"].any()
  np.testing.assert_array_equal(out["mask_valid"], [True] + [False] * 7)
  assert out["target_valid"][:, 0].all() and not out["target_valid"][:, 1:].any()
  assert int(out["example_id"]) == 7 and int(out["num_dropped_prompts"]) == 0
  assert len({tuple(c) for c in out["click_xy"]}) > 20   # random pixels, not one
  shapes = {"image": (32, 32, 3), "masks": (8, 32, 4), "mask_valid": (8,), "mask_boxes": (8, 4),
            "click_xy": (60, 2), "prompt_mask": (60,), "prompt_valid": (60,),
            "target_index": (60, 6), "target_valid": (60, 6)}
  for k, s in shapes.items():
    assert out[k].shape == s, k


def _grid_masks(h, w, n):
  """n disjoint 3x3 squares plus one background mask under all of them."""
  masks = []
  per_row = w // 4
  for i in range(n):
    m = np.zeros((h, w), bool)
    y, x = 4 * (i // per_row), 4 * (i % per_row)
    m[y:y + 3, x:x + 3] = True
    masks.append(m)
  masks.append(np.ones((h, w), bool))
  return masks


def test_more_than_60_masks():
  h = w = 48
  masks = _grid_masks(h, w, 70)
  opt = ExampleOptions(image_size=48, min_scale=1.0, max_scale=1.0, mask_pad_value=0)
  img = np.zeros((h, w, 3), np.uint8)
  out, dbg = prepare_example(img, [_rle(m) for m in masks], np.random.default_rng(0), opt,
                             return_debug=True)
  C, prompts = _check_example(out, dbg, masks, opt)
  pm = [p[1] for p in prompts]
  assert len(prompts) == 60 and len(set(pm)) == 60         # distinct masks, no tiling
  # Each click is in the background and at most one square, its prompt mask among them.
  for (x, y), p, tgt, _ in prompts:
    assert 70 in tgt and p in tgt and len(tgt) <= 2
    assert len(tgt) == 2 or p == 70
  assert int(out["mask_valid"].sum()) == len(set(pm) | {70})


def test_mask_slot_overflow_drops_prompts_from_the_end():
  h = w = 48
  masks = _grid_masks(h, w, 70)
  M = 10
  opt = ExampleOptions(image_size=48, min_scale=1.0, max_scale=1.0, mask_pad_value=0,
                       max_masks_per_image=M)
  out, dbg = prepare_example(np.zeros((h, w, 3), np.uint8), [_rle(m) for m in masks],
                             np.random.default_rng(5), opt, return_debug=True)
  C, prompts = _check_example(out, dbg, masks, opt)
  # Independently: the longest prefix of the drawn prompts whose referenced
  # masks (prompt mask + every mask containing the click) fit into M slots.
  kept = dbg["kept"]
  used, n_keep = set(), 0
  for k in range(opt.max_num_instance):
    x, y = dbg["clicks"][k]
    new = used | {int(kept[dbg["index"][k]])} | set(np.flatnonzero(C[:, y, x]).tolist())
    if len(new) > M:
      break
    used, n_keep = new, k + 1
  assert 0 < n_keep < opt.max_num_instance
  assert len(prompts) == n_keep and int(out["num_dropped_prompts"]) == 60 - n_keep
  assert int(out["mask_valid"].sum()) == len(used) <= M


def test_no_mask():
  opt = ExampleOptions(image_size=32)
  out, dbg = prepare_example(np.zeros((20, 30, 3), np.uint8), [], np.random.default_rng(0),
                             opt, return_debug=True)
  _check_example(out, dbg, [], opt)
  assert out["image"].shape == (32, 32, 3)


@pytest.mark.parametrize("scale", [(1.8, 2.0), (0.6, 0.7)])
def test_augmentation_moves_image_masks_boxes_clicks_together(scale):
  """A bright planted rectangle: after flip / resize / crop / pad, the image's
  bright region, the mask, its box and every click agree."""
  H, W = 60, 80
  image = np.full((H, W, 3), 20, np.uint8)
  rect = np.zeros((H, W), bool)
  rect[10:30, 50:70] = True
  image[rect] = 230
  corner = np.zeros((H, W), bool)
  corner[0:2, 0:2] = True          # emptied whenever the crop cuts the left/top edge
  image[corner] = 230
  opt = ExampleOptions(image_size=64, min_scale=scale[0], max_scale=scale[1],
                       mask_pad_value=0, max_num_instance=20)
  flips, dropped, checked = set(), 0, 0
  for seed in range(10):
    out, dbg = prepare_example(image, [_rle(rect), _rle(corner)], np.random.default_rng(seed),
                               opt, return_debug=True)
    C, prompts = _check_example(out, dbg, [rect, corner], opt)
    g = dbg["geometry"]
    flips.add(g.flip)
    assert 0 <= g.off_y <= max(g.new_h - 64, 0) and 0 <= g.off_x <= max(g.new_w - 64, 0)
    f = g.new_w / W
    assert scale[0] * 64 / W - 0.02 <= f <= scale[1] * 64 / W + 0.02
    # Box of the rectangle predicted from the geometry (within a pixel).
    c0, c1 = (W - 70, W - 50) if g.flip else (50, 70)
    want = np.clip([c0 * f - g.off_x, 10 * g.new_h / H - g.off_y,
                    c1 * f - g.off_x, 30 * g.new_h / H - g.off_y],
                   0, [g.valid_w, g.valid_h, g.valid_w, g.valid_h])
    if 0 not in dbg["kept"]:     # the crop removed the rectangle
      assert want[2] - want[0] < 1 or want[3] - want[1] < 1
      continue
    slot = list(dbg["kept"][dbg["slots"]]).index(0)
    np.testing.assert_allclose(out["mask_boxes"][slot], want, atol=1.01)
    # The image is bright inside the mask and dark outside (away from edges).
    m = _unpack(out["masks"][slot])
    img = out["image"].astype(int).mean(-1)
    inner = m.copy()
    for dy, dx in [(-2, 0), (2, 0), (0, -2), (0, 2), (-1, -1), (1, 1), (-1, 1), (1, -1)]:
      inner &= np.roll(m, (dy, dx), (0, 1))
    outer = ~m
    for dy, dx in [(-2, 0), (2, 0), (0, -2), (0, 2), (-1, -1), (1, 1), (-1, 1), (1, -1)]:
      outer &= ~np.roll(m, (dy, dx), (0, 1))
    # ... leaving out what the bilinear resize blurs from the 2x2 corner.
    yy, xx = np.mgrid[0:64, 0:64]
    src_y = (yy + g.off_y + 0.5) * H / g.new_h
    src_x = (xx + g.off_x + 0.5) * W / g.new_w
    src_x = W - src_x if g.flip else src_x
    outer &= ~((src_y < 5) & (src_x < 5))
    valid = np.zeros((64, 64), bool)
    valid[:g.valid_h, :g.valid_w] = True
    assert (img[inner] > 200).all()
    checked += int(inner.sum() > 20)
    assert (img[outer & valid] < 50).all()
    assert (out["image"][~valid] == 128).all()
    # Clicks on the rectangle land on bright pixels.
    for (x, y), p, _, _ in prompts:
      if p == 0:
        assert img[y, x] > 50   # edge pixels blend with the background
    dropped += int(1 not in dbg["kept"])
  assert flips == {True, False} and checked >= 5
  if scale[0] > 1:
    assert dropped > 0      # the corner mask was emptied by a crop at least once
