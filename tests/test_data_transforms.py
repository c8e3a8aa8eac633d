"""The fast mask path (RLE pieces) against a naive re-implementation of the
reference (decode every mask, detectron2-style flip / PIL-nearest resize /
crop / pad with seg_pad_value, BitMasks boxes)."""

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from semsam_jax.data import transforms as T
from semsam_jax.data.pipeline import ExampleOptions, prepare_example


def _random_masks(rng, h, w, n):
  masks = []
  yy, xx = np.mgrid[0:h, 0:w]
  for i in range(n):
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(1, h / 2), rng.uniform(1, w / 2)
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if i % 3 == 0:
      m &= rng.random((h, w)) < 0.7  # ragged: many short runs
    if i == 0:
      m = np.zeros((h, w), bool)
      m[h - 1, w - 1] = True          # single pixel in a corner
    masks.append(m)
  return masks


def _rle(m):
  return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"]


def _naive(masks, g, pad_value):
  """Masks on the canvas the way detectron2 + fvcore compute them."""
  out = []
  for m in masks:
    a = m.astype(np.uint8)
    if g.flip:
      a = a[:, ::-1]
    a = np.asarray(Image.fromarray(np.ascontiguousarray(a), mode="L")
                   .resize((g.new_w, g.new_h), Image.NEAREST))
    a = a[g.off_y:g.off_y + g.size, g.off_x:g.off_x + g.size]
    c = np.full((g.size, g.size), pad_value, np.uint8)
    c[:a.shape[0], :a.shape[1]] = a
    out.append(c.astype(bool))
  return np.stack(out)


def _boxes(stack):
  b = np.zeros((len(stack), 4), np.float32)
  for i, m in enumerate(stack):
    ys, xs = np.nonzero(m)
    if len(xs):
      b[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  return b


def test_rle_counts_match_pycocotools():
  rng = np.random.default_rng(0)
  for m in _random_masks(rng, 37, 53, 12) + [np.ones((37, 53), bool), np.zeros((37, 53), bool)]:
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    s, e = T.rle_intervals(rle["counts"], 37, 53)
    flat = np.zeros(37 * 53, bool)
    for a, b in zip(s, e):
      flat[a:b] = True
    np.testing.assert_array_equal(flat.reshape(53, 37).T, m)


def test_rle_garbage_raises():
  with pytest.raises(ValueError):
    T.rle_intervals(b"\x01\x02", 4, 4)
  with pytest.raises(ValueError):
    T.rle_intervals(b"31", 4, 4)  # covers 3 + 1 pixels of 16


def test_nearest_map_is_pil():
  rng = np.random.default_rng(1)
  for src, dst in [(150, 100), (100, 150), (1500, 683), (7, 7), (31, 1024)]:
    a = (rng.random((3, src)) < 0.5).astype(np.uint8) * 255
    ref = np.asarray(Image.fromarray(a, mode="L").resize((dst, 3), Image.NEAREST))
    np.testing.assert_array_equal(a[:, T.nearest_map(src, dst)], ref)


@pytest.mark.parametrize("hw,size,scale,flip,pad", [
    ((90, 140), 64, (0.99, 1.01), True, 255),    # wide: pad at the bottom
    ((140, 90), 64, (1.3, 1.5), False, 255),     # upscaled: random crop + pad right
    ((140, 90), 64, (1.3, 1.5), True, 0),
    ((64, 64), 64, (0.5, 0.6), True, 255),       # both pads
    ((80, 80), 64, (1.6, 1.8), True, 0),         # crop on both axes, no pad
])
def test_pieces_match_naive(hw, size, scale, flip, pad):
  h, w = hw
  rng = np.random.default_rng(abs(hash((hw, size, flip, pad))) % 2**32)
  masks = _random_masks(rng, h, w, 9)
  rles = [_rle(m) for m in masks]
  for trial in range(3):
    g = T.draw_geometry(rng, h, w, size, *scale, "horizontal")
    g.flip = flip if trial == 0 else g.flip
    ref = _naive(masks, g, pad)
    p = T.mask_pieces(rles, g)
    total = p.count + (T.pad_pixel_count(g) if pad else 0)
    np.testing.assert_array_equal(total, ref.reshape(len(ref), -1).sum(1))
    which = np.arange(len(masks))
    packed = T.packed_canvas(p, which, g, pad != 0)
    np.testing.assert_array_equal(np.unpackbits(packed, axis=-1, bitorder="little").astype(bool), ref)
    nonempty = np.flatnonzero(total > 0)
    np.testing.assert_array_equal(T.boxes_of(p, nonempty, g, pad != 0), _boxes(ref[nonempty]))
    xy = np.stack([rng.integers(0, size, 200), rng.integers(0, size, 200)], -1)
    np.testing.assert_array_equal(T.contains(p, g, xy, pad != 0), ref[:, xy[:, 1], xy[:, 0]].T)
    for m in nonempty:
      clicks = T.sample_pixels(rng, p, np.full(50, m), g, pad != 0)
      assert ref[m, clicks[:, 1], clicks[:, 0]].all()


def test_transform_image_is_detectron2_order():
  rng = np.random.default_rng(3)
  img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
  g = T.Geometry(50, 70, True, 40, 56, 0, 0, 64)
  out = T.transform_image(img, g)
  ref = np.asarray(Image.fromarray(np.ascontiguousarray(img[:, ::-1])).resize((56, 40), Image.BILINEAR))
  np.testing.assert_array_equal(out[:40, :56], ref)
  assert (out[40:] == 128).all() and (out[:, 56:] == 128).all()
