"""Image loading and the bounded resize (issue 14 items 1 and 2): no model, no JAX."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from semsam_jax.inference import io as sio


def _png16(arr: np.ndarray, header_hw=None) -> bytes:
  """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB); ``header_hw``
  makes the header claim another size."""
  arr = arr if arr.ndim == 3 else arr[..., None]
  h, w, c = arr.shape
  raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
  if header_hw:
    h, w = header_hw
  color_type = {1: 0, 3: 2, 4: 6}[c]

  def chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type,
                                                            0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_processed_size_caps_the_long_side():
  # torchvision Resize(640) sizes without a cap in reach.
  assert sio.processed_size(70, 90, 640) == (640, 822)
  assert sio.processed_size(90, 70, 640) == (822, 640)
  assert sio.processed_size(70, 90, 0) == (70, 90)
  # The 1 x 5000 image of the issue: 640 x 3,200,000 uncapped.
  assert sio.processed_size(1, 5000, 640, None) == (640, 3_200_000)
  assert sio.processed_size(1, 5000, 640) == (1, 4096)
  assert sio.processed_size(5000, 1, 640, 1000) == (1000, 1)
  # torchvision's max_size rule: short = int(max * short / long).
  assert sio.processed_size(300, 1000, 640, 1024) == (int(1024 * 640 / 2133), 1024)
  # --short-side 0 keeps the size unless the long side is over the cap.
  assert sio.processed_size(3000, 4000, 0, 2000) == (1500, 2000)
  for bad in ((0, 5, 640), (5, 5, -1)):
    with pytest.raises(ValueError):
      sio.processed_size(*bad)
  img = np.zeros((1, 500, 3), np.uint8)
  assert sio.resize_image(img, 640, 256).shape == (1, 256, 3)
  assert sio.resize_image(img, 0, 0) is img


def test_high_bit_depth_and_float_images_are_scaled(tmp_path):
  rng = np.random.default_rng(0)
  g16 = rng.integers(0, 65536, (6, 7)).astype(np.uint16)
  (tmp_path / "g16.png").write_bytes(_png16(g16))
  out = sio.load_image(tmp_path / "g16.png")
  assert out.shape == (6, 7, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], np.round(g16 / 257.0).astype(np.uint8))
  assert 50 < out.mean() < 200  # not all white, as convert("RGB") made it
  rgb16 = rng.integers(0, 65536, (5, 6, 3)).astype(np.uint16)
  (tmp_path / "rgb16.png").write_bytes(_png16(rgb16))
  out = sio.load_image(tmp_path / "rgb16.png")
  assert np.abs(out.astype(int) - np.round(rgb16 / 257.0)).max() <= 1
  # 16-bit TIFF and a 32-bit integer image holding 16-bit values.
  Image.fromarray(g16).save(tmp_path / "g16.tif")
  np.testing.assert_array_equal(sio.load_image(tmp_path / "g16.tif")[..., 1],
                                np.round(g16 / 257.0).astype(np.uint8))
  i32 = Image.fromarray(g16.astype(np.int32))
  assert i32.mode == "I"
  np.testing.assert_array_equal(sio.to_uint8_rgb(i32)[..., 2], np.round(g16 / 257.0))
  with pytest.raises(sio.ImageError, match="0..65535"):
    sio.to_uint8_rgb(Image.fromarray(np.full((2, 2), 70000, np.int32)))
  # Float TIFFs: [0, 1] (the usual convention) and [0, 255].
  f = rng.random((4, 5)).astype(np.float32)
  Image.fromarray(f).save(tmp_path / "f.tif")
  np.testing.assert_array_equal(sio.load_image(tmp_path / "f.tif")[..., 0],
                                np.round(f.astype(np.float64) * 255).astype(np.uint8))
  np.testing.assert_array_equal(sio.to_uint8_rgb(Image.fromarray(f * 200))[..., 0],
                                np.round((f * 200).astype(np.float64)).astype(np.uint8))
  Image.fromarray(np.array([[0.5, np.nan]], np.float32)).save(tmp_path / "nan.tif")
  with pytest.raises(sio.ImageError, match="nan.tif.*NaN"):
    sio.load_image(tmp_path / "nan.tif")
  with pytest.raises(sio.ImageError, match="range"):
    sio.to_uint8_rgb(Image.fromarray(np.array([[-3.0, 400.0]], np.float32)))


def test_palette_cmyk_la_and_bilevel_images(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 255, (8, 9, 3), np.uint8)
  pal = Image.fromarray(rgb).quantize(16)
  pal.save(tmp_path / "p.png")
  np.testing.assert_array_equal(sio.load_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
  cmyk = Image.fromarray(rgb).convert("CMYK")
  cmyk.save(tmp_path / "c.tif")
  got = sio.load_image(tmp_path / "c.tif")
  assert np.abs(got.astype(int) - rgb).max() <= 1  # PIL's CMYK round trip
  la = np.stack([rgb[..., 0], np.full((8, 9), 7, np.uint8)], -1)
  Image.fromarray(la, "LA").save(tmp_path / "la.png")
  np.testing.assert_array_equal(sio.load_image(tmp_path / "la.png"),
                                np.repeat(rgb[..., :1], 3, -1))  # alpha dropped, gray kept
  Image.fromarray(rgb[..., 0] > 128).save(tmp_path / "b.png")
  assert set(np.unique(sio.load_image(tmp_path / "b.png"))) <= {0, 255}


def test_exif_orientation_is_applied(tmp_path):
  # Stored 30 wide x 20 high with a red corner at stored (x=0, y=0); EXIF 6
  # says "rotate 90 degrees clockwise to view", so a viewer shows it 20 x 30
  # with the red corner at the top right.
  stored = np.zeros((20, 30, 3), np.uint8)
  stored[:5, :5] = (255, 0, 0)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
  out = sio.load_image(tmp_path / "o.png")
  assert out.shape == (30, 20, 3)
  assert out[0, 19, 0] == 255 and out[0, 0, 0] == 0 and out[29, 19, 0] == 0


def test_size_limits_before_decoding_and_decompression_bombs(tmp_path, monkeypatch):
  Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "im.png")
  with pytest.raises(sio.ImageError, match=r"50x40 = 2,000 pixels.*--allow-large-images"):
    sio.load_image(tmp_path / "im.png", max_pixels=1999)
  assert sio.load_image(tmp_path / "im.png", max_pixels=1999, allow_large=True).shape == (40, 50, 3)
  # A header claiming 100000 x 100000 pixels is refused without decoding.
  (tmp_path / "huge.png").write_bytes(_png16(np.zeros((1, 1), np.uint16), (100000, 100000)))
  with pytest.raises(sio.ImageError, match=r"100000x100000 = 10,000,000,000 pixels"):
    sio.load_image(tmp_path / "huge.png", allow_large=False, max_pixels=10**9)
  with pytest.raises(sio.ImageError) as e:
    sio.load_image(tmp_path / "huge.png", max_pixels=None)
  assert "decompression bomb" in str(e.value) and "\n" not in str(e.value)
  # PIL's own bomb check (2 x MAX_IMAGE_PIXELS) becomes the same one-line error.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
  with pytest.raises(sio.ImageError, match="decompression bomb.*allow-large-images"):
    sio.load_image(tmp_path / "im.png", max_pixels=None)
  assert sio.load_image(tmp_path / "im.png", allow_large=True).shape == (40, 50, 3)
  assert Image.MAX_IMAGE_PIXELS == 500  # restored after use


def test_unreadable_files(tmp_path):
  with pytest.raises(sio.ImageError, match="image not found"):
    sio.load_image(tmp_path / "missing.png")
  (tmp_path / "junk.png").write_bytes(b"not an image")
  with pytest.raises(sio.ImageError, match="cannot read image .*junk.png"):
    sio.load_image(tmp_path / "junk.png")
  with pytest.raises(sio.ImageError, match="is a directory"):
    sio.load_image(tmp_path)
  buf = io.BytesIO()
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, format="PNG")
  (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
  with pytest.raises(sio.ImageError, match="cut.png") as e:
    sio.load_image(tmp_path / "cut.png")
  assert "\n" not in str(e.value)
