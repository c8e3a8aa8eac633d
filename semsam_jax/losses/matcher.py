"""Many-to-many matching (the reference's ``M2MHungarianMatcher``), exact and
jittable with static shapes.

The reference solves one assignment over all Q = K*T queries and N level
targets of an image, with cost 1e6 between a query and a target of another
prompt.  Since every prompt has at most T targets and exactly T queries, the
optimum never pays 1e6 and the problem splits into K independent T x (<= T)
blocks.  Each block is solved exactly by enumerating the T! assignments of
its queries (720 for T = 6), batched over prompts and images, with no host
round trip and no gradient through the indices.

Layout: costs are (B, K, T_queries, T_targets); ``token`` (B, K, T_targets) is
the query (granularity token) of the prompt matched to each target slot.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from semsam_jax.losses import boxes as box_ops

Array = jax.Array

# Enumerating permutations is exact; beyond this many tokens it gets too big.
MAX_PERMUTATION_TOKENS = 8


@functools.lru_cache(maxsize=None)
def permutations(n: int) -> np.ndarray:
  """(n!, n) int32, all permutations of range(n) in lexicographic order."""
  if n > MAX_PERMUTATION_TOKENS:
    raise ValueError(f"exact block matching enumerates T! assignments; T = {n} > "
                     f"{MAX_PERMUTATION_TOKENS} is too many")
  return np.asarray(list(itertools.permutations(range(n))), np.int32).reshape(-1, n)


def pairwise_mask_costs(pred_logits: Array, tgt_labels: Array) -> tuple[Array, Array]:
  """Point BCE and dice costs within each prompt block.

  Args:
    pred_logits: (B, K, Tq, P) logits of every query at the shared points.
    tgt_labels: (B, K, Tt, P) target values at the same points.

  Returns:
    (cost_mask, cost_dice), each (B, K, Tq, Tt).
  """
  x = pred_logits.astype(jnp.float32)
  t = tgt_labels.astype(jnp.float32)
  p = x.shape[-1]
  pos = jax.nn.softplus(-x)   # BCE(x, 1)
  neg = jax.nn.softplus(x)    # BCE(x, 0)
  cost_mask = (jnp.einsum("bkqp,bktp->bkqt", pos, t)
               + jnp.einsum("bkqp,bktp->bkqt", neg, 1.0 - t)) / p
  s = jax.nn.sigmoid(x)
  num = 2.0 * jnp.einsum("bkqp,bktp->bkqt", s, t)
  den = s.sum(-1)[..., :, None] + t.sum(-1)[..., None, :]
  cost_dice = 1.0 - (num + 1.0) / (den + 1.0)
  return cost_mask, cost_dice


def pairwise_box_costs(pred_boxes: Array, tgt_boxes: Array) -> tuple[Array, Array]:
  """L1 distance and GIoU within each prompt block.

  Args:
    pred_boxes: (B, K, Tq, 4) cxcywh; tgt_boxes: (B, K, Tt, 4) cxcywh.

  Returns:
    (cost_bbox, giou), each (B, K, Tq, Tt); the matching cost uses -giou.
  """
  a = pred_boxes.astype(jnp.float32)[..., :, None, :]
  b = tgt_boxes.astype(jnp.float32)[..., None, :, :]
  cost_bbox = jnp.abs(a - b).sum(-1)
  giou = box_ops.generalized_box_iou(box_ops.cxcywh_to_xyxy(a), box_ops.cxcywh_to_xyxy(b))
  return cost_bbox, giou


def matching_costs(pred_logits, tgt_labels, pred_boxes, tgt_boxes, cfg) -> dict:
  """Every cost term and the weighted total (B, K, Tq, Tt), as the reference
  (mask + dice + box + giou; no class cost)."""
  cost_mask, cost_dice = pairwise_mask_costs(pred_logits, tgt_labels)
  cost_bbox, giou = pairwise_box_costs(pred_boxes, tgt_boxes)
  total = (cfg.cost_mask * cost_mask + cfg.cost_dice * cost_dice
           + cfg.cost_box * cost_bbox + cfg.cost_giou * (-giou))
  return {"cost_mask": cost_mask, "cost_dice": cost_dice, "cost_bbox": cost_bbox,
          "giou": giou, "total": total}


def solve_blocks(cost: Array, target_valid: Array) -> Array:
  """Exact minimum-cost assignment in every (Tq x Tt) block, Tt <= Tq.

  Args:
    cost: (..., Tq, Tt) costs; target_valid: (..., Tt) bool, False for
      padding slots (they cost nothing, whatever query they get).

  Returns:
    (..., Tt) int32: the query assigned to each target slot; distinct within
    a block (padding slots get the queries left over).  No gradient.
  """
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  tq, tt = cost.shape[-2:]
  if tt > tq:
    raise ValueError(f"{tt} target slots for {tq} queries: the reference asserts "
                     "targets per prompt <= tokens")
  perms = permutations(tq)[:, :tt]                     # (n!, Tt), query of slot j
  if tt < tq:
    perms = np.unique(perms, axis=0)                   # keep lexicographic order
  cost = jnp.where(target_valid[..., None, :], cost, 0.0)
  cost = jnp.where(jnp.isfinite(cost), cost, jnp.finfo(jnp.float32).max / (4 * tt))
  gathered = cost[..., perms, np.arange(tt)[None, :]]  # (..., n!, Tt)
  best = jnp.argmin(gathered.sum(-1), axis=-1)
  return jnp.asarray(perms)[best]


def match(pred_logits, tgt_labels, pred_boxes, tgt_boxes, target_valid, cfg) -> dict:
  """The default matcher: costs of :func:`matching_costs`, exact blocks.

  Returns ``{"token": (B, K, Tt) int32, "costs": {...}}``.
  """
  costs = matching_costs(pred_logits, tgt_labels, pred_boxes, tgt_boxes, cfg)
  token = solve_blocks(costs["total"], target_valid)
  return {"token": jax.lax.stop_gradient(token), "costs": costs}
