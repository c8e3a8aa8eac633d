"""PIL-based drawings of predicted masks (no matplotlib needed)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def overlay(image: np.ndarray, mask: np.ndarray, color=(30, 90, 255), alpha: float = 0.5,
            text: str | None = None, points: Sequence[Sequence[float]] = (),
            boxes: Sequence[Sequence[float]] = ()) -> Image.Image:
  """``image`` (H, W, 3) uint8 with ``mask`` blended in ``color``, an optional
  label in the top-left corner, clicks as red squares and boxes as red outlines
  (pixel ``x0, y0, x1, y1``)."""
  out = np.asarray(image).astype(np.float32).copy()
  m = np.asarray(mask, bool)
  if m.shape != out.shape[:2]:
    raise ValueError(f"mask shape {m.shape} does not match the image {out.shape[:2]}")
  out[m] = out[m] * (1 - alpha) + np.asarray(color, np.float32) * alpha
  pil = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  for x0, y0, x1, y1 in boxes:
    draw.rectangle([x0, y0, x1, y1], outline=(255, 0, 0), width=2)
  for x, y in points:
    draw.rectangle([x - 3, y - 3, x + 3, y + 3], fill=(255, 0, 0))
  if text:
    draw.rectangle([0, 0, 7 * len(text) + 6, 14], fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 255))
  return pil


def strip(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
  """Images side by side, ``gap`` white pixels apart."""
  if not images:
    raise ValueError("nothing to draw")
  w = sum(im.width for im in images) + gap * (len(images) - 1)
  h = max(im.height for im in images)
  canvas = Image.new("RGB", (w, h), (255, 255, 255))
  x = 0
  for im in images:
    canvas.paste(im, (x, 0))
    x += im.width + gap
  return canvas


def color_masks(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.55,
                seed: int = 0) -> Image.Image:
  """All masks in random colours over ``image``, largest first so small ones
  stay visible on top."""
  out = np.asarray(image).astype(np.float32).copy()
  rng = np.random.default_rng(seed)
  for m in sorted(masks, key=lambda m: -int(np.sum(m))):
    c = rng.uniform(40, 255, 3)
    m = np.asarray(m, bool)
    out[m] = out[m] * (1 - alpha) + c * alpha
  return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def mask_image(mask: np.ndarray) -> Image.Image:
  """A boolean (H, W) mask as an 8-bit grayscale PNG-ready image (0 / 255)."""
  m = np.asarray(mask, bool)
  if m.ndim != 2:
    raise ValueError(f"mask must be (H, W), got shape {m.shape}")
  return Image.fromarray(np.where(m, 255, 0).astype(np.uint8))
