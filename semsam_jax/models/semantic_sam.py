"""The whole Semantic-SAM model: image embedding (backbone + pixel decoder) and
prompt decoding (granularity decoder), plus the reference's pre/post-processing.

Two halves can be called separately so one image embedding serves many prompt
batches::

    model = SemanticSAM(config.model)
    emb = model.apply({"params": params}, images, method=SemanticSAM.embed_image)
    out = model.apply({"params": params}, emb, boxes, pb, valid,
                      method=SemanticSAM.decode)

``forward_fn(config)`` returns the jit-compiled pure function
``(params, image, boxes, pb) -> outputs`` that reproduces the reference
``evaluate_demo`` end to end (normalisation, padding to a multiple of 32,
prompt scaling, decoding, upsampling of the selected granularity tokens).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from semsam_jax.config import remat_granularities, remat_policy
from semsam_jax.models.granularity_decoder import GranularityDecoder
from semsam_jax.models.pixel_decoder import DeformablePixelDecoder
from semsam_jax.models.swin import SwinTransformer

# Width/height given to a click when it is turned into a box prompt.
CLICK_BOX_SIZE = 0.005


def _dtype(name: str):
  return jnp.dtype(name)


def freeze_config(cfg) -> ml_collections.FrozenConfigDict:
  if isinstance(cfg, ml_collections.FrozenConfigDict):
    return cfg
  return ml_collections.FrozenConfigDict(cfg)


class SemanticSAM(nn.Module):
  """Swin backbone -> deformable pixel decoder -> granularity decoder."""
  config: Any  # the ``model`` section of a config (see semsam_jax.config)

  def setup(self):
    cfg = freeze_config(self.config)
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    remat = remat_granularities(cfg)
    policy = remat_policy(cfg) if remat else None
    self.backbone = SwinTransformer.from_config(
        cfg.backbone, token_chunk=int(cfg.get("backbone_token_chunk", 0)),
        attention_impl=str(cfg.get("window_attention_impl", "auto")), dtype=dtype,
        param_dtype=pdtype, remat="block" in remat, remat_stages="stage" in remat,
        remat_policy=policy)
    e = cfg.backbone.embed_dim
    in_channels = {f"res{i + 2}": e * 2 ** i for i in range(4)}
    self.pixel_decoder = DeformablePixelDecoder.from_config(
        cfg.pixel_decoder, in_channels=in_channels, msda_impl=cfg.msda_impl,
        query_chunk=int(cfg.get("memory_token_chunk", 0)),
        remat_encoder_layers="encoder_layer" in remat, remat_policy=policy, dtype=dtype,
        param_dtype=pdtype)
    self.predictor = GranularityDecoder.from_config(
        cfg.decoder, msda_impl=cfg.msda_impl, memory_chunk=int(cfg.get("memory_token_chunk", 0)),
        remat_layers="decoder_layer" in remat, remat_policy=policy, dtype=dtype,
        param_dtype=pdtype)

  def embed_image(self, images, deterministic: bool = True,
                  decoder_memory: bool = True) -> dict:
    """Image embedding of normalised, padded images (B, Hp, Wp, 3).

    Returns ``{"mask_features": (B, Hp/4, Wp/4, C), "multi_scale_features":
    [4 maps, strides 8..64]}`` and, with ``decoder_memory``, the decoder's
    flattened memory with every decoder layer's value projection already
    applied (``"decoder_memory"``), which does not depend on the prompts: with
    it cached a further prompt batch costs only the decoder's query side.
    """
    features = self.backbone(images, deterministic=deterministic)
    mask_features, multi_scale = self.pixel_decoder(features, deterministic=deterministic)
    emb = {"mask_features": mask_features, "multi_scale_features": list(multi_scale)}
    if decoder_memory:
      emb["decoder_memory"] = self.predictor.project_memory(multi_scale, project_values=True)
    return emb

  def decode(self, embedding: dict, boxes, pb, valid=None, independent_prompts: bool = False,
             return_aux: bool = False, deterministic: bool = True) -> dict:
    """Decodes prompt boxes (B, N, 4) cx,cy,w,h relative to the padded image.

    ``embedding`` comes from :meth:`embed_image`; when it lacks
    ``"decoder_memory"`` the memory is flattened and projected here.
    """
    memory = embedding.get("decoder_memory")
    if memory is None:
      memory = self.predictor.project_memory(embedding["multi_scale_features"],
                                             project_values=False)
    return self.predictor.decode(
        memory, embedding["mask_features"], boxes, pb, valid=valid,
        independent_prompts=independent_prompts, return_aux=return_aux,
        deterministic=deterministic)

  def __call__(self, images, boxes, pb, valid=None, independent_prompts: bool = False,
               return_aux: bool = True, deterministic: bool = True) -> dict:
    emb = self.embed_image(images, deterministic=deterministic, decoder_memory=False)
    return self.decode(emb, boxes, pb, valid, independent_prompts=independent_prompts,
                       return_aux=return_aux, deterministic=deterministic)


# --------------------------------------------------------------------------
# Pre- and post-processing (pure functions of static shapes).

def padded_size(height: int, width: int, divisibility: int = 32) -> tuple[int, int]:
  """Size after zero padding at the bottom/right to a multiple of ``divisibility``."""
  if divisibility <= 1:
    return height, width
  up = lambda v: -(-v // divisibility) * divisibility
  return up(height), up(width)


def normalize_and_pad(images, mean: Sequence[float], std: Sequence[float],
                      pad_to: tuple[int, int]):
  """(B, H, W, 3) RGB in [0, 255] -> (B, Hp, Wp, 3) normalised, zero padded."""
  images = images.astype(jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  x = (images - mean) / std
  h, w = images.shape[1:3]
  return jnp.pad(x, ((0, 0), (0, pad_to[0] - h), (0, pad_to[1] - w), (0, 0)))


def prompts_to_boxes(prompts, is_box, image_hw: tuple[int, int], padded_hw: tuple[int, int]):
  """Prompts relative to the unpadded image -> decoder boxes and ``pb`` flags.

  Args:
    prompts: (..., N, 2) clicks [x, y] or (..., N, 4) boxes [cx, cy, w, h], in
      [0, 1] relative to the image before padding.  Also accepts (..., N, 4) with
      ``is_box`` per prompt (clicks then carry any w, h which is replaced).
    is_box: bool scalar or (..., N) array.
    image_hw, padded_hw: static sizes.

  Returns:
    boxes (..., N, 4) relative to the padded image, pb (..., N) int32.
  """
  prompts = jnp.asarray(prompts, jnp.float32)
  if prompts.shape[-1] == 2:
    prompts = jnp.concatenate([prompts, jnp.zeros_like(prompts)], axis=-1)
  is_box = jnp.broadcast_to(jnp.asarray(is_box, bool), prompts.shape[:-1])
  click_wh = jnp.full(prompts.shape[:-1] + (2,), CLICK_BOX_SIZE, jnp.float32)
  wh = jnp.where(is_box[..., None], prompts[..., 2:], click_wh)
  boxes = jnp.concatenate([prompts[..., :2], wh], axis=-1)
  (h, w), (hp, wp) = image_hw, padded_hw
  scale = jnp.asarray([w / wp, h / hp, w / wp, h / hp], jnp.float32)
  return boxes * scale, is_box.astype(jnp.int32)


def upsample_masks(mask_logits, padded_hw: tuple[int, int], image_hw: tuple[int, int]):
  """(..., h, w) logits -> bilinear (align_corners=False) to padded size, cropped."""
  lead = mask_logits.shape[:-2]
  up = jax.image.resize(mask_logits, lead + tuple(padded_hw), method="linear",
                        antialias=False)
  return up[..., : image_hw[0], : image_hw[1]]


def select_levels(outputs: dict, levels: Sequence[int]) -> dict:
  """Keeps granularity tokens ``levels`` (in that order) of masks/ious/boxes."""
  idx = np.asarray(levels, np.int32)
  return {
      "pred_masks": outputs["pred_masks"][:, :, idx],
      "pred_ious": outputs["pred_ious"][:, :, idx],
      "pred_boxes": outputs["pred_boxes"][:, :, idx],
  }


def forward_fn(config, levels: Sequence[int] | None = None, return_aux: bool = True,
               independent_prompts: bool = False, *, tokens: Sequence[int] | None = None):
  """Jit-compiled ``(params, image, prompts, is_box) -> outputs`` (evaluate_demo).

  ``image`` is (H, W, 3) or (B, H, W, 3) RGB, uint8 or float in [0, 255];
  ``prompts`` (N, 2|4) / (B, N, 2|4) relative to the image; ``is_box`` bool.
  Outputs: raw decoder outputs (``pred_masks`` (B,N,T,h,w), ``pred_boxes``,
  ``pred_ious``, ``aux_outputs``) plus ``masks`` (B, N, len(levels), H, W)
  upsampled logits and ``ious`` (B, N, len(levels)) of the selected tokens.

  ``levels``: user granularity levels 1 (finest) .. 6 to select, in that
  order; or ``tokens``: decoder tokens 0..5 (the original's
  ``evaluate_demo(level=...)``).  Neither: every token in token order.
  """
  cfg = freeze_config(config)
  model = SemanticSAM(cfg)
  num_tokens = cfg.decoder.num_mask_tokens
  if levels is None and tokens is None:
    sel_tokens = tuple(range(num_tokens))
  else:
    from semsam_jax.inference.predictor import resolve_tokens
    sel_tokens = resolve_tokens(levels, tokens)
  levels = sel_tokens

  @jax.jit
  def forward(params, image, prompts, is_box):
    batched = image.ndim == 4
    images = image if batched else image[None]
    prompts = jnp.asarray(prompts)
    prompts = prompts if prompts.ndim == 3 else prompts[None]
    image_hw = images.shape[1:3]
    pad_hw = padded_size(*image_hw, cfg.size_divisibility)
    x = normalize_and_pad(images, cfg.pixel_mean, cfg.pixel_std, pad_hw)
    boxes, pb = prompts_to_boxes(prompts, is_box, image_hw, pad_hw)
    out = model.apply({"params": params}, x, boxes, pb, None,
                      independent_prompts=independent_prompts, return_aux=return_aux)
    sel = select_levels(out, levels)
    out = dict(out)
    out["masks"] = upsample_masks(sel["pred_masks"], pad_hw, image_hw)
    out["ious"] = sel["pred_ious"]
    out["boxes"] = sel["pred_boxes"]
    out["decoder_boxes"] = boxes
    return out

  return forward


def init_params(config, rng, image_hw: tuple[int, int] = (64, 64), num_prompts: int = 1,
                unbox: bool = True):
  """Random parameters for ``config`` (shapes do not depend on ``image_hw``).

  With ``unbox=False`` the leaves stay wrapped in ``nn.LogicallyPartitioned``
  boxes that carry their logical axis names (for building shardings).
  """
  cfg = freeze_config(config)
  model = SemanticSAM(cfg)
  hp, wp = padded_size(*image_hw, cfg.size_divisibility)
  images = jnp.zeros((1, hp, wp, 3), jnp.float32)
  boxes = jnp.full((1, num_prompts, 4), 0.5, jnp.float32)
  pb = jnp.zeros((1, num_prompts), jnp.int32)
  params = jax.jit(model.init)(rng, images, boxes, pb)["params"]
  return nn.meta.unbox(params) if unbox else params


def param_shapes(config, unbox: bool = True):
  """``jax.eval_shape`` of :func:`init_params` (no memory is allocated)."""
  return jax.eval_shape(functools.partial(init_params, config, unbox=unbox),
                        jax.random.PRNGKey(0))
