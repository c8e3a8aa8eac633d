"""Training prompts and targets from a batch (``prepare_targets_interactive`` /
``prepare_for_dn_mo`` of the reference), as pure functions of static shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semsam_jax.losses import boxes as box_ops

Array = jax.Array


def frame_scale(image_size: Array) -> Array:
  """(B, 2) (h, w) -> (B, 1, 4) [w, h, w, h] float32 divisor."""
  hw = image_size.astype(jnp.float32)
  h, w = hw[:, 0], hw[:, 1]
  return jnp.stack([w, h, w, h], axis=-1)[:, None, :]


def click_boxes(click_xy: Array, image_size: Array, half_size: float) -> Array:
  """Clicks (B, K, 2) pixels -> the reference's training boxes cxcywh
  ``xyxy_to_cxcywh([x - s, y - s, x + s, y + s]) / [w, h, w, h]`` (B, K, 4)."""
  xy = click_xy.astype(jnp.float32)
  xyxy = jnp.concatenate([xy - half_size, xy + half_size], axis=-1)
  return box_ops.xyxy_to_cxcywh(xyxy) / frame_scale(image_size)


def mask_boxes_cxcywh(mask_boxes: Array, image_size: Array) -> Array:
  """(B, M, 4) pixel XYXY -> cxcywh / [w, h, w, h] (the reference's ``ori_boxes``)."""
  return box_ops.xyxy_to_cxcywh(mask_boxes.astype(jnp.float32)) / frame_scale(image_size)


def box_prompt_flags(rng: Array, batch: dict, mode: str) -> Array:
  """(B, K) bool, prompts given as their mask's box instead of the click."""
  b, k = batch["prompt_valid"].shape
  if mode == "none":
    return jnp.zeros((b, k), bool)
  if mode == "all":
    return jnp.ones((b, k), bool)
  if mode == "reference_split":
    # box_start = randint((K-1)//2, K-1) inclusive; prompts >= box_start are boxes.
    start = jax.random.randint(rng, (b, 1), (k - 1) // 2, k)
    return jnp.arange(k)[None, :] >= start
  raise ValueError(f"unknown box_prompts mode {mode!r}")


def prompt_boxes(batch: dict, is_box: Array, cfg) -> tuple[Array, Array]:
  """Prompt boxes before noise (B, K, 4) and their pb flags (B, K) int32."""
  clicks = click_boxes(batch["click_xy"], batch["image_size"], cfg.click_box_half_size)
  own = jnp.take_along_axis(batch["mask_boxes"], batch["prompt_mask"][..., None], axis=1)
  boxes = jnp.where(is_box[..., None], mask_boxes_cxcywh(own, batch["image_size"]), clicks)
  if cfg.pb_quirk:
    pb = jnp.where(is_box, 0, 1)   # reference training: clicks 1, boxes 0
  else:
    pb = jnp.where(is_box, 1, 0)   # as at inference
  return boxes, pb.astype(jnp.int32)


def dn_noise(boxes: Array, is_box: Array, uniform: Array, cfg) -> Array:
  """The reference's denoising perturbation of the prompt boxes.

  ``box + ((U * 2 - 1) * diff) * scale`` with ``diff = [w/2, h/2, w, h]``
  (times ``click_noise_factor`` for clicks), clamped to [0, 1].  ``uniform``
  (B, K, 4) are the U ~ [0, 1) draws.
  """
  if cfg.dn == "no" or cfg.dn_noise_scale <= 0:
    return boxes
  wh = boxes[..., 2:]
  diff = jnp.concatenate([wh / 2, wh], axis=-1)
  diff = jnp.where(is_box[..., None], diff, diff * cfg.click_noise_factor)
  noised = boxes + ((uniform * 2 - 1.0) * diff) * cfg.dn_noise_scale
  return jnp.clip(noised, 0.0, 1.0)


def level_targets(batch: dict) -> dict:
  """Target slots per prompt: mask slot (B, K, T), validity, boxes (B, K, T, 4)."""
  index = batch["target_index"].astype(jnp.int32)
  valid = batch["target_valid"] & batch["prompt_valid"][..., None]
  b, k, t = index.shape
  all_boxes = mask_boxes_cxcywh(batch["mask_boxes"], batch["image_size"])
  boxes = jnp.take_along_axis(all_boxes, index.reshape(b, k * t)[..., None], axis=1)
  return {"index": index, "valid": valid, "boxes": boxes.reshape(b, k, t, 4)}


def normalize_images(images: Array, image_size: Array, mean, std) -> Array:
  """uint8 (B, H, W, 3) -> (x - mean) / std, zero at rows >= h / columns >= w
  (detectron2's ImageList padding of the unpadded frame)."""
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
      std, jnp.float32)
  hh, ww = images.shape[1:3]
  rows = jnp.arange(hh)[None, :, None] < image_size[:, 0, None, None]
  cols = jnp.arange(ww)[None, None, :] < image_size[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], x, 0.0)
