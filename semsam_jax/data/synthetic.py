"""Synthetic SA-1B-layout images with nested (granularity) annotations.

Each image shows a textured "ground" and "sky", and several objects made of
parts made of sub-parts (some with a small detail), some objects gathered in
groups, drawn in depth order so that later objects occlude earlier ones.  Every
level is annotated with its *visible* region, so a click lies inside 1-6 nested
masks as in SA-1B (detail ⊂ sub-part ⊂ part ⊂ object ⊂ group, patch ⊂ ground).

The output is one ``sa_<n>.jpg`` + ``sa_<n>.json`` per image, in the format Meta
ships SA-1B (COCO RLE masks, ``bbox`` XYWH pixels, ``point_coords``,
``crop_box``, ``predicted_iou``, ``stability_score``), so it goes through the
same builder (``build-sa1b``) as the real data.  Everything is a function of
``(seed, image index)``: the same call always writes the same files.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

MIN_AREA = 4  # smaller visible regions are not annotated (default of ``min_area``)

# Defaults of the shape knobs (``render(**knobs)``, ``config.data.synthetic``).
DEFAULT_KNOBS = dict(
    object_radius=(0.06, 0.16),    # object radius r, as a fraction of min(H, W)
    subpart_radius=(0.15, 0.35),   # sub-part radius, as a fraction of its object's r
    subparts_per_part=(0, 2),      # inclusive range of sub-parts drawn in each part
    detail_prob=0.4,               # chance that a sub-part holds a detail
    min_area=MIN_AREA,             # visible regions of fewer pixels are not annotated
)


def shape_knobs(**overrides) -> dict:
  """The shape knobs with ``overrides`` applied; unknown names are an error."""
  unknown = sorted(set(overrides) - set(DEFAULT_KNOBS))
  if unknown:
    raise ValueError(f"unknown synthetic shape knob(s) {unknown}; known: {sorted(DEFAULT_KNOBS)}")
  knobs = dict(DEFAULT_KNOBS)
  knobs.update({k: v for k, v in overrides.items() if v is not None})
  for name, kind in (("object_radius", float), ("subpart_radius", float),
                     ("subparts_per_part", int)):
    lo, hi = (kind(x) for x in knobs[name])
    if not 0 <= lo <= hi:
      raise ValueError(f"synthetic knob {name} must be a range 0 <= lo <= hi, got {knobs[name]}")
    knobs[name] = (lo, hi)
  if not 0.0 <= float(knobs["detail_prob"]) <= 1.0:
    raise ValueError(f"synthetic knob detail_prob must be in [0, 1], got {knobs['detail_prob']}")
  knobs["detail_prob"] = float(knobs["detail_prob"])
  if int(knobs["min_area"]) < 1:
    raise ValueError(f"synthetic knob min_area must be >= 1, got {knobs['min_area']}")
  knobs["min_area"] = int(knobs["min_area"])
  return knobs


def _size_hw(image_size) -> tuple[int, int]:
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  h, w = image_size
  return int(h), int(w)


class _Shape:
  """A boolean shape stored in a window ``[y0:y1, x0:x1]`` of the image."""

  def __init__(self, y0, x0, local):
    self.y0, self.x0 = y0, x0
    self.local = local

  def full(self, h, w) -> np.ndarray:
    out = np.zeros((h, w), bool)
    lh, lw = self.local.shape
    out[self.y0:self.y0 + lh, self.x0:self.x0 + lw] = self.local
    return out


def _ellipse(rng, h, w, cy, cx, ry, rx, power=2.0) -> _Shape:
  """A rotated super-ellipse (power 2 = ellipse, larger = rounder rectangle)."""
  r = max(ry, rx)
  y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
  x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
  if y1 <= y0 or x1 <= x0:
    return _Shape(0, 0, np.zeros((0, 0), bool))
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
  a = rng.uniform(0, np.pi)
  dy, dx = yy - cy, xx - cx
  u = (dx * np.cos(a) + dy * np.sin(a)) / max(rx, 0.5)
  v = (-dx * np.sin(a) + dy * np.cos(a)) / max(ry, 0.5)
  return _Shape(y0, x0, np.abs(u) ** power + np.abs(v) ** power <= 1.0)


def _texture(rng, mask, color, amplitude) -> np.ndarray:
  """(n, 3) float stripes (random frequency and angle) at the pixels of ``mask``."""
  yy, xx = np.nonzero(mask)
  yy, xx = yy.astype(np.float32), xx.astype(np.float32)
  a = rng.uniform(0, np.pi)
  f = rng.uniform(0.05, 0.4)
  wave = np.sin(f * (xx * np.cos(a) + yy * np.sin(a)))
  return np.asarray(color, np.float32) + amplitude * wave[..., None]


def _random_color(rng):
  return rng.uniform(20, 235, size=3)


def render(seed: int, index: int, image_size=256,
           objects_per_image: Sequence[int] = (3, 6), max_parts: int = 3, **knobs):
  """One synthetic image: ``(image uint8 (H, W, 3), list of (name, mask))``.

  ``knobs``: the shape knobs of :data:`DEFAULT_KNOBS` (object and sub-part
  radius ranges, sub-parts per part, detail probability, minimum annotated
  area); with the defaults the output is that of the original generator.
  """
  knobs = shape_knobs(**knobs)
  rng = np.random.default_rng([int(seed), int(index)])
  h, w = _size_hw(image_size)
  scale = min(h, w)
  image = np.zeros((h, w, 3), np.float32)
  regions: list[tuple[str, np.ndarray]] = []

  # Stuff: a ground with a wavy horizon and a patch on it; the sky above.
  horizon = rng.uniform(0.45, 0.7) * h
  xs = np.arange(w, dtype=np.float32)
  line = horizon + 0.04 * h * np.sin(xs * rng.uniform(0.005, 0.03) * 256 / scale
                                     + rng.uniform(0, 6.3))
  yy = np.arange(h, dtype=np.float32)[:, None]
  ground = yy >= line[None, :]
  sky = ~ground
  image[sky] = _texture(rng, sky, _random_color(rng), 10)
  image[ground] = _texture(rng, ground, _random_color(rng), 25)
  patch = _ellipse(rng, h, w, rng.uniform(horizon, h), rng.uniform(0, w),
                   rng.uniform(0.05, 0.12) * scale, rng.uniform(0.1, 0.25) * scale).full(h, w)
  patch &= ground
  image[patch] = _texture(rng, patch, _random_color(rng), 15)

  # Objects in depth order, some in groups.
  n_obj = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
  objects = []  # dicts: shape (full mask), parts, group id
  group_id = 0
  while len(objects) < n_obj:
    n_in_group = int(min(rng.choice([1, 1, 2, 3]), n_obj - len(objects)))
    gcy, gcx = rng.uniform(0.15, 0.9) * h, rng.uniform(0.1, 0.9) * w
    for _ in range(n_in_group):
      r = rng.uniform(*knobs["object_radius"]) * scale
      cy = gcy + rng.normal(0, 0.6) * r * (n_in_group > 1)
      cx = gcx + rng.normal(0, 1.2) * r * (n_in_group > 1)
      shape = _ellipse(rng, h, w, cy, cx, r * rng.uniform(0.6, 1.0),
                       r * rng.uniform(0.8, 1.4), power=rng.choice([2.0, 2.0, 4.0])).full(h, w)
      objects.append(dict(shape=shape, group=group_id, cy=cy, cx=cx, r=r))
    group_id += 1

  later = np.zeros((h, w), bool)
  for obj in reversed(objects):  # visible = not covered by a later object
    obj["visible"] = obj["shape"] & ~later
    later |= obj["shape"]
  ground_vis, patch_vis, sky_vis = ground & ~later, patch & ~later, sky & ~later
  regions += [("ground", ground_vis), ("ground/patch", patch_vis), ("sky", sky_vis)]

  for oi, obj in enumerate(objects):
    vis = obj["visible"]
    shape = obj["shape"]
    color = _random_color(rng)
    image[vis] = _texture(rng, vis, color, 20)
    regions.append((f"object{oi}", vis))
    k = int(rng.integers(1, max_parts + 1))
    if k >= 2:
      # Parts: angular sectors around a point near the object's centre.
      yy2, xx2 = np.nonzero(shape)
      if len(yy2) == 0:
        continue
      py = obj["cy"] + rng.normal(0, 0.2) * obj["r"]
      px = obj["cx"] + rng.normal(0, 0.2) * obj["r"]
      ang = np.arctan2(yy2 - py, xx2 - px)
      cuts = np.sort(rng.uniform(-np.pi, np.pi, size=k))
      sector = np.searchsorted(cuts, ang) % k
      parts = []
      for p in range(k):
        m = np.zeros((h, w), bool)
        m[yy2[sector == p], xx2[sector == p]] = True
        parts.append(m)
    else:
      parts = [shape]
    for pi, part in enumerate(parts):
      part_vis = part & vis
      if k >= 2:
        pc = np.clip(color + rng.normal(0, 45, size=3), 0, 255)
        image[part_vis] = _texture(rng, part_vis, pc, 15)
        regions.append((f"object{oi}/part{pi}", part_vis))
      # Sub-parts: small blobs inside the part, maybe with a detail inside.
      ys, xs_ = np.nonzero(part)
      lo, hi = knobs["subparts_per_part"]
      for si in range(int(rng.integers(lo, hi + 1))):
        if len(ys) == 0:
          break
        j = int(rng.integers(len(ys)))
        sr = obj["r"] * rng.uniform(*knobs["subpart_radius"])
        sub = _ellipse(rng, h, w, ys[j], xs_[j], sr * rng.uniform(0.6, 1), sr).full(h, w) & part
        sub_vis = sub & vis
        image[sub_vis] = _texture(rng, sub_vis, _random_color(rng), 10)
        regions.append((f"object{oi}/part{pi}/sub{si}", sub_vis))
        if rng.random() < knobs["detail_prob"]:
          sy, sx = np.nonzero(sub)
          if len(sy):
            j2 = int(rng.integers(len(sy)))
            det = _ellipse(rng, h, w, sy[j2], sx[j2], sr * 0.35, sr * 0.35).full(h, w) & sub & vis
            image[det] = _random_color(rng)
            regions.append((f"object{oi}/part{pi}/sub{si}/detail", det))
  for g in range(group_id):
    members = [o for o in objects if o["group"] == g]
    if len(members) >= 2:
      union = np.zeros((h, w), bool)
      for o in members:
        union |= o["visible"]
      regions.append((f"group{g}", union))

  image += rng.normal(0, 4, size=image.shape).astype(np.float32)
  image = np.clip(image, 0, 255).astype(np.uint8)
  regions = [(n, m) for n, m in regions if int(m.sum()) >= knobs["min_area"]]
  order = rng.permutation(len(regions))  # SA-1B lists masks in no particular order
  return image, [regions[i] for i in order]


def _annotation(rng, ann_id, mask, h, w):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  ys, xs = np.nonzero(mask)
  j = int(rng.integers(len(ys)))
  x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
  return {
      "id": int(ann_id),
      "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
      "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
      "area": int(len(ys)),
      "predicted_iou": float(rng.uniform(0.85, 1.0)),
      "point_coords": [[float(xs[j]) + 0.5, float(ys[j]) + 0.5]],
      "crop_box": [0.0, 0.0, float(w), float(h)],
      "stability_score": float(rng.uniform(0.9, 1.0)),
  }


def _write_atomic(path: str, data: bytes):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_example(out_dir: str, seed: int, index: int, image_size=256,
                  objects_per_image=(3, 6), max_parts=3, image_id_offset=0,
                  jpeg_quality=92, knobs=None) -> str:
  """Renders image ``index`` and writes ``sa_<id>.jpg`` + ``sa_<id>.json``."""
  image, regions = render(seed, index, image_size, objects_per_image, max_parts,
                          **(knobs or {}))
  h, w = image.shape[:2]
  image_id = int(image_id_offset) + int(index) + 1
  name = f"sa_{image_id}"
  rng = np.random.default_rng([int(seed), int(index), 1])
  anns = [_annotation(rng, image_id * 10000 + k, m, h, w) for k, (_, m) in enumerate(regions)]
  record = {"image": {"image_id": image_id, "width": w, "height": h,
                      "file_name": f"{name}.jpg"},
            "annotations": anns}
  import io
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality)
  _write_atomic(os.path.join(out_dir, f"{name}.jpg"), buf.getvalue())
  _write_atomic(os.path.join(out_dir, f"{name}.json"), json.dumps(record).encode())
  return name


def _worker(args):
  *pos, knobs = args
  return write_example(*pos, knobs=knobs)


def generate(out_dir: str, num_images: int, seed: int, image_size=256, *,
             objects_per_image: Sequence[int] = (3, 6), max_parts: int = 3,
             image_id_offset: int = 0, num_workers: int = 1,
             progress: bool = True, **knobs) -> list[str]:
  """Writes ``num_images`` synthetic SA-1B-layout examples into ``out_dir``.

  Args:
    out_dir: folder to write (created); existing files of the same names are
      replaced (each file is written to a temporary name, then renamed).
    num_images: number of images.
    seed: the whole output is a function of ``seed`` (and the other arguments).
    image_size: side of the square images, or ``(height, width)``.
    objects_per_image: inclusive range of the object count (more objects, more
      masks: ``(3, 6)`` gives ~25-50 masks, ``(20, 24)`` 73-147, mean 107,
      at 1500x2250).
    max_parts: parts per object are drawn in ``1..max_parts``.
    image_id_offset: image ids are ``offset + index + 1`` (file ``sa_<id>``).
    **knobs: shape knobs (:data:`DEFAULT_KNOBS`: ``object_radius``,
      ``subpart_radius``, ``subparts_per_part``, ``detail_prob``,
      ``min_area``); the defaults reproduce the original generator.
    num_workers: processes used for rendering.
    progress: show a progress bar.

  Returns:
    the example names (``sa_<id>``), in index order.
  """
  from tqdm import tqdm
  os.makedirs(out_dir, exist_ok=True)
  knobs = shape_knobs(**knobs)
  jobs = [(out_dir, seed, i, image_size, tuple(objects_per_image), max_parts, image_id_offset,
           92, knobs) for i in range(num_images)]
  bar = dict(total=num_images, desc=f"synth {os.path.basename(out_dir.rstrip('/'))}",
             disable=not progress, unit="img")
  if num_workers > 1 and num_images > 1:
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(num_workers) as pool:
      return list(tqdm(pool.imap(_worker, jobs), **bar))
  return [_worker(j) for j in tqdm(jobs, **bar)]
