"""Shapes and inputs of the deformable attention benchmark (numpy only).

Imported by ``benchmarks/msda.py`` (JAX side) and ``benchmarks/msda_torch.py``
(PyTorch side, which runs in an interpreter without JAX), so both time the
very same arrays.

The sampling locations imitate the real model rather than being uniform
noise (the gathers' cache behaviour depends on it):

* encoder: every position of every level is a query; its reference point is
  its own pixel centre, and each head/level/point samples a few pixels away
  (the ``sampling_offsets`` initialisation pattern -- head direction times
  ``point + 1`` -- plus N(0, 1) pixel noise);
* decoder: box queries (centre uniform in [0.05, 0.95], size in [0.05, 0.5]);
  points spread over the box as ``centre + offset / P * size / 2`` with
  offsets around the same pattern.

Some locations fall outside [0, 1] in both cases, as in the model.
"""

from __future__ import annotations

import math

import numpy as np

HEADS = 8
HEAD_DIM = 32
POINTS = 4

ENCODER_LEVELS = ((128, 128), (64, 64), (32, 32))      # 1024² input, strides 8, 16, 32
DECODER_LEVELS = ENCODER_LEVELS + ((16, 16),)          # plus stride 64
SMALL_ENCODER_LEVELS = ((16, 16), (8, 8), (4, 4))
SMALL_DECODER_LEVELS = SMALL_ENCODER_LEVELS + ((2, 2),)


def cases(small: bool = False, decoder_queries=(1200, 6)) -> dict[str, dict]:
  """name -> {"levels", "queries", "kind"}; queries of the encoder = all positions."""
  enc = SMALL_ENCODER_LEVELS if small else ENCODER_LEVELS
  dec = SMALL_DECODER_LEVELS if small else DECODER_LEVELS
  out = {"encoder": {"levels": enc, "queries": sum(h * w for h, w in enc), "kind": "encoder"}}
  for q in ((60,) if small else tuple(decoder_queries)):
    out[f"decoder_q{q}"] = {"levels": dec, "queries": int(q), "kind": "decoder"}
  return out


def _offset_pattern(n_levels: int) -> np.ndarray:
  """(M, L, P, 2) head direction times (point + 1), as the module's bias init."""
  ang = np.arange(HEADS) * (2.0 * math.pi / HEADS)
  grid = np.stack([np.cos(ang), np.sin(ang)], -1)
  grid = grid / np.abs(grid).max(-1, keepdims=True)
  grid = np.tile(grid[:, None, None, :], (1, n_levels, POINTS, 1))
  return grid * np.arange(1, POINTS + 1)[None, None, :, None]


def make_inputs(case: dict, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
  """float32 value (B,S,M,D), sampling_locations (B,Lq,M,L,P,2),
  attention_weights (B,Lq,M,L,P) and an output cotangent (B,Lq,M*D)."""
  rng = np.random.default_rng(seed)
  levels = tuple(case["levels"])
  n_lvl = len(levels)
  s = sum(h * w for h, w in levels)
  lq = case["queries"]
  value = rng.standard_normal((batch, s, HEADS, HEAD_DIM), dtype=np.float32)
  pattern = _offset_pattern(n_lvl)
  offsets = pattern[None, None] + rng.standard_normal((batch, lq, HEADS, n_lvl, POINTS, 2))
  if case["kind"] == "encoder":
    centres = []
    for h, w in levels:
      ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
      centres.append(np.stack([xs.ravel(), ys.ravel()], -1))
    ref = np.concatenate(centres)                                       # (S, 2) = (Lq, 2)
    norm = np.asarray([[w, h] for h, w in levels], np.float64)          # (L, 2)
    loc = ref[None, :, None, None, None, :] + offsets / norm[None, None, None, :, None, :]
  else:
    centre = rng.uniform(0.05, 0.95, (batch, lq, 1, 1, 1, 2))
    size = rng.uniform(0.05, 0.5, (batch, lq, 1, 1, 1, 2))
    loc = centre + offsets / POINTS * size * 0.5
  logits = rng.standard_normal((batch, lq, HEADS, n_lvl * POINTS))
  aw = np.exp(logits - logits.max(-1, keepdims=True))
  aw = (aw / aw.sum(-1, keepdims=True)).reshape(batch, lq, HEADS, n_lvl, POINTS)
  cot = rng.standard_normal((batch, lq, HEADS * HEAD_DIM), dtype=np.float32)
  return {"value": value, "sampling_locations": loc.astype(np.float32),
          "attention_weights": aw.astype(np.float32), "cotangent": cot}
