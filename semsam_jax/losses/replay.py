"""Replay of recorded training steps of the original code (the golden
``train_*`` data): the docs/training.md batch and the explicit draws that make
:func:`semsam_jax.losses.make_objective` repeat the recorded step.

The reference lists its matched pairs sorted by query; its per-pair draws
(mask-loss points) are therefore mapped onto our (prompt, target slot)
layout through the recorded matching.
"""

from __future__ import annotations

import re

import numpy as np

_DROP_KEY = re.compile(r"^draw/droppath/(?:model\.)?backbone\.layers\.(\d+)\.blocks\.(\d+)"
                       r"\.drop_path/keep#([01])$")


def target_offsets(level_target_len: np.ndarray) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(level_target_len)]).astype(np.int64)


def batch_from_reference(data: dict, num_tokens: int) -> dict:
  """One-image batch (docs/training.md layout) from a recorded step."""
  hp, wp = data["tgt_ori_masks"].shape[1:]
  img = data["image_u8"]
  h, w = img.shape[:2]
  if wp % 8:
    raise ValueError(f"padded width {wp} is not a multiple of 8 (bit packing)")
  image = np.zeros((hp, wp, 3), np.uint8)
  image[:h, :w] = img
  masks = np.packbits(data["tgt_ori_masks"].astype(bool), axis=-1, bitorder="little")
  m = masks.shape[0]
  lens = data["level_target_len"].astype(np.int64)
  flat = data["level_target_flat"].astype(np.int64)
  k = lens.shape[0]
  if lens.max() > num_tokens:
    raise ValueError(f"a prompt has {lens.max()} level targets > {num_tokens} tokens")
  off = target_offsets(lens)
  index = np.zeros((k, num_tokens), np.int32)
  valid = np.zeros((k, num_tokens), bool)
  for i in range(k):
    index[i, :lens[i]] = flat[off[i]:off[i + 1]]
    valid[i, :lens[i]] = True
  return {
      "image": image[None],
      "image_size": np.asarray([[h, w]], np.int32),
      "masks": masks[None],
      "mask_valid": np.ones((1, m), bool),
      "mask_boxes": data["gt_boxes_xyxy"].astype(np.float32)[None],
      "click_xy": data["click_xy"].astype(np.int32)[None],
      "prompt_mask": data["tgt_index"].astype(np.int32)[None],
      "prompt_valid": np.ones((1, k), bool),
      "target_index": index[None],
      "target_valid": valid[None],
      "example_id": np.zeros((1,), np.int32),
  }


def pair_slots(data: dict, num_tokens: int):
  """For each recorded pair n: (prompt, target slot, token) in our layout."""
  lens = data["level_target_len"].astype(np.int64)
  off = target_offsets(lens)
  tgt = data["match_target"].astype(np.int64)
  prompt = np.searchsorted(off, tgt, side="right") - 1
  slot = tgt - off[prompt]
  token = data["match_query"].astype(np.int64) - prompt * num_tokens
  return prompt, slot, token


def drop_path_keep(data: dict) -> dict:
  """The recorded Swin keep decisions as the model's ``drop_path_keep`` collection."""
  tree: dict = {}
  for key, value in data.items():
    mt = _DROP_KEY.match(key)
    if not mt:
      continue
    i, j, branch = mt.groups()
    blk = tree.setdefault("backbone", {}).setdefault(f"layers_{i}", {}).setdefault(
        f"blocks_{j}", {})
    blk["attn" if branch == "0" else "mlp"] = np.asarray(value, np.float32).reshape(-1)
  return tree


def per_pair_to_slots(values: np.ndarray, data: dict, num_tokens: int) -> np.ndarray:
  """(N, ...) rows in the reference's pair order -> (1, K, T, ...) slots (zeros
  where no target)."""
  prompt, slot, _ = pair_slots(data, num_tokens)
  k = data["level_target_len"].shape[0]
  out = np.zeros((1, k, num_tokens) + values.shape[1:], values.dtype)
  out[0, prompt, slot] = values
  return out


def slots_to_per_pair(values: np.ndarray, data: dict, num_tokens: int) -> np.ndarray:
  """Inverse of :func:`per_pair_to_slots` for image 0 of (B, K, T, ...)."""
  prompt, slot, _ = pair_slots(data, num_tokens)
  return np.asarray(values)[0, prompt, slot]


def draws_from_reference(data: dict, num_tokens: int, num_layers: int) -> dict:
  """Explicit draws for :func:`~semsam_jax.losses.objective.make_objective`."""
  mask_points = []
  for li in range(num_layers):
    cand = data[f"draw/loss_{li}/masks/rand#0"]
    extra = data[f"draw/loss_{li}/masks/rand#1"]
    mask_points.append((per_pair_to_slots(cand, data, num_tokens),
                        per_pair_to_slots(extra, data, num_tokens)))
  return {
      "drop_path_keep": drop_path_keep(data),
      "dn_uniform": data["draw/dn/rand_like#0"].astype(np.float32),
      "matcher_points": data["draw/matcher/rand#0"].astype(np.float32),
      "mask_points": mask_points,
  }
