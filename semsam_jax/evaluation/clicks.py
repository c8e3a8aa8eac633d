"""Click selection of the original evaluation: the "centre" of a mask.

The original (``prepare_targets_interactive`` in evaluation mode) clicks, for
every ground-truth mask, the pixel where kornia's approximate distance
transform of the mask is largest.  The mask is padded by one pixel of
background first, so pixels on the image border are next to "outside" too;
ties go to the first maximum in row-major order.

kornia's ``distance_transform`` (kernel 3, h = 0.35) is a cascade of 3x3
convolutions: in step ``i`` every pixel not yet reached that has a reached
(or background) neighbour gets the value ``i + c``, with ``c = -h log S`` and
``S = sum over reached neighbours of exp(-|offset| / h)``.  Two facts make a
direct, vectorised computation possible:

* the step in which a pixel is reached is its chessboard distance to the
  background minus one (the front moves one pixel per step, 8-connected);
* ``S`` only depends on which neighbours were reached earlier, i.e. have a
  smaller chessboard distance, so ``c`` is one of 255 values, looked up by an
  8-bit neighbour code in :data:`KORNIA_STEP_TABLE` (the float32 values PyTorch
  computes; see :mod:`semsam_jax.evaluation.make_dt_table`).

The result equals kornia's output bit for bit (checked against the golden
distance maps of the original).  ``method="euclidean"`` uses the exact
Euclidean distance transform instead (scipy), an option the original lacks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

KORNIA_STEP_TABLE_BITS = (
    0x00000000, 0x3fb504f3, 0x3f800000, 0x3f681098, 0x3fb504f3, 0x3f95f762, 0x3f681098, 0x3f5531bb,
    0x3f800000, 0x3f681098, 0x3f41e4de, 0x3f35212a, 0x3f681098, 0x3f5531bc, 0x3f35212a, 0x3f29f576,
    0x3f800000, 0x3f681098, 0x3f41e4de, 0x3f35212a, 0x3f681098, 0x3f5531bc, 0x3f35212a, 0x3f29f576,
    0x3f41e4de, 0x3f35212a, 0x3f1d9079, 0x3f14db21, 0x3f35212a, 0x3f29f576, 0x3f14db21, 0x3f0ceb64,
    0x3fb504f3, 0x3f95f762, 0x3f681098, 0x3f5531bb, 0x3f95f762, 0x3f83cd30, 0x3f5531bb, 0x3f459d6a,
    0x3f681098, 0x3f5531bb, 0x3f35212a, 0x3f29f576, 0x3f5531bb, 0x3f459d6a, 0x3f29f576, 0x3f200717,
    0x3f681098, 0x3f5531bb, 0x3f35212a, 0x3f29f576, 0x3f5531bb, 0x3f459d6a, 0x3f29f576, 0x3f200717,
    0x3f35212a, 0x3f29f576, 0x3f14db21, 0x3f0ceb64, 0x3f29f576, 0x3f200717, 0x3f0ceb64, 0x3f05a111,
    0x3f800000, 0x3f681098, 0x3f41e4de, 0x3f35212a, 0x3f681098, 0x3f5531bc, 0x3f35212a, 0x3f29f576,
    0x3f41e4de, 0x3f35212a, 0x3f1d9079, 0x3f14db21, 0x3f35212a, 0x3f29f576, 0x3f14db21, 0x3f0ceb64,
    0x3f41e4de, 0x3f35212a, 0x3f1d9079, 0x3f14db21, 0x3f35212a, 0x3f29f576, 0x3f14db21, 0x3f0ceb64,
    0x3f1d9079, 0x3f14db21, 0x3f03c9bc, 0x3efa5b7c, 0x3f14db21, 0x3f0ceb64, 0x3efa5b7c, 0x3eee0c10,
    0x3f681098, 0x3f5531bc, 0x3f35212a, 0x3f29f576, 0x3f5531bc, 0x3f459d6a, 0x3f29f576, 0x3f200717,
    0x3f35212a, 0x3f29f576, 0x3f14db21, 0x3f0ceb64, 0x3f29f576, 0x3f200717, 0x3f0ceb64, 0x3f05a111,
    0x3f35212a, 0x3f29f576, 0x3f14db21, 0x3f0ceb64, 0x3f29f576, 0x3f200717, 0x3f0ceb64, 0x3f05a111,
    0x3f14db21, 0x3f0ceb64, 0x3efa5b7c, 0x3eee0c10, 0x3f0ceb64, 0x3f05a111, 0x3eee0c10, 0x3ee28749,
    0x3fb504f3, 0x3f95f762, 0x3f681098, 0x3f5531bb, 0x3f95f762, 0x3f83cd30, 0x3f5531bb, 0x3f459d6a,
    0x3f681098, 0x3f5531bb, 0x3f35212a, 0x3f29f576, 0x3f5531bb, 0x3f459d6a, 0x3f29f576, 0x3f200717,
    0x3f681098, 0x3f5531bb, 0x3f35212a, 0x3f29f576, 0x3f5531bb, 0x3f459d6a, 0x3f29f576, 0x3f200717,
    0x3f35212a, 0x3f29f576, 0x3f14db21, 0x3f0ceb64, 0x3f29f576, 0x3f200717, 0x3f0ceb64, 0x3f05a111,
    0x3f95f762, 0x3f83cd30, 0x3f5531bb, 0x3f459d6a, 0x3f83cd30, 0x3f6dd3a3, 0x3f459d6a, 0x3f3858ef,
    0x3f5531bb, 0x3f459d6a, 0x3f29f576, 0x3f200717, 0x3f459d6a, 0x3f3858ef, 0x3f200717, 0x3f17169a,
    0x3f5531bb, 0x3f459d6a, 0x3f29f576, 0x3f200717, 0x3f459d6a, 0x3f3858ef, 0x3f200717, 0x3f17169a,
    0x3f29f576, 0x3f200717, 0x3f0ceb64, 0x3f05a111, 0x3f200717, 0x3f17169a, 0x3f05a111, 0x3efdc678,
    0x3f681098, 0x3f5531bb, 0x3f35212a, 0x3f29f576, 0x3f5531bb, 0x3f459d6a, 0x3f29f576, 0x3f200717,
    0x3f35212a, 0x3f29f576, 0x3f14db21, 0x3f0ceb64, 0x3f29f576, 0x3f200717, 0x3f0ceb64, 0x3f05a111,
    0x3f35212a, 0x3f29f576, 0x3f14db21, 0x3f0ceb64, 0x3f29f576, 0x3f200717, 0x3f0ceb64, 0x3f05a111,
    0x3f14db21, 0x3f0ceb64, 0x3efa5b7c, 0x3eee0c10, 0x3f0ceb64, 0x3f05a111, 0x3eee0c10, 0x3ee28749,
    0x3f5531bb, 0x3f459d6a, 0x3f29f576, 0x3f200717, 0x3f459d6a, 0x3f3858ef, 0x3f200717, 0x3f17169a,
    0x3f29f576, 0x3f200717, 0x3f0ceb64, 0x3f05a111, 0x3f200717, 0x3f17169a, 0x3f05a111, 0x3efdc678,
    0x3f29f576, 0x3f200717, 0x3f0ceb64, 0x3f05a111, 0x3f200717, 0x3f17169a, 0x3f05a111, 0x3efdc678,
    0x3f0ceb64, 0x3f05a111, 0x3eee0c10, 0x3ee28749, 0x3f05a111, 0x3efdc678, 0x3ee28749, 0x3ed7b4a9,
)

# c for every 8-neighbour code (bit j set: neighbour j, row-major without the
# centre, is already reached).  Code 0 never occurs for a reached pixel.
KORNIA_STEP_TABLE = np.asarray(KORNIA_STEP_TABLE_BITS, np.uint32).view(np.float32)

_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
CLICK_METHODS = ("kornia", "euclidean")


def _crop(mask: np.ndarray):
  """Bounding box of ``mask`` grown by one pixel, clipped to the padded frame
  (offsets refer to the mask padded by one pixel)."""
  rows = np.flatnonzero(mask.any(1))
  cols = np.flatnonzero(mask.any(0))
  return rows[0], rows[-1] + 3, cols[0], cols[-1] + 3


def kornia_distance_transform(mask: np.ndarray) -> np.ndarray:
  """kornia's approximate distance transform of ``~pad(mask, 1)``, cropped back.

  Args:
    mask: (H, W) bool.

  Returns:
    (H, W) float32: 0 outside the mask, about the distance (in pixels) to the
    nearest pixel outside the mask (or the image) inside it.
  """
  mask = np.asarray(mask, bool)
  if mask.ndim != 2:
    raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
  out = np.zeros(mask.shape, np.float32)
  if not mask.any():
    return out
  y0, y1, x0, x1 = _crop(mask)
  padded = np.pad(mask, 1)[y0:y1, x0:x1]   # background ring around the mask
  step = ndimage.distance_transform_cdt(padded, metric="chessboard").astype(np.int32)
  h, w = padded.shape
  ring = np.pad(step, 1, constant_values=0)
  code = np.zeros((h, w), np.int32)
  for j, (dy, dx) in enumerate(_NEIGHBOURS):
    nb = ring[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    code |= (nb < step).astype(np.int32) << j
  inside = step > 0
  values = np.zeros((h, w), np.float32)
  values[inside] = (step[inside] - 1).astype(np.float32) + KORNIA_STEP_TABLE[code[inside]]
  # Back to unpadded coordinates: padded row r is image row r - 1.
  out[y0:y1 - 2, x0:x1 - 2] = values[1:-1, 1:-1]
  return out


def euclidean_distance_transform(mask: np.ndarray) -> np.ndarray:
  """Exact Euclidean distance to the nearest pixel outside ``mask`` or the image."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    return np.zeros(mask.shape, np.float32)
  return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1].astype(np.float32)


def distance_transform(mask: np.ndarray, method: str = "kornia") -> np.ndarray:
  if method == "kornia":
    return kornia_distance_transform(mask)
  if method == "euclidean":
    return euclidean_distance_transform(mask)
  raise ValueError(f"unknown click method {method!r}; expected one of {CLICK_METHODS}")


def center_click(mask: np.ndarray, method: str = "kornia") -> tuple[int, int]:
  """The original's evaluation click: (x, y) of the first maximum (row-major)
  of the distance transform.  An empty mask gives (0, 0), as in the original."""
  dt = distance_transform(mask, method)
  flat = int(np.argmax(dt))
  return flat % dt.shape[1], flat // dt.shape[1]


def center_clicks(masks: np.ndarray, method: str = "kornia") -> np.ndarray:
  """(N, H, W) masks -> (N, 2) int32 clicks (x, y)."""
  masks = np.asarray(masks, bool)
  return np.asarray([center_click(m, method) for m in masks], np.int32).reshape(-1, 2)


def click_boxes(clicks_xy: np.ndarray, image_hw: tuple[int, int],
                padded_hw: tuple[int, int]) -> np.ndarray:
  """Clicks -> the decoder's prompt boxes, with the original's float32 arithmetic.

  The click becomes the box [x-3, y-3, x+3, y+3], i.e. cx, cy, w, h =
  x, y, 6, 6, divided by the image size [W, H, W, H], then multiplied by
  [W, H, W, H] and divided by the padded size [Wp, Hp, Wp, Hp] (coordinates
  relative to the padded image).  Returns (N, 4) float32.
  """
  xy = np.asarray(clicks_xy, np.int64).reshape(-1, 2)
  x0y0, x1y1 = xy - 3, xy + 3
  center = ((x0y0 + x1y1) / 2).astype(np.float32)
  size = (x1y1 - x0y0).astype(np.float32)
  boxes = np.concatenate([center, size], axis=1).astype(np.float32)
  (h, w), (hp, wp) = image_hw, padded_hw
  frame = np.asarray([w, h, w, h], np.float32)
  padded = np.asarray([wp, hp, wp, hp], np.float32)
  return ((boxes / frame) * frame / padded).astype(np.float32)
