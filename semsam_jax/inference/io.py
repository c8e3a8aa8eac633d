"""Image files in, bounded model inputs out, for the command line and scripts.

* :func:`load_image` reads any file PIL reads as the (H, W, 3) uint8 RGB a
  viewer shows: EXIF orientation applied, 16-bit and 32-bit integer images
  scaled from their full range, float images from [0, 1] (or [0, 255]),
  palette, CMYK, LA, bilevel ... converted by PIL, alpha dropped.  The pixel
  count is checked from the header, before anything is decoded.
* :func:`processed_size` / :func:`resize_image`: the demos' short-side
  resize (torchvision ``Resize(short_side, max_size=max_long_side)`` sizes),
  whose long side is capped, so no input can blow up the work.

Errors a user can cause raise :class:`ImageError` (a ``ValueError``) with a
one-line message naming the file.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

# Decoded pixels allowed without ``allow_large`` (PIL's decompression-bomb
# warning threshold, about 89.5 megapixels).
DEFAULT_MAX_PIXELS = 89_478_485
# Long side of the processed image (the model input) by default.
DEFAULT_MAX_LONG_SIDE = 4096

__all__ = ["ImageError", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_LONG_SIDE", "load_image",
           "to_uint8_rgb", "processed_size", "resize_image"]


class ImageError(ValueError):
  """An image file that cannot be used (missing, unreadable, too large, odd pixels)."""


def to_uint8_rgb(im) -> np.ndarray:
  """A PIL image -> (H, W, 3) uint8 RGB with the scaling a viewer uses.

  16-bit (``I;16*``) and 32-bit integer (``I``) images: values 0..65535 are
  mapped linearly onto 0..255 (``I`` values outside that range are an error);
  float (``F``) images: [0, 1] -> 0..255, or taken as 0..255 when their
  values lie in [0, 255] but not [0, 1]; NaN/inf or other ranges are an error.
  Everything else (palette, CMYK, LA, RGBA, 1-bit, YCbCr, ...) is PIL's own
  ``convert("RGB")``; alpha is dropped.
  """
  mode = im.mode
  if mode.startswith("I;16") or mode == "I":
    a = np.asarray(im)
    if a.dtype != np.uint16:
      a = a.astype(np.int64)
      lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
      if lo < 0 or hi > 65535:
        raise ImageError(f"32-bit integer pixels range {lo}..{hi}; only 0..65535 (16-bit "
                         "data) is supported")
    gray = np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
  elif mode == "F":
    a = np.asarray(im, np.float64)
    if not np.isfinite(a).all():
      raise ImageError("float image holds NaN or infinite pixels")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
      a = a * 255.0
    elif not (lo >= 0.0 and hi <= 255.0):
      raise ImageError(f"float pixels range {lo:g}..{hi:g}; expected [0, 1] (or [0, 255])")
    gray = np.round(a).astype(np.uint8)
  else:
    return np.asarray(im.convert("RGB"))
  return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               allow_large: bool = False) -> np.ndarray:
  """Reads an image file as (H, W, 3) uint8 RGB, oriented as its EXIF says.

  Args:
    path: the file.
    max_pixels: images with more pixels (from the header, before decoding)
      are refused unless ``allow_large``; ``None``: PIL's own
      decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) applies.
    allow_large: accept any size.

  Raises:
    ImageError: missing / unreadable file, too many pixels, pixel values that
      cannot be mapped (see :func:`to_uint8_rgb`).
  """
  from PIL import Image, ImageOps, UnidentifiedImageError
  path = os.fspath(path)
  hint = "; pass --allow-large-images (allow_large=True) to read it anyway"
  saved = Image.MAX_IMAGE_PIXELS
  try:
    if allow_large or max_pixels is not None:
      Image.MAX_IMAGE_PIXELS = None  # our own limit below, or none
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path) as im:
        w, h = im.size
        if not allow_large and max_pixels is not None and w * h > max_pixels:
          raise ImageError(f"image {path} is {w}x{h} = {w * h:,} pixels, more than the "
                           f"limit of {max_pixels:,}{hint}")
        if w == 0 or h == 0:
          raise ImageError(f"image {path} is empty ({w}x{h})")
        im.load()
        im = ImageOps.exif_transpose(im)
        try:
          return to_uint8_rgb(im)
        except ImageError as e:
          raise ImageError(f"image {path}: {e}") from None
  except Image.DecompressionBombError as e:
    raise ImageError(f"image {path} looks like a decompression bomb ({e}){hint}") from None
  except FileNotFoundError:
    raise ImageError(f"image not found: {path}") from None
  except IsADirectoryError:
    raise ImageError(f"image {path} is a directory") from None
  except MemoryError:
    raise ImageError(f"out of memory while decoding image {path}") from None
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    msg = " ".join(str(e).split())
    raise ImageError(f"cannot read image {path}: {msg}") from None
  finally:
    Image.MAX_IMAGE_PIXELS = saved


def processed_size(height: int, width: int, short_side: int,
                   max_long_side: int | None = DEFAULT_MAX_LONG_SIDE) -> tuple[int, int]:
  """(H, W) after the demos' resize, computed without touching any pixels.

  The short side becomes ``short_side`` (0: unchanged) and the long side
  follows the aspect ratio (``int(short_side * long / short)``, torchvision's
  rule); if the long side would then exceed ``max_long_side`` it becomes
  ``max_long_side`` and the short side ``int(max_long_side * short / long)``
  (torchvision's ``max_size``), at least 1.  ``max_long_side`` None/0: no cap.
  """
  if height < 1 or width < 1:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if short_side < 0:
    raise ValueError(f"short_side must be >= 0, got {short_side}")
  if max_long_side is not None and max_long_side < 0:
    raise ValueError(f"max_long_side must be >= 0, got {max_long_side}")
  short, long = (height, width) if height <= width else (width, height)
  if short_side:
    new_short, new_long = short_side, int(short_side * long / short)
  else:
    new_short, new_long = short, long
  if max_long_side and new_long > max_long_side:
    new_short, new_long = max(1, int(max_long_side * new_short / new_long)), max_long_side
  return (new_short, new_long) if height <= width else (new_long, new_short)


def resize_image(image: np.ndarray, short_side: int,
                 max_long_side: int | None = DEFAULT_MAX_LONG_SIDE) -> np.ndarray:
  """Bicubic resize of (H, W, 3) uint8 to :func:`processed_size` (the input
  itself when the size does not change)."""
  from PIL import Image
  h, w = image.shape[:2]
  nh, nw = processed_size(h, w, short_side, max_long_side)
  if (nh, nw) == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
