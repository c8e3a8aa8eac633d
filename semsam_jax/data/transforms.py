"""The reference's SA-1B training input, computed on the host with numpy.

What the original does per image (``SamBaselineDatasetMapperJSON`` with
detectron2 ``RandomFlip`` + ``ResizeScale`` + ``FixedSizeCrop``, then
``prepare_targets_interactive``), and how this module gets the same result
without decoding and resizing every mask at full resolution:

1. Geometry (:func:`draw_geometry`): flip with probability 0.5, a scale
   uniform in [min_scale, max_scale], the resized size
   ``round((H, W) * min(S*s/H, S*s/W))``, one uniform crop fraction for both
   axes (``round(max(new - S, 0) * u)``).  The image is flipped, resized with
   PIL bilinear, cropped and padded right/bottom with 128
   (:func:`transform_image`).
2. Masks: the reference resizes each decoded mask with PIL nearest.  Nearest
   resizing is a separable index map (``row_map``/``col_map``, taken from PIL
   itself so that it is identical), so each canvas pixel (y, x) inside the
   resized image is the source pixel (``row_map[y]``, ``col_map[x]``).  The
   source masks stay RLE: their runs (column-major) are cut into column
   *pieces* (source column, row range), each mapped to canvas columns and a
   canvas row range.  From the pieces come, for every mask, its pixel count
   (empty masks are dropped, as ``filter_empty_instances``), uniform click
   pixels, boxes, and -- for the shipped masks only -- the bit-packed canvas,
   written by XOR toggles at the ends of each vertical run and one prefix-XOR
   down the rows.  Whether the pixel (y, x) is in a mask is a binary search in
   its runs.  Pixels outside the resized image (the crop's pad) are in every
   mask when ``mask_pad_value`` is 255 (the reference's quirk: its
   ``seg_pad_value`` 255 becomes True in ``BitMasks``), in none when it is 0.
3. Prompts: ``permutation(M)`` tiled and cut to K; a uniform pixel of each
   prompt's mask; its level targets = every mask containing that pixel in GT
   order, shuffled and cut to T when more.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps


# ----------------------------------------------------------------------------
# COCO RLE strings.


def rle_counts(counts: bytes | str) -> np.ndarray:
  """Run lengths (int64) of a compressed COCO RLE string (pycocotools' format)."""
  if isinstance(counts, str):
    counts = counts.encode("ascii")
  a = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
  if a.size == 0:
    return np.zeros(0, np.int64)
  if (a < 0).any() or (a > 63).any():
    raise ValueError("invalid character in RLE counts")
  last = (a & 0x20) == 0  # the last character of each number
  if not last[-1]:
    raise ValueError("RLE counts end inside a number")
  ends = np.flatnonzero(last)
  starts = np.concatenate([[0], ends[:-1] + 1])
  group = np.repeat(np.arange(len(ends)), ends - starts + 1)
  pos = np.arange(a.size) - starts[group]
  vals = (a & 0x1F) << (5 * pos)
  x = np.add.reduceat(vals, starts)
  neg = (a[ends] & 0x10) != 0
  x = np.where(neg, x - (np.int64(1) << (5 * (ends - starts + 1))), x)
  out = x.copy()
  if out.size > 2:
    out[2::2] = np.cumsum(x[2::2])
    out[3::2] = x[1] + np.cumsum(x[3::2])
  return out


def rle_intervals(counts, height: int, width: int):
  """Half-open intervals [start, end) of ones in column-major pixel order."""
  c = rle_counts(counts)
  if (c < 0).any() or c.sum() != height * width:
    raise ValueError(f"RLE counts do not cover a {height}x{width} mask")
  cum = np.cumsum(c)
  starts = cum[0::2][: len(c) // 2]
  ends = cum[1::2]
  keep = ends > starts
  return starts[keep], ends[keep]


# ----------------------------------------------------------------------------
# Geometry.


@dataclasses.dataclass
class Geometry:
  height: int   # source
  width: int
  flip: bool
  new_h: int    # resized
  new_w: int
  off_y: int    # crop offset in the resized image
  off_x: int
  size: int     # canvas side S

  @property
  def valid_h(self) -> int:
    return min(self.size, self.new_h - self.off_y)

  @property
  def valid_w(self) -> int:
    return min(self.size, self.new_w - self.off_x)


def draw_geometry(rng: np.random.Generator, height: int, width: int, size: int,
                  min_scale: float, max_scale: float, random_flip: str = "horizontal"
                  ) -> Geometry:
  """RandomFlip(0.5) + ResizeScale + FixedSizeCrop's offset, as detectron2 draws them."""
  if random_flip not in ("horizontal", "none"):
    raise ValueError(f"random_flip={random_flip!r}: only 'horizontal' and 'none' are supported")
  flip = bool(rng.uniform() < 0.5) if random_flip == "horizontal" else False
  scale = rng.uniform(min_scale, max_scale)
  target = np.multiply((size, size), scale)
  out_scale = np.minimum(target[0] / height, target[1] / width)
  new_h, new_w = (int(v) for v in np.round(np.multiply((height, width), out_scale)).astype(int))
  max_off = np.maximum(np.subtract((new_h, new_w), (size, size)), 0)
  off = np.round(np.multiply(max_off, rng.uniform(0.0, 1.0))).astype(int)
  return Geometry(height, width, flip, new_h, new_w, int(off[0]), int(off[1]), size)


def nearest_map(src: int, dst: int) -> np.ndarray:
  """Source index of each output index of PIL's NEAREST resize src -> dst."""
  im = Image.fromarray(np.arange(src, dtype=np.int32)[None, :])
  return np.asarray(im.resize((dst, 1), Image.NEAREST))[0].astype(np.int64)


def canvas_maps(g: Geometry):
  """(row_map, col_map): source row/column of canvas rows [0, valid_h) / cols [0, valid_w)."""
  rows = nearest_map(g.height, g.new_h)[g.off_y:g.off_y + g.valid_h]
  cols = nearest_map(g.width, g.new_w)
  if g.flip:
    cols = g.width - 1 - cols
  cols = cols[g.off_x:g.off_x + g.valid_w]
  return rows, cols


def decode_image(data: bytes) -> np.ndarray:
  """JPEG/PNG bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied (detectron2 read_image)."""
  with Image.open(io.BytesIO(data)) as im:
    im = ImageOps.exif_transpose(im)
    return np.asarray(im.convert("RGB"))


def transform_image(image: np.ndarray, g: Geometry, pad_value: int = 128) -> np.ndarray:
  """Flip, PIL bilinear resize, crop, pad right/bottom: (S, S, 3) uint8."""
  if g.flip:
    image = image[:, ::-1]
  im = Image.fromarray(np.ascontiguousarray(image))
  if (g.new_h, g.new_w) != image.shape[:2]:
    im = im.resize((g.new_w, g.new_h), Image.BILINEAR)
  arr = np.asarray(im)[g.off_y:g.off_y + g.valid_h, g.off_x:g.off_x + g.valid_w]
  out = np.full((g.size, g.size, 3), pad_value, np.uint8)
  out[:g.valid_h, :g.valid_w] = arr
  return out


# ----------------------------------------------------------------------------
# Masks as canvas pieces.


@dataclasses.dataclass
class MaskPieces:
  """Vertical runs of every mask on the canvas (valid region only)."""
  mask: np.ndarray   # (P,) mask index
  x: np.ndarray      # (P,) canvas column
  y0: np.ndarray     # (P,) first canvas row
  y1: np.ndarray     # (P,) one past the last row (> y0)
  count: np.ndarray  # (N,) pixels of each mask inside the valid region
  starts: list       # per mask: run starts (column-major source index)
  ends: list


def mask_pieces(rles, g: Geometry) -> MaskPieces:
  """Cuts every RLE into canvas pieces (see the module docstring)."""
  h, w = g.height, g.width
  row_map, col_map = canvas_maps(g)
  hv, wv = len(row_map), len(col_map)
  # Canvas column range [xa, xb) of every source column (col_map is monotonic).
  if g.flip:
    rev = col_map[::-1]
    xa_r = np.searchsorted(rev, np.arange(w), "left")
    xb_r = np.searchsorted(rev, np.arange(w), "right")
    xa, xb = wv - xb_r, wv - xa_r
  else:
    xa = np.searchsorted(col_map, np.arange(w), "left")
    xb = np.searchsorted(col_map, np.arange(w), "right")
  ms, cs, r0s, r1s, starts_l, ends_l = [], [], [], [], [], []
  for m, rle in enumerate(rles):
    s, e = rle_intervals(rle, h, w)
    starts_l.append(s)
    ends_l.append(e)
    if s.size == 0:
      continue
    c0, c1 = s // h, (e - 1) // h
    n = c1 - c0 + 1
    idx = np.repeat(np.arange(len(s)), n)
    c = c0[idx] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    r0 = np.where(c == c0[idx], s[idx] - c * h, 0)
    r1 = np.where(c == c1[idx], e[idx] - c * h, h)
    ms.append(np.full(len(c), m, np.int64))
    cs.append(c)
    r0s.append(r0)
    r1s.append(r1)
  n_masks = len(rles)
  if not ms:
    z = np.zeros(0, np.int64)
    return MaskPieces(z, z, z, z, np.zeros(n_masks, np.int64), starts_l, ends_l)
  m = np.concatenate(ms)
  c = np.concatenate(cs)
  y0 = np.searchsorted(row_map, np.concatenate(r0s), "left")
  y1 = np.searchsorted(row_map, np.concatenate(r1s), "left")
  # row_map is non-decreasing; searchsorted finds the canvas rows whose source
  # row lies in [r0, r1).
  nx = xb[c] - xa[c]
  keep = (y1 > y0) & (nx > 0)
  m, c, y0, y1, nx = m[keep], c[keep], y0[keep], y1[keep], nx[keep]
  rep = np.repeat(np.arange(len(m)), nx)
  x = xa[c][rep] + (np.arange(nx.sum()) - np.repeat(np.cumsum(nx) - nx, nx))
  m, y0, y1 = m[rep], y0[rep], y1[rep]
  count = np.bincount(m, weights=y1 - y0, minlength=n_masks).astype(np.int64)
  return MaskPieces(m, x, y0, y1, count, starts_l, ends_l)


def pad_pixel_count(g: Geometry) -> int:
  return g.size * g.size - g.valid_h * g.valid_w


def pad_template(g: Geometry) -> np.ndarray:
  """(S, S/8) packed canvas of the pad region (outside the resized image)."""
  m = np.ones((g.size, g.size), bool)
  m[:g.valid_h, :g.valid_w] = False
  return np.packbits(m, axis=-1, bitorder="little")


def packed_canvas(p: MaskPieces, which: np.ndarray, g: Geometry, pad: bool) -> np.ndarray:
  """(len(which), S, S/8) uint8 bit-packed masks ``which`` on the canvas."""
  S = g.size
  sel = np.full(len(p.count), -1, np.int64)
  sel[which] = np.arange(len(which))
  k = sel[p.mask]
  ok = k >= 0
  k, x, y0, y1 = k[ok], p.x[ok], p.y0[ok], p.y1[ok]
  d = np.zeros((len(which), S + 1, S // 8), np.uint8)
  bit = (np.uint8(1) << (x & 7).astype(np.uint8)).astype(np.uint8)
  np.bitwise_xor.at(d, (k, y0, x >> 3), bit)
  np.bitwise_xor.at(d, (k, y1, x >> 3), bit)
  if (S // 8) % 8 == 0:  # prefix-XOR down the rows, 8 bytes at a time
    out = np.bitwise_xor.accumulate(d[:, :S].view(np.uint64), axis=1).view(np.uint8)
  else:
    out = np.bitwise_xor.accumulate(d[:, :S], axis=1)
  if pad:
    out |= pad_template(g)[None]
  return out


def boxes_of(p: MaskPieces, which: np.ndarray, g: Geometry, pad: bool) -> np.ndarray:
  """detectron2 BitMasks boxes [x0, y0, x1 + 1, y1 + 1] (pixels) of masks ``which``."""
  n = len(p.count)
  big = np.iinfo(np.int64).max
  x0 = np.full(n, big)
  y0 = np.full(n, big)
  x1 = np.full(n, -1)
  y1 = np.full(n, -1)
  np.minimum.at(x0, p.mask, p.x)
  np.minimum.at(y0, p.mask, p.y0)
  np.maximum.at(x1, p.mask, p.x + 1)
  np.maximum.at(y1, p.mask, p.y1)
  if pad and pad_pixel_count(g):
    S, hv, wv = g.size, g.valid_h, g.valid_w
    if wv < S:   # right strip: rows [0, hv), columns [wv, S)
      x0, x1 = np.minimum(x0, wv), np.full(n, S)
      y0, y1 = np.zeros(n, np.int64), np.maximum(y1, hv)
    if hv < S:   # bottom strip: rows [hv, S), every column
      y0, y1 = np.minimum(y0, hv), np.full(n, S)
      x0, x1 = np.zeros(n, np.int64), np.full(n, S)
  box = np.stack([x0, y0, x1, y1], -1)[which]
  box[box[:, 2] < 0] = 0
  return box.astype(np.float32)


def contains(p: MaskPieces, g: Geometry, xy: np.ndarray, pad: bool) -> np.ndarray:
  """(len(xy), N) bool: canvas pixel (x, y) is in mask n."""
  row_map, col_map = canvas_maps(g)
  x, y = xy[:, 0], xy[:, 1]
  inside = (x < len(col_map)) & (y < len(row_map))
  q = np.where(inside, col_map[np.minimum(x, len(col_map) - 1)] * g.height
               + row_map[np.minimum(y, len(row_map) - 1)], -1)
  out = np.zeros((len(xy), len(p.starts)), bool)
  for m, (s, e) in enumerate(zip(p.starts, p.ends)):
    if s.size:
      j = np.searchsorted(s, q, "right") - 1
      out[:, m] = (j >= 0) & (q < e[np.maximum(j, 0)]) & inside
  if pad:
    out[~inside] = True
  return out


def sample_pixels(rng, p: MaskPieces, masks: np.ndarray, g: Geometry, pad: bool) -> np.ndarray:
  """A uniform canvas pixel (x, y) of each mask in ``masks`` (one draw each)."""
  n_pad = pad_pixel_count(g) if pad else 0
  order = np.argsort(p.mask, kind="stable")
  pm, px, py0, py1 = p.mask[order], p.x[order], p.y0[order], p.y1[order]
  first = np.searchsorted(pm, np.arange(len(p.count)), "left")
  cum = np.cumsum(py1 - py0)
  out = np.zeros((len(masks), 2), np.int64)
  S, hv, wv = g.size, g.valid_h, g.valid_w
  for i, m in enumerate(masks):
    total = int(p.count[m]) + n_pad
    u = int(rng.integers(0, total))
    if u < p.count[m]:
      base = cum[first[m] - 1] if first[m] > 0 else 0
      j = int(np.searchsorted(cum, base + u, "right"))
      before = cum[j - 1] if j > 0 else 0
      out[i] = (px[j], py0[j] + (base + u - before))
    else:
      v = u - int(p.count[m])
      bottom = (S - hv) * S
      if v < bottom:
        out[i] = (v % S, hv + v // S)
      else:
        v -= bottom
        out[i] = (wv + v % (S - wv), v // (S - wv))
  return out
