"""Interactive multi-granularity prediction: embed an image once, then decode
any number of click/box prompt batches against the cached embedding.

    predictor = SemanticSAMPredictor.from_torch("model.pth", "config.yaml")
    predictor.set_image(image_u8)                  # backbone + pixel decoder, once
    result = predictor.predict(points=[[120, 80]]) # decoder only
    result.masks   # (N, 6, H, W) bool: levels 1..6, fine to coarse

Static shapes: the image is zero padded to a size bucket and the prompts to a
prompt bucket (padded prompts are hidden from the attention), so after the
first call of a bucket nothing is compiled again.

Granularity is addressed in two vocabularies, each with its own keyword:

* user *levels* 1..6 from fine to coarse (``predict(levels=...)``, the
  automatic generator, the CLI), mapped to decoder tokens as the original
  does: 1->3, 2->2, 3->0, 4->4, 5->1, 6->5 (:data:`LEVEL_TO_TOKEN`);
* decoder *tokens* 0..5 (``predict(tokens=...)``, the order the network
  emits them; what the original ``evaluate_demo(level=...)`` takes).

Out-of-range values raise ``ValueError`` naming the right keyword.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from semsam_jax.models import semantic_sam as ss

NUM_TOKENS = 6
NUM_LEVELS = NUM_TOKENS  # kept for backwards compatibility
# User-facing granularity levels 1..6 (fine -> coarse) -> decoder token index.
LEVEL_TO_TOKEN = {1: 3, 2: 2, 3: 0, 4: 4, 5: 1, 6: 5}
TOKEN_TO_LEVEL = {t: l for l, t in LEVEL_TO_TOKEN.items()}
ALL_LEVELS = (1, 2, 3, 4, 5, 6)
# Prompt counts the decoder is compiled for (a call runs at the smallest one
# that fits; beyond the last, at the next multiple of it).
DEFAULT_PROMPT_BUCKETS = (1, 8, 32, 128)
# An opt-in size-bucket preset (padded side lengths); see ``size_buckets``.
SIZE_BUCKETS = (256, 384, 512, 640, 768, 1024, 1344, 1536, 2048)


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
  """Checked decoder token indices (0..5); ``None`` keeps all six in token order."""
  if levels is None:
    return tuple(range(NUM_TOKENS))
  out = []
  for t in np.asarray(levels).reshape(-1).tolist():
    if isinstance(t, bool) or not isinstance(t, (int, float)) or int(t) != t \
        or not 0 <= int(t) < NUM_TOKENS:
      raise ValueError(f"unknown granularity token {t!r}: tokens are 0..{NUM_TOKENS - 1} "
                       "(for the user levels 1..6 use levels=)")
    out.append(int(t))
  if not out:
    raise ValueError("tokens must not be empty")
  return tuple(out)


def user_levels_to_tokens(levels: Sequence[int]) -> tuple[int, ...]:
  """User granularity levels 1..6 -> decoder tokens (1->3, 2->2, 3->0, 4->4, 5->1, 6->5)."""
  out = []
  for l in np.asarray(levels).reshape(-1).tolist():
    if isinstance(l, bool) or not isinstance(l, (int, float)) or int(l) != l \
        or int(l) not in LEVEL_TO_TOKEN:
      raise ValueError(f"unknown granularity level {l!r}: levels are 1..6 (fine to coarse; "
                       "for decoder tokens 0..5 use tokens=)")
    out.append(LEVEL_TO_TOKEN[int(l)])
  if not out:
    raise ValueError("levels must not be empty")
  return tuple(out)


def resolve_tokens(levels: Sequence[int] | None = None,
                   tokens: Sequence[int] | None = None) -> tuple[int, ...]:
  """Decoder tokens from ``levels`` (user 1..6) or ``tokens`` (0..5); at most one
  may be given; neither: all six levels, fine to coarse."""
  if levels is not None and tokens is not None:
    raise ValueError("give levels= (user levels 1..6) or tokens= (decoder tokens 0..5), "
                     "not both")
  if tokens is not None:
    return levels_to_tokens(tokens)
  return user_levels_to_tokens(ALL_LEVELS if levels is None else levels)


def _bucket(value: int, buckets: Sequence[int] | None, multiple: int) -> int:
  """Smallest bucket >= ``value`` rounded up to ``multiple`` (no buckets: the rounding)."""
  up = -(-value // multiple) * multiple
  if not buckets:
    return up
  i = bisect.bisect_left(buckets, up)
  return buckets[i] if i < len(buckets) else up


def decoder_prompt_boxes(prompts: np.ndarray, is_box: np.ndarray, image_hw: tuple[int, int],
                         padded_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Relative prompts of the image -> decoder boxes of the padded canvas (host side).

  ``prompts`` (N, 4): clicks as ``x, y, *, *`` and boxes as ``cx, cy, w, h``,
  relative to the unpadded image; ``is_box`` (N,).  A click gets the
  original's 0.005 x 0.005 box.  Coordinates are rescaled in float32 as
  ``v * size / padded_size`` (multiply first, like the original).  Returns
  (N, 4) float32 boxes and (N,) int32 ``pb`` flags (1 for boxes).
  """
  prompts = np.asarray(prompts, np.float32).reshape(-1, 4).copy()
  is_box = np.asarray(is_box, bool).reshape(-1)
  prompts[~is_box, 2:] = np.float32(ss.CLICK_BOX_SIZE)
  (h, w), (hp, wp) = image_hw, padded_hw
  size = np.asarray([w, h, w, h], np.float32)
  padded = np.asarray([wp, hp, wp, hp], np.float32)
  return (prompts * size) / padded, is_box.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _embed_function(config: ml_collections.FrozenConfigDict):
  """The jitted image embedding of one model config, shared by every predictor
  of that config (a second predictor reuses the first one's compilations)."""
  model = ss.SemanticSAM(config)
  mean, std = config.pixel_mean, config.pixel_std

  def embed(params, image_u8_padded, hw):
    # Normalise, then zero everything outside the image: the canvas is the
    # zero-padded normalised image of the original whatever the bucket.
    hp, wp = image_u8_padded.shape[:2]
    x = ss.normalize_and_pad(image_u8_padded[None], mean, std, (hp, wp))
    inside = (jnp.arange(hp)[:, None] < hw[0]) & (jnp.arange(wp)[None, :] < hw[1])
    x = jnp.where(inside[None, :, :, None], x, 0.0)
    return model.apply({"params": params}, x, method=ss.SemanticSAM.embed_image)

  return jax.jit(embed)


@functools.lru_cache(maxsize=8)
def _decode_function(config: ml_collections.FrozenConfigDict, independent_prompts: bool):
  """The jitted prompt decoder (selected tokens, low resolution) of one config."""
  model = ss.SemanticSAM(config)

  def decode(params, embedding, boxes, pb, valid, tokens):
    out = model.apply({"params": params}, embedding, boxes[None], pb[None], valid[None],
                      independent_prompts=independent_prompts, return_aux=False,
                      method=ss.SemanticSAM.decode)
    masks = jnp.take(out["pred_masks"][0], tokens, axis=1)     # (S, L, h, w)
    ious = jnp.take(out["pred_ious"][0], tokens, axis=1)       # (S, L)
    boxes = jnp.take(out["pred_boxes"][0], tokens, axis=1)     # (S, L, 4)
    return masks, ious, boxes

  return jax.jit(decode)


@functools.partial(jax.jit, static_argnums=2)
def _upsample_one(lowres, index, padded_hw: tuple[int, int]):
  """Prompt ``index`` of (S, L, h, w) logits -> (L, Hp, Wp), bilinear with
  align_corners=False like the original's F.interpolate."""
  x = jax.lax.dynamic_index_in_dim(lowres, index, axis=0, keepdims=False)
  return jax.image.resize(x, x.shape[:1] + padded_hw, method="linear", antialias=False)


@dataclasses.dataclass
class Prediction:
  """Per prompt results, granularities in the order asked for.

  Prompts are ordered points first, then boxes.
  """
  logits: np.ndarray   # (N, L, H, W) float32 mask logits at image resolution
  masks: np.ndarray    # (N, L, H, W) bool (logits > 0)
  ious: np.ndarray     # (N, L) predicted IoU
  boxes: np.ndarray    # (N, L, 4) predicted boxes, pixel x0, y0, x1, y1 of the image
  levels: tuple[int, ...]  # user levels 1..6, one per L
  tokens: tuple[int, ...]  # the decoder token of each of them (0..5)


class SemanticSAMPredictor:
  """Interactive predictor on top of :class:`~semsam_jax.models.semantic_sam.SemanticSAM`.

  Args:
    config: the model config (``config.model`` section or a full config).
    params: the model parameters (numpy or jax arrays; moved to the default
      device once).
    size_buckets: allowed padded side lengths.  ``None`` (default) pads to a
      multiple of 32 exactly like the original (faithful: the golden parity
      tests run through this path).  A list such as :data:`SIZE_BUCKETS` pads
      each side further, to the next bucket, so images of nearby sizes share
      one compiled embedding function; this changes the results (the backbone
      and pixel decoder see a larger zero canvas; measured differences in
      docs/differences.md).  Sides above the last bucket fall back to the
      multiple of 32.
    prompt_buckets: prompt counts the decoder is compiled for; a call with N
      prompts runs at the smallest bucket >= N (more prompts: the next multiple
      of the largest bucket).  Padding prompts are hidden from the attention
      and do not change the results.
    independent_prompts: if True the prompts of one call do not attend to each
      other (block-diagonal self-attention, as in training), so a prompt's
      masks do not depend on the other prompts of the call.  The default
      (False) is the original demo behaviour: all prompts of one call interact.
  """

  def __init__(self, config, params, size_buckets: Sequence[int] | None = None,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               independent_prompts: bool = False):
    cfg = config.model if hasattr(config, "model") else config
    self.config = ss.freeze_config(cfg)
    self.params = jax.device_put(params)
    self.size_divisibility = max(int(self.config.size_divisibility), 1)
    if size_buckets:
      buckets = sorted(int(b) for b in size_buckets)
      bad = [b for b in buckets if b <= 0 or b % self.size_divisibility]
      if bad:
        raise ValueError(f"size buckets must be positive multiples of "
                         f"{self.size_divisibility}, got {bad}")
      self.size_buckets: tuple[int, ...] | None = tuple(buckets)
    else:
      self.size_buckets = None
    self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
    if not self.prompt_buckets or self.prompt_buckets[0] < 1:
      raise ValueError(f"prompt buckets must be positive, got {prompt_buckets}")
    self.independent_prompts = bool(independent_prompts)
    self.model = ss.SemanticSAM(self.config)
    self.embedding_calls = 0
    self._embedding = None
    self._image_hw: tuple[int, int] | None = None
    self._padded_hw: tuple[int, int] | None = None

    self._embed = _embed_function(self.config)
    self._decode = _decode_function(self.config, self.independent_prompts)
    self._upsample_one = _upsample_one

  # ---------------------------------------------------------------- loading

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike, **kwargs) -> "SemanticSAMPredictor":
    """From an orbax checkpoint written by ``python -m semsam_jax.convert``."""
    from semsam_jax.convert.checkpoint import load_checkpoint
    config, params = load_checkpoint(directory, validate=True)
    return cls(config, params, **kwargs)

  @classmethod
  def from_torch(cls, torch_checkpoint: str | os.PathLike,
                 reference_config: str | os.PathLike, **kwargs) -> "SemanticSAMPredictor":
    """From an original ``.pth`` and its YAML (converted on the fly, no torch needed)."""
    from semsam_jax.convert import convert_checkpoint
    config, params = convert_checkpoint(torch_checkpoint, reference_config=reference_config)
    return cls(config, params, **kwargs)

  # ---------------------------------------------------------------- image

  @property
  def image_size(self) -> tuple[int, int]:
    """(H, W) of the current image."""
    if self._image_hw is None:
      raise RuntimeError("call set_image() before predicting")
    return self._image_hw

  @property
  def padded_image_size(self) -> tuple[int, int]:
    """(Hp, Wp) of the canvas the current image was padded to."""
    if self._padded_hw is None:
      raise RuntimeError("call set_image() before predicting")
    return self._padded_hw

  def padded_size(self, height: int, width: int) -> tuple[int, int]:
    """The padded canvas size used for an image of ``height`` x ``width``."""
    m = self.size_divisibility
    return (_bucket(height, self.size_buckets, m), _bucket(width, self.size_buckets, m))

  def set_image(self, image) -> None:
    """Computes and caches the image embedding (backbone + pixel decoder).

    ``image``: uint8 (H, W, 3) RGB, (H, W) grayscale or (H, W, 4) RGBA.
    """
    image = to_rgb_uint8(image)
    h, w = image.shape[:2]
    hp, wp = self.padded_size(h, w)
    padded = np.zeros((hp, wp, 3), np.uint8)
    padded[:h, :w] = image
    self._embedding = None  # never keep the previous image's embedding on failure
    self._embedding = self._embed(self.params, padded, np.asarray([h, w], np.int32))
    self.embedding_calls += 1
    self._image_hw, self._padded_hw = (h, w), (hp, wp)

  def reset_image(self) -> None:
    """Drops the cached embedding."""
    self._embedding, self._image_hw, self._padded_hw = None, None, None

  @property
  def embedding(self) -> dict:
    if self._embedding is None:
      raise RuntimeError("call set_image() before predicting")
    return self._embedding

  # ---------------------------------------------------------------- prompts

  def _prompt_boxes(self, points, boxes, coords: str) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (N, 4) relative cx,cy,w,h of the unpadded image, (N,) is_box."""
    if coords not in ("pixels", "relative"):
      raise ValueError(f"coords must be 'pixels' or 'relative', got {coords!r}")
    h, w = self.image_size
    rows, is_box = [], []
    if points is not None:
      pts = np.asarray(points, np.float64)
      if pts.size == 0 or pts.shape[-1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {pts.shape}")
      pts = pts.reshape(-1, 2)
      if not np.isfinite(pts).all():
        raise ValueError("points must be finite numbers")
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
      bx = np.asarray(boxes, np.float64)
      if bx.size == 0 or bx.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (M, 4), got {bx.shape}")
      bx = bx.reshape(-1, 4)
      if not np.isfinite(bx).all():
        raise ValueError("boxes must be finite numbers")
      if coords == "pixels":  # x0, y0, x1, y1
        bad = ((bx[:, 0] < 0) | (bx[:, 1] < 0) | (bx[:, 2] > w) | (bx[:, 3] > h)
               | (bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1]))
        cxcywh = np.stack([(bx[:, 0] + bx[:, 2]) / 2 / w, (bx[:, 1] + bx[:, 3]) / 2 / h,
                           (bx[:, 2] - bx[:, 0]) / w, (bx[:, 3] - bx[:, 1]) / h], 1)
      else:  # cx, cy, w, h relative
        eps = 1e-6
        bad = ((bx[:, 2] <= 0) | (bx[:, 3] <= 0) | (bx[:, 0] - bx[:, 2] / 2 < -eps)
               | (bx[:, 1] - bx[:, 3] / 2 < -eps) | (bx[:, 0] + bx[:, 2] / 2 > 1 + eps)
               | (bx[:, 1] + bx[:, 3] / 2 > 1 + eps))
        cxcywh = bx
      if bad.any():
        raise ValueError(f"box(es) {bx[bad].tolist()} are empty or outside the {w}x{h} "
                         f"image ({coords} coordinates)")
      rows += cxcywh.tolist()
      is_box += [True] * len(cxcywh)
    if not rows:
      raise ValueError("give at least one point or box")
    return np.asarray(rows, np.float64), np.asarray(is_box, bool)

  def prompt_bucket(self, n: int) -> int:
    """Number of prompt slots a call with ``n`` prompts is padded to."""
    for b in self.prompt_buckets:
      if b >= n:
        return b
    top = self.prompt_buckets[-1]
    return -(-n // top) * top

  def _run_decoder(self, rel: np.ndarray, is_box: np.ndarray, tokens: Sequence[int],
                   slots: int, valid_count: int):
    """Decodes ``rel`` (N <= slots) padded to ``slots``; returns device arrays."""
    n = len(rel)
    if n > slots or not 0 <= valid_count <= n:
      raise ValueError(f"{n} prompts ({valid_count} valid) do not fit {slots} slots")
    dec, pb = decoder_prompt_boxes(rel, is_box, self.image_size, self.padded_image_size)
    boxes_p = np.full((slots, 4), 0.5, np.float32)
    boxes_p[:n] = dec
    pb_p = np.zeros((slots,), np.int32)
    pb_p[:n] = pb
    valid = np.zeros((slots,), bool)
    valid[:valid_count] = True
    return self._decode(self.params, self.embedding, boxes_p, pb_p, valid,
                        np.asarray(tokens, np.int32))

  def predict(self, points=None, boxes=None, levels: Sequence[int] | None = None,
              coords: str = "pixels", *, tokens: Sequence[int] | None = None) -> Prediction:
    """Decodes clicks and/or boxes against the current image (decoder only).

    Args:
      points: (N, 2) clicks ``x, y``: pixels (``0 <= x < W``) or relative in
        [0, 1].
      boxes: (M, 4) boxes: ``x0, y0, x1, y1`` in pixels, or ``cx, cy, w, h``
        relative to the image, depending on ``coords``.
      levels: user granularity levels 1 (finest) .. 6 (coarsest) to return,
        in that order (default: all six, fine to coarse), as in the CLI and
        the automatic generator.
      coords: ``"pixels"`` (default) or ``"relative"``.
      tokens: instead of ``levels``, decoder tokens 0..5 (the original's
        ``evaluate_demo(level=...)``), in that order.

    All prompts of one call are decoded together (they attend to each other
    unless ``independent_prompts``).

    Returns:
      A :class:`Prediction`; prompts are ordered points first, then boxes.

    Raises:
      ValueError: a prompt outside the image, an empty box, a level outside
        1..6 or a token outside 0..5, both levels and tokens, no prompt.
      RuntimeError: no image set.
    """
    tokens = resolve_tokens(levels, tokens)
    rel, is_box = self._prompt_boxes(points, boxes, coords)
    n = len(rel)
    lowres, ious, pboxes = self._run_decoder(rel, is_box, tokens, self.prompt_bucket(n), n)
    h, w = self.image_size
    hp, wp = self.padded_image_size
    logits = np.empty((n, len(tokens), h, w), np.float32)
    for i in range(n):  # upsample the real prompts only, one at a time
      up = self._upsample_one(lowres, np.int32(i), (hp, wp))
      logits[i] = np.asarray(up)[:, :h, :w]
    ious = np.asarray(ious)[:n]
    cx, cy, bw, bh = np.moveaxis(np.asarray(pboxes, np.float32)[:n], -1, 0)
    xyxy = np.stack([(cx - bw / 2) * wp, (cy - bh / 2) * hp,
                     (cx + bw / 2) * wp, (cy + bh / 2) * hp], -1)
    return Prediction(logits=logits, masks=logits > 0, ious=ious, boxes=xyxy,
                      levels=tuple(TOKEN_TO_LEVEL[t] for t in tokens), tokens=tokens)

  def decode_points(self, points: np.ndarray, tokens: Sequence[int], valid_count: int | None = None,
                    slots: int | None = None):
    """Device-side decode of relative clicks (used by the mask generator).

    Args:
      points: (N, 2) clicks ``x, y`` relative to the current image; the first
        ``valid_count`` (default all) are real, the rest are hidden padding.
      tokens: decoder tokens (0..5) to keep.
      slots: static number of prompt slots (default: the prompt bucket of N).

    Returns:
      ``(logits, ious)`` as device arrays: (slots, L, Hp/4, Wp/4) low-resolution
      mask logits of the padded canvas and (slots, L) predicted IoUs.
    """
    tokens = levels_to_tokens(tokens)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    n = len(pts)
    valid_count = n if valid_count is None else int(valid_count)
    rel = np.concatenate([pts, np.zeros((n, 2))], 1)
    slots = self.prompt_bucket(n) if slots is None else int(slots)
    lowres, ious, _ = self._run_decoder(rel, np.zeros(n, bool), tokens, slots, valid_count)
    return lowres, ious
