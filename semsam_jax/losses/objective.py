"""The training objective: ``make_loss_fn(config) -> loss_fn(params, batch, rng)``.

Stages (each a pure function, each replaceable through :func:`make_loss_fn`'s
keyword arguments, so research variants need no fork):

1. prompts (:mod:`semsam_jax.losses.prompts`): click boxes with pb, optional
   box prompts, denoising noise;
2. the model's training-mode forward (block-diagonal self attention between
   prompts, drop-path under ``deterministic=False``, every decoder layer);
3. matching on the last layer (:func:`semsam_jax.losses.matcher.match`), reused
   for every layer;
4. per layer: point sampling and the five terms
   (:func:`semsam_jax.losses.criterion.layer_terms`);
5. sums over the valid level targets of the whole batch / normaliser, weights.

Random draws come from ``rng`` (named streams, see :func:`draw_keys`) unless
given explicitly in ``draws`` (for replaying recorded draws, see
:func:`objective`).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from semsam_jax.losses import criterion as crit
from semsam_jax.losses import matcher as matcher_lib
from semsam_jax.losses import points as pts
from semsam_jax.losses import prompts as prompts_lib
from semsam_jax.losses.config import loss_config, validate
from semsam_jax.models.swin import DROP_PATH_KEEP

Array = jax.Array

STREAMS = ("dropout", "box_prompts", "dn", "matcher", "mask_points")

WEIGHT_FIELDS = {
    "loss_mask_bce": "weight_mask_bce",
    "loss_mask_dice": "weight_mask_dice",
    "iou_score_loss": "weight_iou",
    "loss_bbox": "weight_bbox",
    "loss_giou": "weight_giou",
}


def draw_keys(rng: Array) -> dict:
  """The objective's named rng streams (``fold_in`` of the step key)."""
  return {name: jax.random.fold_in(rng, i) for i, name in enumerate(STREAMS)}


def _sections(config):
  if "model" in config:
    model_cfg = config.model
    loss_cfg = config.get("loss", None)
  else:
    model_cfg, loss_cfg = config, None
  if loss_cfg is None:
    loss_cfg = loss_config()
  validate(loss_cfg)
  return model_cfg, ml_collections.FrozenConfigDict(loss_cfg)


def default_forward(model, params, images, boxes, pb, valid, rng, deterministic, keep):
  """Training-mode forward -> list of per-layer output dicts, first layer first."""
  variables = {"params": params}
  if keep is not None:
    variables[DROP_PATH_KEEP] = keep
  out = model.apply(variables, images, boxes, pb, valid, independent_prompts=True,
                    return_aux=True, deterministic=deterministic, rngs={"dropout": rng})
  last = {k: out[k] for k in ("pred_masks", "pred_boxes", "pred_ious")}
  return list(out.get("aux_outputs", [])) + [last]


def make_objective(config, *, matcher: Optional[Callable] = None,
                   point_sampler: Optional[Callable] = None,
                   terms_fn: Optional[Callable] = None,
                   forward: Optional[Callable] = None):
  """Like :func:`make_loss_fn` but the returned function gives ``(loss,
  details)``: ``details`` holds ``metrics`` plus every intermediate
  (``prompts``, ``layers`` (decoder outputs, first layer first), ``match``,
  ``terms`` (per loss index, 0 = last layer, then the others first to last),
  ``normalizer``, ``targets``).

  The returned ``objective(params, batch, rng, *, deterministic=False,
  normalizer=None, draws=None)`` accepts explicit ``draws`` (any subset):
  ``drop_path_keep`` (the model's ``drop_path_keep`` collection),
  ``dn_uniform`` (B, K, 4), ``matcher_points`` (B, P, 2) and ``mask_points``
  (a list over loss indices of ``(candidates (B, K, T, C, 2), extra
  (B, K, T, E, 2))``).
  """
  from semsam_jax.models.semantic_sam import SemanticSAM, freeze_config  # heavy import
  model_cfg, cfg = _sections(config)
  model = SemanticSAM(freeze_config(model_cfg))
  match_fn = matcher or matcher_lib.match
  terms = terms_fn or crit.layer_terms
  fwd = forward or default_forward
  num_points = int(cfg.train_num_points)

  def objective(params, batch, rng, *, deterministic: bool = False,
                normalizer=None, draws: Optional[dict] = None):
    draws = dict(draws or {})
    keys = draw_keys(rng)
    batch = dict(batch)
    b, k = batch["prompt_valid"].shape
    t = batch["target_index"].shape[-1]

    # 1. prompts
    is_box = prompts_lib.box_prompt_flags(keys["box_prompts"], batch, cfg.box_prompts)
    boxes, pb = prompts_lib.prompt_boxes(batch, is_box, cfg)
    uniform = draws.get("dn_uniform")
    if uniform is None:
      uniform = jax.random.uniform(keys["dn"], boxes.shape, jnp.float32)
    noised = prompts_lib.dn_noise(boxes, is_box, uniform, cfg)

    # 2. forward
    images = prompts_lib.normalize_images(batch["image"], batch["image_size"],
                                          model_cfg.pixel_mean, model_cfg.pixel_std)
    layers = fwd(model, params, images, noised, pb, batch["prompt_valid"], keys["dropout"],
                 deterministic, draws.get("drop_path_keep"))
    layers = [{n: v.astype(jnp.float32) for n, v in layer.items()} for layer in layers]
    if layers[-1]["pred_masks"].shape[2] != t:
      raise ValueError(f"the batch has {t} target slots per prompt but the decoder "
                       f"{layers[-1]['pred_masks'].shape[2]} tokens")

    # 3. matching (last layer)
    tg = prompts_lib.level_targets(batch)
    masks = batch["masks"]
    mpts = draws.get("matcher_points")
    if mpts is None:
      mpts = jax.random.uniform(keys["matcher"], (b, num_points, 2), jnp.float32)
    last = layers[-1]
    pm = last["pred_masks"]
    q_maps = pm.reshape((b, k * t) + pm.shape[3:])
    q_index = jnp.arange(k * t, dtype=jnp.int32).reshape(1, k, t)
    q_index = jnp.broadcast_to(q_index, (b, k, t))
    shared = mpts[:, None, None]   # (B, 1, 1, P, 2): one set for every query / target
    impl = cfg.get("point_impl", "auto")
    pred_pts = jax.lax.stop_gradient(pts.sample_maps(jax.lax.stop_gradient(q_maps), q_index,
                                                     shared, impl=impl))
    tgt_pts = pts.sample_packed_masks(masks, tg["index"], shared, impl=impl)
    m = match_fn(pred_pts, tgt_pts, jax.lax.stop_gradient(last["pred_boxes"]), tg["boxes"],
                 tg["valid"], cfg)
    token = jax.lax.stop_gradient(m["token"]).astype(jnp.int32)

    # 4. losses per layer: index 0 = last layer, then the others in order
    order = [len(layers) - 1] + list(range(len(layers) - 1))
    if not cfg.deep_supervision:
      order = order[:1]
    valid = tg["valid"].astype(jnp.float32)
    count = valid.sum()
    norm = jnp.maximum(count, 1.0) if normalizer is None else jnp.asarray(normalizer,
                                                                          jnp.float32)
    given = draws.get("mask_points")
    metrics, all_terms = {}, []
    total = jnp.zeros((), jnp.float32)
    for li, layer_id in enumerate(order):
      layer_key = jax.random.fold_in(keys["mask_points"], li)
      seeds = None
      if given is not None:
        cand, extra = given[li]
      elif cfg.get("point_draws", "hash") == "hash":
        cand = extra = None
        seeds = jax.random.bits(layer_key, (b, k, t), jnp.uint32)
      else:
        cand, extra = pts.draw_point_candidates(layer_key, (b, k, t), num_points,
                                                cfg.oversample_ratio,
                                                cfg.importance_sample_ratio)
      kwargs = {"point_sampler": point_sampler}
      if seeds is not None:
        kwargs["seeds"] = seeds
      lt = terms(layers[layer_id], token, tg["index"], tg["boxes"], masks, cand, extra, cfg,
                 **kwargs)
      all_terms.append(lt)
      for name in crit.TERMS:
        if name not in lt:
          continue
        value = jnp.sum(jnp.where(tg["valid"], lt[name], 0.0)) / norm
        value = value * float(cfg[WEIGHT_FIELDS[name]])
        metrics[f"{name}_{li}"] = value
        total = total + value
    metrics["num_targets"] = count
    details = {"metrics": metrics, "layers": layers, "match": m, "token": token,
               "terms": all_terms, "normalizer": norm, "targets": tg,
               "prompts": {"boxes": boxes, "noised": noised, "pb": pb, "is_box": is_box},
               "matcher_points": {"pred": pred_pts, "target": tgt_pts}}
    return total, details

  return objective


def make_loss_fn(config, *, matcher: Optional[Callable] = None,
                 point_sampler: Optional[Callable] = None,
                 terms_fn: Optional[Callable] = None,
                 forward: Optional[Callable] = None):
  """The training objective of docs/training.md.

  Args:
    config: the whole ConfigDict (``config.model``, optional ``config.loss``
      defaulting to :func:`semsam_jax.losses.config.loss_config`), or a bare
      model section.
    matcher: replaces :func:`semsam_jax.losses.matcher.match` (same
      signature: ``(pred_point_logits (B,K,T,P), target_point_values
      (B,K,T,P), pred_boxes (B,K,T,4), target_boxes (B,K,T,4), target_valid
      (B,K,T), loss_cfg) -> {"token": (B,K,T) int, ...}``).
    point_sampler: replaces :func:`semsam_jax.losses.points.uncertain_point_coords`.
    terms_fn: replaces :func:`semsam_jax.losses.criterion.layer_terms`.
    forward: replaces :func:`default_forward`.

  Returns:
    ``loss_fn(params, batch, rng, *, deterministic=False, normalizer=None)
    -> (loss, metrics)``: float32 scalar total and the weighted terms
    (``loss_mask_bce_0`` ... with ``_0`` the last layer) and ``num_targets``.
  """
  objective = make_objective(config, matcher=matcher, point_sampler=point_sampler,
                             terms_fn=terms_fn, forward=forward)

  def loss_fn(params, batch, rng, *, deterministic: bool = False, normalizer=None):
    loss, details = objective(params, batch, rng, deterministic=deterministic,
                              normalizer=normalizer)
    return loss, details["metrics"]

  return loss_fn
