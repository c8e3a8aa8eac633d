"""The jit-compiled, batched part of the evaluation: one image embedding, the
prompts decoded with the block-diagonal attention mask, and the per-token
IoUs (COCO interactive) or the matched IoUs (multi-granularity), all with
static shapes.

A batch holds ``B`` images of one padded size (Hp, Wp) on a canvas, each with
its own size ``image_hw``; prompts and masks are padded per image to a bucket
size with validity flags.  Like detectron2's ``ImageList``, pixels outside an
image are zero after normalisation, so every image sees exactly what the
original (batch size 1, padding to a multiple of 32) sees.

Post-processing as the original's ``evaluate_interactive``: the (h, w) = (Hp/4,
Wp/4) logits are upsampled bilinearly (align_corners=False) to (Hp, Wp), then
``sem_seg_postprocess`` crops them to the image and resizes them bicubically
with antialiasing to the *same* size, which is an identity (the bicubic
weights at integer offsets are exactly 1, 0, 0, 0; checked against the golden
``final_masks``); here the crop is a validity region.  Masks are ``logit > 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from semsam_jax.models import semantic_sam as ss
from semsam_jax.models.layers import inverse_sigmoid


@dataclasses.dataclass(frozen=True)
class MatcherWeights:
  """Costs of the training (many-to-many) matcher: mask BCE, dice, box L1, GIoU
  (the reference's ``MASK_WEIGHT``, ``DICE_WEIGHT``, ``BOX_WEIGHT``,
  ``GIOU_WEIGHT``)."""
  mask: float = 5.0
  dice: float = 5.0
  box: float = 5.0
  giou: float = 2.0


def _region(image_hw, padded_hw):
  rows = jnp.arange(padded_hw[0])[None, :, None] < image_hw[:, 0, None, None]
  cols = jnp.arange(padded_hw[1])[None, None, :] < image_hw[:, 1, None, None]
  return rows & cols  # (B, Hp, Wp)


def _upsample(logits, padded_hw):
  return ss.upsample_masks(logits, padded_hw, padded_hw)


def _cxcywh_to_xyxy(b):
  cx, cy, w, h = jnp.moveaxis(b, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def pairwise_giou(a, b):
  """GIoU of xyxy boxes a (..., N, 4) and b (..., M, 4) -> (..., N, M)."""
  a, b = a[..., :, None, :], b[..., None, :, :]
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a + area_b - inter
  iou = inter / jnp.maximum(union, 1e-12)
  lt_c = jnp.minimum(a[..., :2], b[..., :2])
  rb_c = jnp.maximum(a[..., 2:], b[..., 2:])
  wh_c = jnp.clip(rb_c - lt_c, 0)
  area_c = wh_c[..., 0] * wh_c[..., 1]
  return iou - (area_c - union) / jnp.maximum(area_c, 1e-12)


def matching_cost(logits, boxes, targets, target_boxes, region, weights: MatcherWeights):
  """Training-matcher cost between T outputs and T' targets of each prompt.

  Args:
    logits: (B, T, Hp, Wp) upsampled mask logits; boxes: (B, T, 4) cxcywh.
    targets: (B, T', Hp, Wp) bool; target_boxes: (B, T', 4) cxcywh (padded frame).
    region: (B, Hp, Wp) bool, the image's pixels (the costs average over them).

  Returns:
    (B, T, T') cost = w_mask * BCE + w_dice * dice + w_box * L1 + w_giou * (-GIoU).
  """
  r = region[:, None].astype(jnp.float32)
  t = targets.astype(jnp.float32)
  npx = jnp.maximum(r.sum((-2, -1)), 1.0)                         # (B, 1)
  softplus = jax.nn.softplus(logits) * r
  bce = (softplus.sum((-2, -1))[..., None]
         - jnp.einsum("bohw,bthw->bot", logits * r, t)) / npx[..., None]
  prob = jax.nn.sigmoid(logits) * r
  numer = 2.0 * jnp.einsum("bohw,bthw->bot", prob, t)
  denom = prob.sum((-2, -1))[..., None] + t.sum((-2, -1))[:, None, :]
  dice = 1.0 - (numer + 1.0) / (denom + 1.0)
  l1 = jnp.abs(boxes[:, :, None, :] - target_boxes[:, None, :, :]).sum(-1)
  giou = pairwise_giou(_cxcywh_to_xyxy(boxes), _cxcywh_to_xyxy(target_boxes))
  return weights.mask * bce + weights.dice * dice + weights.box * l1 - weights.giou * giou


def best_assignment(cost, valid):
  """Exact minimum-cost assignment of valid targets to distinct outputs.

  cost (B, T, T') with T' <= T, valid (B, T') -> (B, T') output index per
  target.  Enumerates every injective map (T!/(T-T')! of them: 720 for 6x6),
  which is exact and jit-friendly at these sizes.
  """
  t, tp = cost.shape[-2:]
  perms = np.asarray(list(itertools.permutations(range(t), tp)), np.int32)   # (P, T')
  picked = cost[:, perms, np.arange(tp)[None, :]]                           # (B, P, T')
  total = jnp.sum(jnp.where(valid[:, None, :], picked, 0.0), -1)
  best = jnp.argmin(total, axis=-1)
  return jnp.asarray(perms)[best]


def _forward(model, params, images, image_hw, boxes, valid, mean, std):
  padded_hw = images.shape[1:3]
  region = _region(image_hw, padded_hw)
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  x = jnp.where(region[..., None], x, 0.0)
  emb = model.apply({"params": params}, x, decoder_memory=False, method=ss.SemanticSAM.embed_image)

  def decode(b, v):
    pb = jnp.zeros(b.shape[:2], jnp.int32)
    return model.apply({"params": params}, emb, b, pb, v, independent_prompts=True,
                       return_aux=False, method=ss.SemanticSAM.decode)
  return region, decode


def make_score_fn(config, *, interactive: bool = True, granularity: bool = False,
                  return_raw: bool = False, prompt_chunk: int = 8,
                  weights: MatcherWeights = MatcherWeights()):
  """Jit-compiled ``score(params, batch) -> dict`` for one batch.

  ``batch`` (numpy or jax arrays, batch dim first):
    ``image`` (B, Hp, Wp, 3) uint8 canvas, ``image_hw`` (B, 2) int32;
    COCO interactive: ``boxes`` (B, N, 4), ``prompt_valid`` (B, N),
    ``gt_masks`` (B, N, Hp, Wp) bool (the GT of each prompt);
    multi-granularity: ``mg_boxes`` (B, K, 4), ``mg_valid`` (B, K),
    ``mg_masks`` (B, M, Hp, Wp) bool, ``mg_mask_boxes`` (B, M, 4) cxcywh of the
    padded frame, ``mg_target_index`` (B, K, T') and ``mg_target_valid``.

  Returns ``ious`` (B, N, T) and ``pred_ious`` (B, N, T) (interactive; with
  ``return_raw`` also the last layer's ``pred_masks``, ``pred_boxes`` and the
  decoder's initial ``reference_boxes`` (B, N, T, 4)), and ``mg_ious``
  (B, K, T') with ``mg_assignment`` (B, K, T') (multi-granularity).
  """
  cfg = ss.freeze_config(config)
  model = ss.SemanticSAM(cfg)
  t = cfg.decoder.num_mask_tokens

  def chunked_map(fn, xs):
    return jax.lax.map(fn, xs, batch_size=prompt_chunk)

  @jax.jit
  def score(params, batch):
    images = batch["image"]
    padded_hw = images.shape[1:3]
    region, decode = _forward(model, params, images, batch["image_hw"], None, None,
                              cfg.pixel_mean, cfg.pixel_std)
    out = {}
    if interactive:
      res = decode(batch["boxes"], batch["prompt_valid"])

      def per_prompt(args):
        logits, gt = args                                     # (B, T, h, w), (B, Hp, Wp)
        pred = (_upsample(logits, padded_hw) > 0) & region[:, None]
        gt = gt[:, None]
        inter = jnp.sum(pred & gt, (-2, -1)).astype(jnp.float32)
        union = jnp.sum(pred | gt, (-2, -1)).astype(jnp.float32)
        return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)

      ious = chunked_map(per_prompt, (jnp.moveaxis(res["pred_masks"], 1, 0),
                                      jnp.moveaxis(batch["gt_masks"], 1, 0)))
      out["ious"] = jnp.moveaxis(ious, 0, 1)
      out["pred_ious"] = res["pred_ious"]
      if return_raw:
        out["pred_masks"] = res["pred_masks"]
        out["pred_boxes"] = res["pred_boxes"]
        ref = jax.nn.sigmoid(inverse_sigmoid(jnp.asarray(batch["boxes"], jnp.float32)))
        out["reference_boxes"] = jnp.broadcast_to(ref[:, :, None], ref.shape[:2] + (t, 4))
    if granularity:
      res = decode(batch["mg_boxes"], batch["mg_valid"])
      masks, mboxes = batch["mg_masks"], batch["mg_mask_boxes"]

      def per_click(args):
        logits, boxes, tidx, tvalid = args       # (B,T,h,w) (B,T,4) (B,T') (B,T')
        up = _upsample(logits, padded_hw)
        tgt = jnp.take_along_axis(masks, tidx[:, :, None, None], axis=1)   # (B, T', Hp, Wp)
        tbox = jnp.take_along_axis(mboxes, tidx[:, :, None], axis=1)
        cost = matching_cost(up, boxes, tgt, tbox, region, weights)
        assign = best_assignment(cost, tvalid)                            # (B, T')
        pred = jnp.take_along_axis(up, assign[:, :, None, None], axis=1) > 0
        pred = pred & region[:, None]
        inter = jnp.sum(pred & tgt, (-2, -1)).astype(jnp.float32)
        union = jnp.sum(pred | tgt, (-2, -1)).astype(jnp.float32)
        iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)
        return jnp.where(tvalid, iou, 0.0), assign

      ious, assign = chunked_map(per_click, (
          jnp.moveaxis(res["pred_masks"], 1, 0), jnp.moveaxis(res["pred_boxes"], 1, 0),
          jnp.moveaxis(batch["mg_target_index"], 1, 0),
          jnp.moveaxis(batch["mg_target_valid"], 1, 0)))
      out["mg_ious"] = jnp.moveaxis(ious, 0, 1)
      out["mg_assignment"] = jnp.moveaxis(assign, 0, 1)
    return out

  return score
