"""Importers of common custom data into the SA-1B features.

- COCO instance JSON (:func:`build_coco`): polygons, compressed and
  uncompressed RLE, ``iscrowd`` (crowd regions are left out by default, as the
  reference mapper drops ``iscrowd != 0`` annotations; ``crowd="keep"`` keeps
  them as ordinary masks).
- Mask folders (:func:`build_masks`), one of two layouts per image ``<stem>``
  of IMAGE_DIR (``.jpg``/``.jpeg``/``.png``):

  * ``MASK_DIR/<stem>/*.png`` -- one PNG per instance; every nonzero pixel is
    in the instance; instances in file-name order.
  * ``MASK_DIR/<stem>.png`` -- one label PNG: every distinct nonzero value
    (grey or palette index; for RGB(A) PNGs every distinct colour other than
    black) is one instance, in increasing value order; values listed in
    ``ignore_values`` are neither background nor instance.

Images whose masks cannot be used are reported and skipped as a whole (an
image with a missing mask would teach the model that the region is not an
object).  The boxes are those of the masks, the ``point_coords`` the box
centre, ``predicted_iou`` and ``stability_score`` 1.
"""

from __future__ import annotations

import io
import json
import os
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from semsam_jax.data import builder as B

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _rle_record(rle: dict, ann_id: int, area=None, bbox=None) -> dict:
  counts = rle["counts"]
  if isinstance(counts, bytes):
    counts = counts.decode("ascii")
  rec = {"id": int(ann_id), "segmentation": {"size": [int(v) for v in rle["size"]], "counts": counts}}
  enc = {"size": rec["segmentation"]["size"], "counts": counts.encode("ascii")}
  rec["area"] = int(mask_utils.area(enc)) if area is None else int(area)
  rec["bbox"] = [float(v) for v in (mask_utils.toBbox(enc) if bbox is None else bbox)]
  return rec


def _mask_record(mask: np.ndarray, ann_id: int) -> dict:
  return _rle_record(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))), ann_id)


def coco_segmentation_to_rle(seg, height: int, width: int) -> dict:
  """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> compressed RLE."""
  if isinstance(seg, list):
    if not seg or any(not isinstance(p, (list, tuple)) or len(p) < 6 or len(p) % 2 for p in seg):
      raise ValueError("polygon with fewer than 3 points or an odd number of coordinates")
    rles = mask_utils.frPyObjects([[float(v) for v in p] for p in seg], height, width)
    return mask_utils.merge(rles)
  if isinstance(seg, dict) and "counts" in seg and "size" in seg:
    size = [int(v) for v in seg["size"]]
    if size != [height, width]:
      raise ValueError(f"RLE size {size} != image size [{height}, {width}]")
    if isinstance(seg["counts"], list):
      if sum(int(c) for c in seg["counts"]) != height * width:
        raise ValueError("uncompressed RLE does not cover the image")
      return mask_utils.frPyObjects(seg, height, width)
    counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
    from semsam_jax.data.transforms import rle_intervals
    try:
      rle_intervals(counts, height, width)  # pycocotools' decode accepts short RLEs
    except (ValueError, UnicodeEncodeError) as e:
      raise ValueError(f"RLE does not decode ({e})") from None
    return {"size": size, "counts": counts}
  raise ValueError(f"unknown segmentation of type {type(seg).__name__}")


def _load_coco_image(item):
  path, info, anns, crowd = item
  read = B.read_image_file(path)
  if isinstance(read, B.Skipped):
    return read
  data, h, w = read
  jh, jw = int(info.get("height", h)), int(info.get("width", w))
  if (jh, jw) != (h, w):
    return B.Skipped(path, f"COCO image size {jh}x{jw} != image file {h}x{w}")
  records = []
  for a in anns:
    if a.get("iscrowd", 0) and crowd == "skip":
      continue
    try:
      rle = coco_segmentation_to_rle(a.get("segmentation"), h, w)
    except Exception as e:
      return B.Skipped(path, f"annotation {a.get('id')}: {e}")
    rec = _rle_record(rle, a.get("id", len(records)))
    if mask_utils.area(rle) == 0:
      continue  # empty after rasterisation: nothing to learn from
    records.append(rec)
  if not records:
    return B.Skipped(path, "no usable annotation")
  ex = B.make_example(data, str(info["file_name"]), int(info["id"]), h, w, records)
  return os.path.abspath(path) + f"#{info['id']}", ex


def build_coco(annotations: str, image_dir: str, data_dir: str, *, split: str = "train",
               crowd: str = "skip", num_workers: int = 1, progress: bool = True,
               log=print) -> B.BuildReport:
  """Builds a COCO instance JSON (+ its image folder) into ``data_dir``."""
  if crowd not in ("skip", "keep"):
    raise ValueError(f"crowd={crowd!r}: 'skip' or 'keep'")
  try:
    with open(annotations) as f:
      coco = json.load(f)
    images = coco["images"]
    anns = coco.get("annotations", [])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{annotations}: not a COCO instance JSON ({e})") from None
  by_image: dict = {}
  for a in anns:
    by_image.setdefault(a.get("image_id"), []).append(a)
  items = [(os.path.join(image_dir, im["file_name"]), im, by_image.get(im["id"], []), crowd)
           for im in images]
  report = B.BuildReport()
  key = B.part_key(annotations, split, f"coco|{os.path.abspath(image_dir)}|{crowd}")
  built_now, n, skipped = B.build_part(data_dir, split, key, annotations, items,
                                       _load_coco_image, num_workers=num_workers,
                                       progress=progress, log=log)
  _account(report, built_now, n, skipped, log)
  B.assemble(data_dir, log=log)
  return report


def _account(report, built_now, n, skipped, log, extra=()):
  if not built_now:
    for s in skipped:
      log(f"skip {s.path}: {s.reason} (reported when the part was built)")
  report.built += n
  report.skipped += list(extra) + list(skipped)
  report.parts_built += int(built_now)
  report.parts_reused += int(not built_now)


def _read_png(path: str) -> np.ndarray:
  from PIL import Image
  with Image.open(path) as im:
    im.load()
    if im.mode in ("RGB", "RGBA"):
      a = np.asarray(im.convert("RGB")).astype(np.int64)
      return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
    if im.mode in ("P", "L", "1", "I", "I;16"):
      return np.asarray(im).astype(np.int64)
    return np.asarray(im.convert("L")).astype(np.int64)


def _load_mask_image(item):
  path, mask_src, ignore, image_id = item
  read = B.read_image_file(path)
  if isinstance(read, B.Skipped):
    return read
  data, h, w = read
  masks = []
  try:
    if os.path.isdir(mask_src):
      files = sorted(f for f in os.listdir(mask_src) if f.lower().endswith(".png"))
      if not files:
        return B.Skipped(mask_src, "mask folder without PNG")
      for f in files:
        a = _read_png(os.path.join(mask_src, f))
        if a.shape != (h, w):
          return B.Skipped(os.path.join(mask_src, f), f"mask size {a.shape[0]}x{a.shape[1]} != image {h}x{w}")
        masks.append(a != 0)
    else:
      a = _read_png(mask_src)
      if a.shape != (h, w):
        return B.Skipped(mask_src, f"mask size {a.shape[0]}x{a.shape[1]} != image {h}x{w}")
      for v in np.unique(a):
        if v != 0 and int(v) not in ignore:
          masks.append(a == v)
  except Exception as e:
    return B.Skipped(mask_src, f"unreadable mask PNG ({type(e).__name__}: {e})")
  records = [_mask_record(m, k) for k, m in enumerate(masks) if m.any()]
  if not records:
    return B.Skipped(mask_src, "no nonzero mask")
  ex = B.make_example(data, os.path.basename(path), image_id, h, w, records)
  return os.path.abspath(path), ex


def scan_mask_folders(image_dir: str, mask_dir: str, ignore_values: Sequence[int] = ()):
  for d in (image_dir, mask_dir):
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{d}: not a folder")
  images = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(image_dir))
            if f.lower().endswith(IMAGE_EXTS)}
  masks = {}
  for f in sorted(os.listdir(mask_dir)):
    p = os.path.join(mask_dir, f)
    if os.path.isdir(p):
      masks[f] = p
    elif f.lower().endswith(".png"):
      masks.setdefault(os.path.splitext(f)[0], p)
  items, unpaired = [], []
  for i, stem in enumerate(sorted(set(images) | set(masks))):
    if stem not in masks:
      unpaired.append(B.Skipped(os.path.join(image_dir, images[stem]), "image without masks"))
    elif stem not in images:
      unpaired.append(B.Skipped(masks[stem], "masks without image"))
    else:
      items.append((os.path.join(image_dir, images[stem]), masks[stem],
                    tuple(int(v) for v in ignore_values), len(items) + 1))
  return items, unpaired


def build_masks(image_dir: str, mask_dir: str, data_dir: str, *, split: str = "train",
                ignore_values: Sequence[int] = (), num_workers: int = 1,
                progress: bool = True, log=print) -> B.BuildReport:
  """Builds an image folder + mask folder (layouts in the module docstring)."""
  items, unpaired = scan_mask_folders(image_dir, mask_dir, ignore_values)
  for s in unpaired:
    log(f"skip {s.path}: {s.reason}")
  report = B.BuildReport()
  key = B.part_key(mask_dir, split, f"masks|{os.path.abspath(image_dir)}|{sorted(ignore_values)}")
  built_now, n, skipped = B.build_part(data_dir, split, key, mask_dir, items, _load_mask_image,
                                       num_workers=num_workers, progress=progress, log=log)
  _account(report, built_now, n, skipped, log, extra=unpaired)
  B.assemble(data_dir, log=log)
  return report
