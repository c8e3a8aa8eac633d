"""Importers (COCO JSON, mask folders) give the expected masks, read back
through plain TFDS; damaged images are reported and skipped."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils

from semsam_jax.data import __main__ as cli
from semsam_jax.data import builder as B
from semsam_jax.data import importers

H, W = 24, 32


def _read_back(data_dir, split="train"):
  """file_name -> (image_id, masks (N, H, W) bool, TFDS boxes (N, 4))."""
  b = tfds.builder_from_directory(os.path.join(str(data_dir), B.BUILDER_NAME, B.VERSION))
  ds = b.as_data_source(split)
  out = {}
  for i in range(len(ds)):
    ex = ds[i]
    h, w = int(ex["image"]["height"]), int(ex["image"]["width"])
    counts = ex["annotations"]["segmentation"]["counts"]
    m = mask_utils.decode([{"size": [h, w], "counts": c} for c in counts])
    fn = ex["image"]["file_name"]
    fn = fn.decode() if isinstance(fn, bytes) else fn
    out[fn] = (int(ex["image"]["image_id"]), np.moveaxis(m, -1, 0).astype(bool),
               np.asarray(ex["annotations"]["bbox"]), list(ex["annotations"]["id"]))
  return out


def _tfds_boxes(masks):
  """[ymin, xmin, ymax, xmax] / size of the masks' pixel boxes (XYWH with w = x1 - x0 + 1)."""
  out = []
  h, w = masks.shape[1:]
  for m in masks:
    ys, xs = np.nonzero(m)
    out.append([ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w])
  return np.asarray(out, np.float32)


def _ellipse(cy, cx, ry, rx, h=H, w=W):
  yy, xx = np.mgrid[0:h, 0:w]
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _uncompressed(m):
  """COCO uncompressed RLE of a mask, written independently of pycocotools."""
  flat = m.T.reshape(-1).astype(np.int8)          # column-major
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat[0]:
    runs = [0] + runs
  return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(r) for r in runs]}


def _decode_uncompressed(seg):
  h, w = seg["size"]
  vals = np.arange(len(seg["counts"])) % 2
  return np.repeat(vals, seg["counts"]).astype(bool).reshape(w, h).T


def _save(path, arr, mode=None):
  Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)


@pytest.fixture
def coco(tmp_path):
  rng = np.random.default_rng(0)
  imgs = tmp_path / "images"
  imgs.mkdir()
  for name in ("a.png", "b.jpg", "c.png", "d.png", "e.png"):
    _save(imgs / name, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
  poly = [[2, 2, 12, 2, 12, 9, 2, 9], [20, 14, 30, 22, 18, 22]]   # a rectangle and a triangle
  rle_mask = _ellipse(12, 16, 6, 9)
  rle = mask_utils.encode(np.asfortranarray(rle_mask.astype(np.uint8)))
  unc_mask = _ellipse(5, 25, 4, 5) | _ellipse(20, 4, 3, 3)
  crowd_mask = _ellipse(18, 16, 5, 14)
  anns = [
      dict(id=11, image_id=1, iscrowd=0, segmentation=poly),
      dict(id=12, image_id=1, iscrowd=0, segmentation={"size": [H, W],
                                                       "counts": rle["counts"].decode()}),
      dict(id=13, image_id=1, iscrowd=1, segmentation=_uncompressed(crowd_mask)),
      dict(id=14, image_id=1, iscrowd=0, segmentation=_uncompressed(unc_mask)),
      dict(id=21, image_id=2, iscrowd=0, segmentation=[[1, 1, 20, 1, 20, 20]]),
      dict(id=31, image_id=3, iscrowd=0, segmentation=[[1, 1, 5, 1, 5]]),          # odd polygon
      dict(id=51, image_id=5, iscrowd=0, segmentation={"size": [H + 1, W],          # wrong size
                                                       "counts": rle["counts"].decode()}),
      dict(id=41, image_id=4, iscrowd=0, segmentation=poly),
  ]
  images = [dict(id=1, file_name="a.png", height=H, width=W),
            dict(id=2, file_name="b.jpg", height=H, width=W),
            dict(id=3, file_name="c.png", height=H, width=W),
            dict(id=4, file_name="missing.png", height=H, width=W),
            dict(id=5, file_name="d.png", height=H, width=W),
            dict(id=6, file_name="e.png", height=H, width=W)]     # no annotation
  path = tmp_path / "instances.json"
  path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))

  def polys(ps):
    out = np.zeros((H, W), bool)
    for p in ps:   # each polygon on its own, then OR
      out |= mask_utils.decode(mask_utils.frPyObjects([p], H, W))[..., 0].astype(bool)
    return out

  expected = {"a.png": [(11, polys(poly)), (12, rle_mask), (13, crowd_mask), (14, unc_mask)],
              "b.jpg": [(21, polys([[1, 1, 20, 1, 20, 20]]))]}
  assert (_decode_uncompressed(_uncompressed(unc_mask)) == unc_mask).all()
  return path, imgs, expected


@pytest.mark.parametrize("crowd", ["skip", "keep"])
def test_coco_import(tmp_path, coco, crowd, capsys):
  path, imgs, expected = coco
  out = tmp_path / f"data-{crowd}"
  rc = cli.main(["build-coco", str(path), str(imgs), "--output", str(out), "--crowd", crowd,
                 "--workers", "1", "--no-progress"])
  cap = capsys.readouterr()
  assert rc == 0, cap.err
  skips = sorted(l for l in cap.err.splitlines() if l.startswith("skip "))
  assert len(skips) == 4, cap.err
  reasons = {"c.png": "annotation 31: polygon with fewer than 3 points or an odd number",
             "missing.png": "cannot read image",
             "d.png": "annotation 51: RLE size [25, 32] != image size [24, 32]",
             "e.png": "no usable annotation"}
  for name, reason in reasons.items():
    assert any(l.startswith(f"skip {imgs / name}: ") and reason in l for l in skips), (name, skips)
  assert "train: built 2 examples, skipped 4 " in cap.out
  got = _read_back(out)
  assert sorted(got) == ["a.png", "b.jpg"]
  for name, want in expected.items():
    if crowd == "skip":
      want = [(i, m) for i, m in want if i != 13]   # the reference drops iscrowd regions
    image_id, masks, boxes, ids = got[name]
    assert image_id == {"a.png": 1, "b.jpg": 2}[name]
    assert ids == [i for i, _ in want]
    np.testing.assert_array_equal(masks, np.stack([m for _, m in want]))
    np.testing.assert_allclose(boxes, _tfds_boxes(masks), atol=1e-6)


def test_coco_not_a_coco_json(tmp_path):
  p = tmp_path / "x.json"
  p.write_text("[1, 2")
  assert cli.main(["build-coco", str(p), str(tmp_path), "-o", str(tmp_path / "d"),
                   "--no-progress"]) == 1


def test_mask_folders_both_layouts(tmp_path, capsys):
  rng = np.random.default_rng(1)
  imgs, masks = tmp_path / "images", tmp_path / "masks"
  imgs.mkdir()
  masks.mkdir()
  for name in ("p.png", "q.jpg", "r.png", "s.png", "t.png", "u.png"):
    _save(imgs / name, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
  expected = {}
  # Layout 1: one PNG per instance (8-bit grey, 1-bit, RGB), file-name order.
  (masks / "p").mkdir()
  inst = [_ellipse(8, 8, 5, 6), _ellipse(15, 20, 6, 8), _ellipse(12, 16, 3, 3)]
  _save(masks / "p" / "00.png", inst[0].astype(np.uint8) * 255)
  Image.fromarray(inst[1]).convert("1").save(masks / "p" / "01.png")
  rgb = np.zeros((H, W, 3), np.uint8)
  rgb[inst[2]] = (0, 0, 7)
  _save(masks / "p" / "02.png", rgb)
  expected["p.png"] = inst
  # Layout 2: one label PNG per image; 255 is "ignore".
  lab = np.zeros((H, W), np.uint8)
  lab[_ellipse(10, 10, 6, 8)] = 7
  lab[_ellipse(16, 22, 5, 6)] = 3
  lab[0, :] = 255
  _save(masks / "q.png", lab)
  expected["q.jpg"] = [lab == 3, lab == 7]
  # RGB label image: each colour but black is an instance.
  rgb = np.zeros((H, W, 3), np.uint8)
  a, b = _ellipse(6, 6, 4, 5), _ellipse(16, 24, 6, 6)
  rgb[a] = (200, 10, 10)
  rgb[b] = (0, 90, 250)
  _save(masks / "r.png", rgb)
  expected["r.png"] = [b & ~a, a]   # increasing colour value (0x005AFA < 0xC80A0A)
  # Palette label image.
  pal = np.zeros((H, W), np.uint8)
  pal[_ellipse(12, 16, 8, 12)] = 2
  pal[_ellipse(12, 16, 3, 4)] = 1
  im = Image.fromarray(pal, mode="P")
  im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
  im.save(masks / "s.png")
  expected["s.png"] = [pal == 1, pal == 2]
  # Damaged: wrong mask size; an image without masks; masks without an image.
  _save(masks / "t.png", np.ones((H + 2, W), np.uint8))
  _save(masks / "v.png", np.ones((H, W), np.uint8))
  out = tmp_path / "data"
  rc = cli.main(["build-masks", str(imgs), str(masks), "--output", str(out),
                 "--ignore-value", "255", "--workers", "1", "--no-progress"])
  cap = capsys.readouterr()
  assert rc == 0, cap.err
  skips = [l for l in cap.err.splitlines() if l.startswith("skip ")]
  assert len(skips) == 3, cap.err
  for path, reason in [(masks / "t.png", "mask size 26x32 != image 24x32"),
                       (imgs / "u.png", "image without masks"),
                       (masks / "v.png", "masks without image")]:
    assert any(l.startswith(f"skip {path}: ") and reason in l for l in skips), (path, skips)
  assert "train: built 4 examples, skipped 3 " in cap.out
  got = _read_back(out)
  assert sorted(got) == sorted(expected)
  for name, want in expected.items():
    _, m, boxes, ids = got[name]
    np.testing.assert_array_equal(m, np.stack(want), err_msg=name)
    np.testing.assert_allclose(boxes, _tfds_boxes(m), atol=1e-6)
    assert ids == list(range(len(want)))
