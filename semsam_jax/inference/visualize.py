"""PIL-based overlays of predicted masks."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def overlay(image: np.ndarray, mask: np.ndarray, color=(30, 90, 255), alpha: float = 0.5,
            text: str | None = None, points: Sequence[Sequence[float]] = ()) -> Image.Image:
  """The image with ``mask`` blended in ``color``, optional label and red clicks."""
  out = image.astype(np.float32).copy()
  m = np.asarray(mask, bool)
  out[m] = out[m] * (1 - alpha) + np.asarray(color, np.float32) * alpha
  pil = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  for x, y in points:
    draw.rectangle([x - 3, y - 3, x + 3, y + 3], fill=(255, 0, 0))
  if text:
    draw.rectangle([0, 0, 8 * len(text) + 6, 14], fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 255))
  return pil


def strip(images: Sequence[Image.Image]) -> Image.Image:
  """Images side by side."""
  if not images:
    raise ValueError("nothing to draw")
  w = sum(im.width for im in images)
  h = max(im.height for im in images)
  canvas = Image.new("RGB", (w, h), (255, 255, 255))
  x = 0
  for im in images:
    canvas.paste(im, (x, 0))
    x += im.width
  return canvas


def color_masks(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.55,
                seed: int = 0) -> Image.Image:
  """All masks in random colours, largest first so small ones stay visible."""
  out = image.astype(np.float32).copy()
  rng = np.random.default_rng(seed)
  for m in sorted(masks, key=lambda m: -int(np.sum(m))):
    c = rng.uniform(40, 255, 3)
    m = np.asarray(m, bool)
    out[m] = out[m] * (1 - alpha) + c * alpha
  return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
