"""Evaluation inputs: COCO instance annotations or datasets built by
:mod:`semsam_jax.data`, as a stream of :class:`EvalImage`.

Problems with single images or annotations never stop an evaluation: they are
recorded in a :class:`SkipLog` (reported at the end and written to the JSON)
and the item is left out.  What is skipped:

* images that cannot be read or decoded (missing file, broken file, size
  different from the one the annotation file states);
* images without any usable annotation (nothing to click on);
* annotations whose mask is empty (after resizing, if any) or cannot be decoded
  (an RLE whose runs do not cover exactly the image, a polygon with
  non-finite coordinates or far outside the image, an area that is not a
  finite non-negative number, a segmentation of an unknown type);
* images with more than ``max_instances`` non-crowd annotations (COCO) or
  non-empty masks (their prompts are scored in one step, whose memory grows
  with the square of their number).

A file that is not a COCO instance file at all (not JSON, ``images`` or
``annotations`` missing or malformed) is an error, not a skip.

Resizing follows the original's test-time mapper (detectron2's
``ResizeShortestEdge(800, 1333)``): the image is resized with PIL bilinear to
the size ``get_output_shape`` gives, polygons are scaled and rasterised at the
new size and RLE masks are resized with nearest neighbour, as detectron2 does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import warnings
from typing import Iterator, Optional

import numpy as np

# The original's COCO test resize (MIN_SIZE_TEST, MAX_SIZE_TEST).
COCO_MIN_SIZE = 800
COCO_MAX_SIZE = 1333


@dataclasses.dataclass
class EvalImage:
  image_id: str
  image: np.ndarray          # (H, W, 3) uint8 RGB, as the model sees it
  masks: np.ndarray          # (N, H, W) bool, N >= 1, none empty
  areas: np.ndarray          # (N,) float64: area for the COCO area ranges
  ann_ids: list              # (N,) annotation ids (or mask indices)
  position: int = -1         # index of the image in the dataset's order (id order for COCO)


class SkipLog:
  """Everything left out of an evaluation, with the reason."""

  def __init__(self):
    self.entries: list[dict] = []
    self.positions: list[int] = []   # dataset position of each entry's image
    self.position = -1               # set by the readers before each image

  def add(self, kind: str, image_id, detail: str, ann_id=None) -> None:
    e = {"kind": kind, "image_id": str(image_id), "detail": detail}
    if ann_id is not None:
      e["ann_id"] = str(ann_id)
    self.entries.append(e)
    self.positions.append(int(self.position))

  @classmethod
  def merged(cls, logs, up_to: Optional[int] = None) -> "SkipLog":
    """The entries of several logs (shards of one dataset) in dataset order;
    ``up_to``: only those of images at positions <= it."""
    out = cls()
    both = sorted(((p, i, j) for i, log in enumerate(logs) for j, p in enumerate(log.positions)))
    for p, i, j in both:
      if up_to is None or p <= up_to:
        out.entries.append(logs[i].entries[j])
        out.positions.append(p)
    return out

  def counts(self) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in self.entries:
      out[e["kind"]] = out.get(e["kind"], 0) + 1
    return out

  def summary(self, max_lines: int = 10) -> str:
    if not self.entries:
      return "nothing skipped"
    lines = [", ".join(f"{v} {k}" for k, v in sorted(self.counts().items())) + " skipped:"]
    for e in self.entries[:max_lines]:
      ann = f" annotation {e['ann_id']}" if "ann_id" in e else ""
      lines.append(f"  {e['kind']}: image {e['image_id']}{ann}: {e['detail']}")
    if len(self.entries) > max_lines:
      lines.append(f"  ... {len(self.entries) - max_lines} more (see the JSON report)")
    return "\n".join(lines)


def resized_shape(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
  """detectron2 ``ResizeShortestEdge.get_output_shape`` (0 disables resizing)."""
  if short_edge <= 0:
    return h, w
  size = short_edge * 1.0
  scale = size / min(h, w)
  if h < w:
    newh, neww = size, scale * w
  else:
    newh, neww = scale * h, size
  if max_size > 0 and max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh, neww = newh * scale, neww * scale
  return int(newh + 0.5), int(neww + 0.5)


def _resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  if image.shape[:2] == tuple(hw):
    return image
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def _resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  if mask.shape == tuple(hw):
    return mask
  from PIL import Image
  m = Image.fromarray(mask.astype(np.uint8)).resize((hw[1], hw[0]), Image.NEAREST)
  return np.asarray(m).astype(bool)


def read_image(path) -> np.ndarray:
  """RGB uint8 (H, W, 3); raises OSError / ValueError with the file name."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise OSError(f"image not found: {path}") from None
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise OSError(f"cannot read image {path}: {e}") from None


# --------------------------------------------------------------------------
# COCO instance annotations

# Polygon vertices may lie outside the image (they are clipped when
# rasterised), but not farther than this many image sizes: pycocotools'
# rasteriser allocates memory in proportion to the polygon's perimeter.
POLYGON_MARGIN = 4


def _check_rle_counts(counts, h: int, w: int) -> None:
  """pycocotools' decoder trusts the runs (too long ones overrun its buffer,
  short ones leave pixels unset): the runs must cover exactly h * w pixels."""
  if isinstance(counts, list):
    c = np.asarray(counts)
    if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
      raise ValueError("uncompressed RLE counts must be a list of integers")
    if (c < 0).any() or int(c.sum()) != h * w:
      raise ValueError(f"RLE counts do not cover a {h}x{w} mask")
    return
  if not isinstance(counts, (str, bytes)):
    raise ValueError(f"RLE counts is a {type(counts).__name__}")
  from semsam_jax.data.transforms import rle_intervals
  try:
    rle_intervals(counts, h, w)
  except UnicodeEncodeError:
    raise ValueError("RLE counts hold non-ASCII characters") from None


def _coco_mask(ann: dict, h: int, w: int, new_hw: tuple[int, int]) -> np.ndarray:
  """Decodes one annotation's segmentation at the evaluation size."""
  from pycocotools import mask as mask_utils
  seg = ann.get("segmentation")
  if seg is None:
    raise ValueError("annotation has no segmentation")
  nh, nw = new_hw
  if isinstance(seg, list):  # polygons: scale the coordinates, rasterise at the new size
    polys = []
    for p in seg:
      p = np.asarray(p, np.float64)
      if p.ndim != 1 or p.size % 2:
        raise ValueError("a polygon must be a flat list of x, y coordinates")
      p = p.reshape(-1, 2)
      if not np.isfinite(p).all():
        raise ValueError("polygon with non-finite coordinates")
      lim = POLYGON_MARGIN * max(h, w)
      if (np.abs(p) > lim + np.array([w, h])).any():
        raise ValueError(f"polygon vertex more than {POLYGON_MARGIN} image sizes outside "
                         "the image")
      polys.append(p * [nw / w, nh / h])
    polys = [p.ravel().tolist() for p in polys if p.size >= 6]
    if not polys:
      raise ValueError("polygon segmentation with fewer than 3 points")
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, nh, nw))
    return mask_utils.decode(rle).astype(bool)
  if isinstance(seg, dict):
    size = seg.get("size")
    if not isinstance(size, (list, tuple)) or [int(v) for v in size] != [h, w]:
      raise ValueError(f"RLE size {size} differs from the image size {[h, w]}")
    counts = seg.get("counts")
    _check_rle_counts(counts, h, w)
    if isinstance(counts, list):
      rle = mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
    else:
      rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    return _resize_mask(mask_utils.decode(rle).astype(bool), new_hw)
  raise ValueError(f"unsupported segmentation type {type(seg).__name__}")


def _area(ann: dict, mask: np.ndarray) -> float:
  if "area" not in ann:
    return float(mask.sum())
  a = ann["area"]
  if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
    raise ValueError(f"area {a!r} is not a finite non-negative number")
  return float(a)


def _check_shard(shard) -> tuple[int, int]:
  index, count = (int(v) for v in shard)
  if not 0 <= index < count:
    raise ValueError(f"shard {index} not in [0, {count})")
  return index, count


def iter_coco(annotation_file, image_dir, num_images: Optional[int] = None,
              min_size: int = COCO_MIN_SIZE, max_size: int = COCO_MAX_SIZE,
              skipped: Optional[SkipLog] = None, shard: tuple[int, int] = (0, 1),
              max_instances: Optional[int] = None) -> Iterator[EvalImage]:
  """Images of a COCO instance JSON in id order, with their non-crowd masks.

  ``num_images`` counts images that are actually evaluated (skipped ones do
  not count).  ``min_size`` / ``max_size``: the test-time resize (0: none).
  ``shard = (i, n)``: only the images at positions ``i, i + n, ...`` of the
  id order (one process's share; ``num_images`` then counts that share's).
  ``max_instances``: images with more non-crowd annotations are skipped.
  """
  index, count = _check_shard(shard)
  from pycocotools.coco import COCO
  import contextlib, io
  skipped = SkipLog() if skipped is None else skipped
  annotation_file = pathlib.Path(annotation_file)
  if not annotation_file.is_file():
    raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      coco = COCO(str(annotation_file))
  except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
    raise ValueError(f"{annotation_file}: not a COCO instance annotation file ({e})") from None
  done = 0
  for position, img_id in enumerate(sorted(coco.getImgIds())):
    if position % count != index:
      continue
    if num_images is not None and done >= num_images:
      return
    skipped.position = position
    info = coco.loadImgs(img_id)[0]
    anns = []
    for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
      if not isinstance(a, dict):
        skipped.add("bad_annotation", img_id, f"annotation is a {type(a).__name__}")
      elif not a.get("iscrowd", 0):
        anns.append(a)
    if not anns:
      skipped.add("image_without_annotations", img_id, "no non-crowd annotation")
      continue
    if max_instances is not None and len(anns) > max_instances:
      skipped.add("too_many_instances", img_id, f"{len(anns)} annotations > max_instances "
                  f"{max_instances}")
      continue
    try:
      if not isinstance(info.get("file_name"), str):
        raise OSError(f"file_name {info.get('file_name')!r} is not a string")
      path = pathlib.Path(image_dir) / info["file_name"]
      image = read_image(path)
      h, w = image.shape[:2]
      if "height" in info and "width" in info:
        try:
          size = (int(info["height"]), int(info["width"]))
        except (TypeError, ValueError):
          raise OSError(f"height/width {info['height']!r}x{info['width']!r} are not "
                        "integers") from None
        if size != (h, w):
          raise OSError(f"{path}: size {w}x{h} differs from the annotation file's "
                        f"{info['width']}x{info['height']}")
    except OSError as e:
      skipped.add("unreadable_image", img_id, str(e))
      continue
    new_hw = resized_shape(h, w, min_size, max_size)
    masks, areas, ids = [], [], []
    for a in anns:
      try:
        m = _coco_mask(a, h, w, new_hw)
        area = _area(a, m)
      except (ValueError, TypeError, OverflowError) as e:
        skipped.add("bad_annotation", img_id, str(e), a.get("id"))
        continue
      if not m.any():
        skipped.add("empty_mask", img_id, "mask has no pixel", a.get("id"))
        continue
      masks.append(m)
      areas.append(area)
      ids.append(a.get("id"))
    if not masks:
      skipped.add("image_without_annotations", img_id, "every annotation was skipped")
      continue
    done += 1
    yield EvalImage(str(img_id), _resize_image(image, new_hw), np.stack(masks),
                    np.asarray(areas, np.float64), ids, position)


# --------------------------------------------------------------------------
# Datasets built by semsam_jax.data (SA-1B format)

def iter_semsam_data(data_dir, split: str, num_images: Optional[int] = None,
                     min_size: int = 0, max_size: int = 0,
                     skipped: Optional[SkipLog] = None, shard: tuple[int, int] = (0, 1),
                     max_instances: Optional[int] = None) -> Iterator[EvalImage]:
  """Examples of ``semsam_jax.data.read_split(data_dir, split)`` (dicts with
  ``image`` (H, W, 3) uint8 and ``masks`` (N, H, W) bool); ``shard`` as in
  :func:`iter_coco` (positions = example indices)."""
  skipped = SkipLog() if skipped is None else skipped
  shard_index, shard_count = _check_shard(shard)
  try:
    from semsam_jax.data import read_split
  except ImportError as e:
    raise ImportError("reading a semsam_jax.data dataset needs semsam_jax.data.read_split, "
                      f"which this installation lacks ({e}); pass a COCO JSON instead") from None
  try:
    examples = read_split(str(data_dir), split)
  except KeyError as e:        # unknown split: the message lists the dataset's splits
    raise ValueError(e.args[0] if e.args else str(e)) from None
  done = 0
  for index in range(shard_index, len(examples), shard_count):   # random access
    if num_images is not None and done >= num_images:
      return
    skipped.position = index
    try:
      ex = examples[index]
    except Exception as e:  # noqa: BLE001 -- a damaged record is reported, not fatal
      skipped.add("unreadable_image", f"example {index}", f"{type(e).__name__}: {e}")
      continue
    image_id = ex.get("image_id", ex.get("id", index))
    if isinstance(image_id, bytes):
      image_id = image_id.decode()
    try:
      image = np.asarray(ex["image"])
      masks = np.asarray(ex["masks"]).astype(bool)
      if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
      if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks {masks.shape} do not fit the image {image.shape[:2]}")
    except (KeyError, ValueError, TypeError) as e:
      skipped.add("unreadable_image", image_id, f"example {index}: {e}")
      continue
    h, w = image.shape[:2]
    new_hw = resized_shape(h, w, min_size, max_size)
    keep = []
    areas_all = masks.reshape(len(masks), -1).sum(1).astype(np.float64)
    out_masks = []
    for i, m in enumerate(masks):
      m = _resize_mask(m, new_hw)
      if not m.any():
        skipped.add("empty_mask", image_id, "mask has no pixel", i)
        continue
      keep.append(i)
      out_masks.append(m)
    if not keep:
      skipped.add("image_without_annotations", image_id, "no non-empty mask")
      continue
    if max_instances is not None and len(keep) > max_instances:
      skipped.add("too_many_instances", image_id, f"{len(keep)} masks > max_instances "
                  f"{max_instances}")
      continue
    done += 1
    yield EvalImage(str(image_id), _resize_image(image, new_hw), np.stack(out_masks),
                    areas_all[keep], keep, index)


def detect_format(path) -> tuple[str, dict]:
  """``--dataset PATH`` -> ("coco", {annotation_file, image_dir}) or ("semsam", {data_dir}).

  A ``.json`` file is COCO (images next to it, or in ``images/`` beside it);
  a folder holding ``annotations.json`` is COCO (images in ``images/`` or the
  folder itself); any other folder is a dataset built by ``semsam_jax.data``.
  """
  p = pathlib.Path(path)
  if p.is_file():
    if p.suffix.lower() != ".json":
      raise ValueError(f"--dataset {p}: expected a COCO .json file or a dataset folder")
    return "coco", {"annotation_file": p, "image_dir": _image_dir(p.parent)}
  if p.is_dir():
    ann = p / "annotations.json"
    if ann.is_file():
      return "coco", {"annotation_file": ann, "image_dir": _image_dir(p)}
    return "semsam", {"data_dir": p}
  raise FileNotFoundError(f"--dataset {p}: no such file or folder")


def _image_dir(folder: pathlib.Path) -> pathlib.Path:
  return folder / "images" if (folder / "images").is_dir() else folder
