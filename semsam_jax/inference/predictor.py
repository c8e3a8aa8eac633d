"""Interactive multi-granularity prediction: embed an image once, then decode
any number of click/box prompt batches against the cached embedding.

    predictor = SemanticSAMPredictor.from_torch("model.pth", "config.yaml")
    predictor.set_image(image_u8)                  # backbone + pixel decoder, once
    result = predictor.predict(points=[[120, 80]]) # decoder only
    result.masks   # (N, L, H, W) bool, L = len(levels) granularity tokens

Static shapes: the image is zero padded to a size bucket and the prompts to a
prompt bucket (padded prompts are masked out of the attention), so after the
first call of a bucket nothing is compiled again.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from semsam_jax.models import semantic_sam as ss

NUM_LEVELS = 6
# User-facing granularity levels 1..6 (fine -> coarse) -> decoder token index.
LEVEL_TO_TOKEN = {1: 3, 2: 2, 3: 0, 4: 4, 5: 1, 6: 5}
DEFAULT_PROMPT_BUCKETS = (1, 4, 16, 64, 256)


def to_rgb_uint8(image) -> np.ndarray:
  """Validates an image and returns it as (H, W, 3) uint8 RGB.

  Accepts uint8 (H, W, 3) RGB, (H, W) or (H, W, 1) grayscale and (H, W, 4) RGBA
  (alpha dropped); anything else raises ``ValueError``.
  """
  if not isinstance(image, np.ndarray):
    try:
      image = np.asarray(image)
    except Exception as e:
      raise ValueError(f"cannot read image of type {type(image).__name__}") from e
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 (0..255), got dtype {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError("image must be (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grayscale, "
                     f"got shape {image.shape}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"image is empty: shape {image.shape}")
  return np.ascontiguousarray(image[..., :3])


def levels_to_tokens(levels: Sequence[int] | None) -> tuple[int, ...]:
  """Decoder token indices (0..5) to keep; ``None`` keeps all six in token order."""
  if levels is None:
    return tuple(range(NUM_LEVELS))
  out = []
  for t in levels:
    if isinstance(t, (bool, np.bool_)) or int(t) != t or not 0 <= int(t) < NUM_LEVELS:
      raise ValueError(f"unknown granularity token {t!r}: tokens are 0..{NUM_LEVELS - 1}")
    out.append(int(t))
  if not out:
    raise ValueError("levels must not be empty")
  return tuple(out)


def user_levels_to_tokens(levels: Sequence[int]) -> tuple[int, ...]:
  """User granularity levels 1..6 -> decoder tokens (1->3, 2->2, 3->0, 4->4, 5->1, 6->5)."""
  out = []
  for l in levels:
    if l not in LEVEL_TO_TOKEN:
      raise ValueError(f"unknown granularity level {l!r}: levels are 1..6")
    out.append(LEVEL_TO_TOKEN[l])
  if not out:
    raise ValueError("levels must not be empty")
  return tuple(out)


def _bucket(value: int, buckets: Sequence[int] | None, multiple: int) -> int:
  up = -(-value // multiple) * multiple
  if not buckets:
    return up
  i = bisect.bisect_left(sorted(buckets), up)
  if i == len(buckets):
    return up  # larger than every bucket: fall back to the multiple
  return sorted(buckets)[i]


@dataclasses.dataclass
class Prediction:
  """Per prompt results, tokens in the order of ``levels``."""
  logits: np.ndarray   # (N, L, H, W) float32 mask logits at image resolution
  masks: np.ndarray    # (N, L, H, W) bool (logits > 0)
  ious: np.ndarray     # (N, L) predicted IoU
  boxes: np.ndarray    # (N, L, 4) predicted boxes, pixel XYXY of the image
  levels: tuple[int, ...]  # decoder token indices


class SemanticSAMPredictor:
  """Interactive predictor on top of :class:`~semsam_jax.models.semantic_sam.SemanticSAM`.

  Args:
    config: the model config (``config.model`` section or a full config).
    params: the model parameters.
    size_buckets: allowed padded side lengths.  ``None`` (default) pads to a
      multiple of 32 exactly like the original (bit-faithful); a bucket list such
      as ``(512, 768, 1024)`` pads further so images of nearby sizes share one
      compiled function, which changes results slightly (the backbone sees more
      zero padding; see docs/differences.md).
    prompt_buckets: prompt counts the decoder is compiled for; a call with N
      prompts runs at the smallest bucket >= N (more prompts: next multiple of
      the largest bucket).
    independent_prompts: if True the prompts of one call do not attend to each
      other (block-diagonal self-attention, as in training); the default (False)
      is the original's behaviour where all prompts of a call interact.
  """

  def __init__(self, config, params, size_buckets: Sequence[int] | None = None,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               independent_prompts: bool = False):
    cfg = config.model if hasattr(config, "model") else config
    self.config = ss.freeze_config(cfg)
    self.params = params
    self.size_buckets = tuple(sorted(size_buckets)) if size_buckets else None
    self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
    self.independent_prompts = bool(independent_prompts)
    self.model = ss.SemanticSAM(self.config)
    self.embedding_calls = 0
    self._embedding = None
    self._image_hw: tuple[int, int] | None = None
    self._padded_hw: tuple[int, int] | None = None

    model = self.model

    def embed(params, image_u8_padded, hw):
      # Normalise the image region only; the bottom/right padding stays zero.
      hp, wp = image_u8_padded.shape[:2]
      x = ss.normalize_and_pad(image_u8_padded[None], self.config.pixel_mean,
                               self.config.pixel_std, (hp, wp))
      inside = ((jnp.arange(hp)[:, None] < hw[0]) & (jnp.arange(wp)[None, :] < hw[1]))
      x = jnp.where(inside[None, :, :, None], x, 0.0)
      return model.apply({"params": params}, x, method=ss.SemanticSAM.embed_image)

    def decode(params, embedding, boxes, pb, valid, tokens):
      out = model.apply({"params": params}, embedding, boxes, pb, valid,
                        independent_prompts=self.independent_prompts, return_aux=False,
                        method=ss.SemanticSAM.decode)
      masks = jnp.take(out["pred_masks"][0], tokens, axis=1)     # (N, L, h, w)
      hp, wp = embedding["mask_features"].shape[1] * 4, embedding["mask_features"].shape[2] * 4
      up = jax.image.resize(masks, masks.shape[:2] + (hp, wp), method="linear",
                            antialias=False)
      return up, jnp.take(out["pred_ious"][0], tokens, axis=1), \
          jnp.take(out["pred_boxes"][0], tokens, axis=1)

    self._embed = jax.jit(embed)
    self._decode = jax.jit(decode)

  # ---------------------------------------------------------------- loading

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike, **kwargs) -> "SemanticSAMPredictor":
    """From an orbax checkpoint written by ``python -m semsam_jax.convert``."""
    from semsam_jax.convert.checkpoint import load_checkpoint
    config, params = load_checkpoint(directory)
    return cls(config, params, **kwargs)

  @classmethod
  def from_torch(cls, torch_checkpoint, reference_config, **kwargs) -> "SemanticSAMPredictor":
    """From an original ``.pth`` and its YAML (converted on the fly)."""
    from semsam_jax.convert import convert_checkpoint
    config, params = convert_checkpoint(torch_checkpoint, reference_config=reference_config)
    return cls(config, params, **kwargs)

  # ---------------------------------------------------------------- image

  @property
  def image_size(self) -> tuple[int, int]:
    if self._image_hw is None:
      raise RuntimeError("call set_image() before predict()")
    return self._image_hw

  def padded_size(self, height: int, width: int) -> tuple[int, int]:
    m = int(self.config.size_divisibility)
    return (_bucket(height, self.size_buckets, m), _bucket(width, self.size_buckets, m))

  def set_image(self, image) -> None:
    """Computes and caches the image embedding (backbone + pixel decoder)."""
    image = to_rgb_uint8(image)
    h, w = image.shape[:2]
    hp, wp = self.padded_size(h, w)
    padded = np.zeros((hp, wp, 3), np.uint8)
    padded[:h, :w] = image
    self._embedding = self._embed(self.params, padded, np.asarray([h, w], np.int32))
    self.embedding_calls += 1
    self._image_hw, self._padded_hw = (h, w), (hp, wp)

  @property
  def embedding(self) -> dict:
    if self._embedding is None:
      raise RuntimeError("call set_image() before predict()")
    return self._embedding

  # ---------------------------------------------------------------- prompts

  def _prompt_boxes(self, points, boxes, coords: str) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (N, 4) relative cx,cy,w,h of the unpadded image, (N,) is_box."""
    if coords not in ("pixels", "relative"):
      raise ValueError(f"coords must be 'pixels' or 'relative', got {coords!r}")
    h, w = self.image_size
    rows, is_box = [], []
    if points is not None:
      pts = np.asarray(points, np.float64).reshape(-1, 2) if np.size(points) else np.zeros((0, 2))
      if coords == "pixels":
        bad = (pts[:, 0] < 0) | (pts[:, 0] >= w) | (pts[:, 1] < 0) | (pts[:, 1] >= h)
        rel = pts / [w, h]
      else:
        bad = (pts < 0).any(1) | (pts > 1).any(1)
        rel = pts
      if bad.any():
        raise ValueError(f"point(s) {pts[bad].tolist()} lie outside the {w}x{h} image "
                         f"({coords} coordinates)")
      rows += [[x, y, 0.0, 0.0] for x, y in rel]
      is_box += [False] * len(rel)
    if boxes is not None:
      bx = np.asarray(boxes, np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
      if coords == "pixels":  # x0, y0, x1, y1
        bad = ((bx[:, 0] < 0) | (bx[:, 1] < 0) | (bx[:, 2] > w) | (bx[:, 3] > h)
               | (bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1]))
        cxcywh = np.stack([(bx[:, 0] + bx[:, 2]) / 2 / w, (bx[:, 1] + bx[:, 3]) / 2 / h,
                           (bx[:, 2] - bx[:, 0]) / w, (bx[:, 3] - bx[:, 1]) / h], 1)
      else:  # cx, cy, w, h relative
        bad = ((bx[:, 2] <= 0) | (bx[:, 3] <= 0) | (bx[:, 0] - bx[:, 2] / 2 < -1e-6)
               | (bx[:, 1] - bx[:, 3] / 2 < -1e-6) | (bx[:, 0] + bx[:, 2] / 2 > 1 + 1e-6)
               | (bx[:, 1] + bx[:, 3] / 2 > 1 + 1e-6))
        cxcywh = bx
      if bad.any():
        raise ValueError(f"box(es) {bx[bad].tolist()} are empty or outside the {w}x{h} "
                         f"image ({coords} coordinates)")
      rows += cxcywh.tolist()
      is_box += [True] * len(cxcywh)
    if not rows:
      raise ValueError("give at least one point or box")
    return np.asarray(rows, np.float32), np.asarray(is_box, bool)

  def _prompt_bucket(self, n: int) -> int:
    for b in self.prompt_buckets:
      if b >= n:
        return b
    top = self.prompt_buckets[-1]
    return -(-n // top) * top

  def predict(self, points=None, boxes=None, levels: Sequence[int] | None = None,
              coords: str = "pixels") -> Prediction:
    """Decodes clicks and/or boxes against the current image.

    Args:
      points: (N, 2) clicks ``x, y`` (pixels, or relative in [0, 1]).
      boxes: (M, 4) boxes: ``x0, y0, x1, y1`` in pixels, or ``cx, cy, w, h``
        relative, depending on ``coords``.
      levels: decoder granularity tokens 0..5 to return, in that order
        (default: all six).  Use :func:`user_levels_to_tokens` for levels 1..6.
      coords: ``"pixels"`` (default) or ``"relative"``.

    Returns:
      A :class:`Prediction`; prompts are ordered points first, then boxes.
    """
    tokens = levels_to_tokens(levels)
    rel, is_box = self._prompt_boxes(points, boxes, coords)
    n = len(rel)
    dec_boxes, pb = ss.prompts_to_boxes(rel, is_box, self.image_size, self._padded_hw)
    nb = self._prompt_bucket(n)
    boxes_p = np.full((1, nb, 4), 0.5, np.float32)
    boxes_p[0, :n] = np.asarray(dec_boxes)
    pb_p = np.zeros((1, nb), np.int32)
    pb_p[0, :n] = np.asarray(pb)
    valid = np.zeros((1, nb), bool)
    valid[0, :n] = True
    up, ious, pboxes = self._decode(self.params, self.embedding, boxes_p, pb_p, valid,
                                    np.asarray(tokens, np.int32))
    h, w = self.image_size
    hp, wp = self._padded_hw
    logits = np.asarray(up[:n, :, :h, :w])
    cx, cy, bw, bh = np.moveaxis(np.asarray(pboxes[:n], np.float32), -1, 0)
    xyxy = np.stack([(cx - bw / 2) * wp, (cy - bh / 2) * hp,
                     (cx + bw / 2) * wp, (cy + bh / 2) * hp], -1)
    return Prediction(logits=logits, masks=logits > 0, ious=np.asarray(ious[:n]),
                      boxes=xyxy, levels=tokens)

  def decode_relative_points(self, points: np.ndarray, tokens: Sequence[int],
                             valid_count: int | None = None):
    """Device-side batch decode of relative clicks (for mask generation).

    ``points`` (N, 2) relative to the image, of which the first
    ``valid_count`` (default all) are real; N is padded to a prompt bucket.
    Returns (logits (N, L, Hp, Wp) on device, ious (N, L), N) -- logits are at
    the padded size; crop ``[:H, :W]`` for the image.
    """
    n = len(points)
    real = n if valid_count is None else int(valid_count)
    rel = np.concatenate([np.asarray(points, np.float32), np.zeros((n, 2), np.float32)], 1)
    dec_boxes, pb = ss.prompts_to_boxes(rel, False, self.image_size, self._padded_hw)
    nb = self._prompt_bucket(n)
    boxes_p = np.full((1, nb, 4), 0.5, np.float32)
    boxes_p[0, :n] = np.asarray(dec_boxes)
    valid = np.zeros((1, nb), bool)
    valid[0, :real] = True
    up, ious, _ = self._decode(self.params, self.embedding, boxes_p,
                               np.zeros((1, nb), np.int32), valid,
                               np.asarray(tuple(tokens), np.int32))
    return up, ious, n
