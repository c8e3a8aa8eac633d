"""The granularity (interactive) decoder of Semantic-SAM ("predictor").

Every prompt (a click or a box) becomes ``num_mask_tokens`` (6) queries that
share one reference box and differ only in a learned granularity token.  The
queries go through ``num_layers`` deformable DETR decoder layers (self
attention between queries, multi-scale deformable cross attention into the
pixel decoder's features, FFN; all post-norm), with the reference box refined
after every layer by one shared box MLP.  After every layer the heads produce
mask logits (dot product with the per-pixel ``mask_features``), a box and an
IoU score per query.

Behaviour of the original inference path that this module reproduces:

* query content = ``label_enc[0] + pb_embedding[pb] + mask_tokens[t]``;
  reference box = ``sigmoid(inverse_sigmoid(box))``;
* the query position is ``ref_point_head`` of the sine embedding of the
  reference box (coordinates in the order y, x, w, h);
* the image memory lists the feature levels coarsest first (the reverse of the
  order in which the pixel decoder hands them over);
* inside the decoder loop the reference box is updated from the *raw* layer
  output, while the heads (masks, IoU, reported boxes) read the layer output
  after ``decoder_norm`` applied *twice* (the decoder's own ``norm`` is the same
  module as ``decoder_norm``, and the heads normalise once more);
* by default all queries of all prompts attend to each other (no self-attention
  mask); ``independent_prompts=True`` gives the block-diagonal mask of training.

The image-dependent part of cross attention (flattening the features and each
layer's value projection) is exposed separately as :meth:`project_memory`, so
one image embedding can serve many prompt batches via :meth:`decode`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semsam_jax.models.deformable_attention import MSDeformAttn
from semsam_jax.models.layers import (MLP, Dtype, dense, inverse_sigmoid, map_token_chunks,
                                      layer_norm)

Array = jax.Array

# Query content index used for every prompt (the reference pools no content yet).
PROMPT_LABEL = 0


# --------------------------------------------------------------------------
# Small pure helpers.

def sine_box_embedding(boxes: Array, num_feats: int,
                       temperature: float = 10000.0) -> Array:
  """Sinusoidal embedding of boxes (..., 4) cx,cy,w,h in [0, 1].

  Each coordinate scaled by 2*pi is divided by ``temperature ** (2*floor(i/2) /
  num_feats)`` for ``i < num_feats``; even channels take the sine, odd ones the
  cosine.  The four per-coordinate embeddings are concatenated in the order
  y, x, w, h, giving (..., 4 * num_feats).  A (..., 2) input gives y, x only.
  """
  idx = np.arange(num_feats, dtype=np.float32)
  dim_t = np.power(np.float32(temperature),
                   (2.0 * np.floor(idx / 2.0) / num_feats).astype(np.float32),
                   dtype=np.float32)
  dim_t = jnp.asarray(dim_t)
  scale = np.float32(2.0 * math.pi)

  def embed(coord):
    angles = (coord * scale)[..., None] / dim_t
    interleaved = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
    return interleaved.reshape(angles.shape)

  x, y = embed(boxes[..., 0]), embed(boxes[..., 1])
  if boxes.shape[-1] == 2:
    return jnp.concatenate([y, x], axis=-1)
  if boxes.shape[-1] == 4:
    w, h = embed(boxes[..., 2]), embed(boxes[..., 3])
    return jnp.concatenate([y, x, w, h], axis=-1)
  raise ValueError(f"boxes must end in 2 or 4 coordinates, got shape {boxes.shape}")


def self_attention_mask(num_prompts: int, num_tokens: int, valid: Optional[Array],
                        independent_prompts: bool) -> Optional[Array]:
  """Boolean mask (B|1, Q, Q), True where query q may attend to key k.

  Queries are ordered prompt-major (``q = prompt * num_tokens + token``).
  Keys of invalid (padding) prompts are hidden; with ``independent_prompts``
  each prompt's tokens see only each other.  Returns None when nothing is masked.
  """
  allowed = None
  if independent_prompts:
    owner = np.arange(num_prompts * num_tokens) // num_tokens
    allowed = jnp.asarray(owner[:, None] == owner[None, :])[None]
  if valid is not None:
    key_ok = jnp.repeat(jnp.asarray(valid, bool), num_tokens, axis=1)[:, None, :]
    allowed = key_ok if allowed is None else allowed & key_ok
  return allowed


# --------------------------------------------------------------------------
# Modules.

class DecoderMemory(flax.struct.PyTreeNode):
  """Image side of the decoder's cross attention, reusable across prompts.

  Attributes:
    memory: (B, S, C) the feature levels flattened and concatenated, coarsest
      level first.
    values: per decoder layer the projected values (B, S, heads, C/heads), or
      None (then :meth:`GranularityDecoder.decode` projects ``memory`` itself).
    spatial_shapes: static ((H, W), ...) of the levels in ``memory``'s order.
  """
  memory: Array
  values: Optional[tuple[Array, ...]]
  spatial_shapes: tuple[tuple[int, int], ...] = flax.struct.field(pytree_node=False)


class _PackedInProj(nn.Module):
  """The packed q/k/v input projection of ``torch.nn.MultiheadAttention``.

  One kernel (C, 3C) and bias (3C,) whose thirds project queries, keys and
  values; they are applied to different inputs (q = k input carries the
  position embedding, v does not).
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xq: Array, xk: Array, xv: Array):
    c = self.features
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), ("embed", "mlp")),
        (xq.shape[-1], 3 * c), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros, ("mlp",)), (3 * c,), self.param_dtype)
    kernel = kernel.astype(self.dtype)
    bias = bias.astype(self.dtype)
    shared_qk = xq is xk
    xq, xk, xv = (x.astype(self.dtype) for x in (xq, xk, xv))
    if shared_qk:
      qk = xq @ kernel[:, : 2 * c] + bias[: 2 * c]
      q, k = qk[..., :c], qk[..., c:]
    else:
      q = xq @ kernel[:, :c] + bias[:c]
      k = xk @ kernel[:, c: 2 * c] + bias[c: 2 * c]
    v = xv @ kernel[:, 2 * c:] + bias[2 * c:]
    return q, k, v


class MultiheadAttention(nn.Module):
  """Batch-first equivalent of ``torch.nn.MultiheadAttention`` (params
  ``in_proj/{kernel,bias}`` and ``out_proj``)."""
  embed_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by "
                       f"num_heads {self.num_heads}")
    self.in_proj = _PackedInProj(self.embed_dim, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
    self.out_proj = dense(self.embed_dim, name="out_proj", axes=("mlp", "embed"),
                          dtype=self.dtype, param_dtype=self.param_dtype)
    self.attn_dropout = nn.Dropout(self.dropout)

  def __call__(self, query: Array, key: Array, value: Array,
               mask: Optional[Array] = None, deterministic: bool = True) -> Array:
    """query/key/value (B, L, C); ``mask`` (B|1, Lq, Lk) True = may attend.

    Masked logits are replaced by a large negative *finite* number, so a query
    whose keys are all masked gets a uniform (finite) average instead of NaN.
    """
    q, k, v = self.in_proj(query, key, value)
    b, lq, c = q.shape
    h = self.num_heads
    d = c // h
    q = q.reshape(b, lq, h, d) * jnp.asarray(d ** -0.5, q.dtype)
    k = k.reshape(b, k.shape[1], h, d)
    v = v.reshape(b, v.shape[1], h, d)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = self.attn_dropout(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, lq, c)
    return self.out_proj(out)


class DeformableDecoderLayer(nn.Module):
  """Post-norm decoder layer: self attention -> deformable cross attention ->
  ReLU FFN (``DeformableTransformerDecoderLayer`` of the reference)."""
  d_model: int
  d_ffn: int
  num_heads: int
  n_levels: int
  n_points: int
  dropout: float = 0.0
  msda_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.self_attn = MultiheadAttention(self.d_model, self.num_heads,
                                        dropout=self.dropout, **kw)
    self.norm2 = layer_norm("norm2", **kw)
    self.cross_attn = MSDeformAttn(d_model=self.d_model, n_levels=self.n_levels,
                                   n_heads=self.num_heads, n_points=self.n_points,
                                   impl=self.msda_impl, **kw)
    self.norm1 = layer_norm("norm1", **kw)
    self.linear1 = dense(self.d_ffn, name="linear1", axes=("embed", "mlp"), **kw)
    self.linear2 = dense(self.d_model, name="linear2", axes=("mlp", "embed"), **kw)
    self.norm3 = layer_norm("norm3", **kw)
    self.drop = nn.Dropout(self.dropout)

  def project_value(self, memory: Array) -> Array:
    """This layer's cross-attention values of the flattened image memory."""
    return self.cross_attn.project_value(memory, None)

  def __call__(self, tgt: Array, query_pos: Array, reference_points: Array,
               value: Array, spatial_shapes: tuple[tuple[int, int], ...],
               attn_mask: Optional[Array] = None, deterministic: bool = True) -> Array:
    """tgt/query_pos (B, Q, C); reference_points (B, Q, levels, 4);
    value (B, S, heads, C/heads) from :meth:`project_value`."""
    det = deterministic
    qk = tgt + query_pos
    tgt2 = self.self_attn(qk, qk, tgt, mask=attn_mask, deterministic=det)
    tgt = self.norm2(tgt + self.drop(tgt2, deterministic=det))
    tgt2 = self.cross_attn.attend(tgt + query_pos, reference_points, value, spatial_shapes)
    tgt = self.norm1(tgt + self.drop(tgt2, deterministic=det))
    tgt2 = self.linear2(self.drop(nn.relu(self.linear1(tgt)), deterministic=det))
    return self.norm3(tgt + self.drop(tgt2, deterministic=det))


class TransformerDecoder(nn.Module):
  """Holds the decoder layers and ``ref_point_head`` (torch ``decoder.*``).

  The layer loop itself lives in :class:`GranularityDecoder` because it also
  uses the parent's shared box MLP and ``decoder_norm``.
  """
  d_model: int
  d_ffn: int
  num_heads: int
  num_layers: int
  n_levels: int
  n_points: int
  dropout: float = 0.0
  msda_impl: str = "auto"
  remat_layers: bool = False               # rematerialise each layer's __call__
  remat_policy: Optional[Callable] = None  # jax.checkpoint_policies member (None: save nothing)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layer_cls = DeformableDecoderLayer
    if self.remat_layers:
      # Lifted-call arguments: 0 the module, then tgt, query_pos,
      # reference_points, value, spatial_shapes (5), attn_mask, deterministic (7).
      layer_cls = nn.remat(DeformableDecoderLayer, static_argnums=(5, 7),
                           policy=self.remat_policy)
    self.layers = [
        layer_cls(self.d_model, self.d_ffn, self.num_heads, self.n_levels,
                               self.n_points, dropout=self.dropout,
                               msda_impl=self.msda_impl, **kw)
        for _ in range(self.num_layers)]
    self.ref_point_head = MLP(self.d_model, self.d_model, 2, **kw)

  def query_position(self, reference_boxes: Array) -> Array:
    """(B, Q, 4) sigmoid boxes -> (B, Q, C) positional query."""
    sine = sine_box_embedding(reference_boxes, self.d_model // 2)
    return self.ref_point_head(sine.astype(self.dtype))

  def __call__(self, reference_boxes: Array) -> Array:
    # Only used to materialise parameters when the module is called alone.
    return self.query_position(reference_boxes)


class _ZeroLastMLP(MLP):
  """``MLP`` whose last layer starts at zero (the reference's box head init)."""

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      init = nn.initializers.zeros if last else nn.initializers.lecun_normal()
      x = dense(self.output_dim if last else self.hidden_dim, name=f"layers_{i}",
                dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init)(x)
      if not last:
        x = nn.relu(x)
    return x


class GranularityDecoder(nn.Module):
  """Semantic-SAM's interactive decoder (``sem_seg_head.predictor``).

  Attributes mirror ``config.decoder`` (see :mod:`semsam_jax.config`).  Note
  that the reference builds its decoder layers with a fixed 8 heads and 4
  sampling points, whatever ``MODEL.DECODER.NHEADS`` says; a config made from
  a reference YAML must carry those values here.
  """
  hidden_dim: int = 256
  num_heads: int = 8
  dim_feedforward: int = 2048
  num_layers: int = 9
  num_mask_tokens: int = 6
  n_points: int = 4
  total_num_feature_levels: int = 4
  mask_dim: int = 256
  dim_proj: int = 512
  dropout: float = 0.0
  msda_impl: str = "auto"
  # Memory tokens per chunk of the value projections in project_memory (0:
  # all at once); speed and memory only, the results do not depend on it.
  memory_chunk: int = 0
  remat_layers: bool = False               # rematerialise each decoder layer (training)
  remat_policy: Optional[Callable] = None  # jax.checkpoint_policies member (None: save nothing)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, cfg_decoder, **kwargs) -> "GranularityDecoder":
    """Builds the module from ``config.decoder``; ``kwargs`` (msda_impl,
    memory_chunk, dtype, param_dtype, ...) override or complete it."""
    fields = ("hidden_dim", "num_heads", "dim_feedforward", "num_layers", "num_mask_tokens",
              "n_points", "total_num_feature_levels", "mask_dim", "dim_proj", "dropout")
    args = {f: cfg_decoder[f] for f in fields}
    args.update(kwargs)
    return cls(**args)

  def setup(self):
    c = self.hidden_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    trunc = nn.initializers.truncated_normal(stddev=0.02)
    # Unused at inference (language / classification branches); kept so that the
    # parameter tree equals the checkpoint's.
    self.lang_mapper = self.param(
        "lang_mapper", nn.with_logical_partitioning(trunc, (None, "embed")),
        (self.dim_proj, c), self.param_dtype)
    self.class_embed = self.param(
        "class_embed", nn.with_logical_partitioning(trunc, ("embed", None)),
        (c, self.dim_proj), self.param_dtype)
    self.class_embed_part = self.param(
        "class_embed_part", nn.with_logical_partitioning(trunc, ("embed", None)),
        (c, self.dim_proj), self.param_dtype)

    self.mask_embed = MLP(c, self.mask_dim, 3, **kw)
    self.decoder_norm = layer_norm("decoder_norm", **kw)
    self.decoder = TransformerDecoder(
        c, self.dim_feedforward, self.num_heads, self.num_layers,
        self.total_num_feature_levels, self.n_points, dropout=self.dropout,
        msda_impl=self.msda_impl, remat_layers=self.remat_layers,
        remat_policy=self.remat_policy, **kw)
    self.bbox_embed = _ZeroLastMLP(c, 4, 3, **kw)
    self.iou_prediction_head = MLP(c, 1, 3, **kw)

    def embed(num, name):
      return nn.Embed(num, c, dtype=self.dtype, param_dtype=self.param_dtype,
                      embedding_init=nn.with_logical_partitioning(
                          nn.initializers.normal(stddev=1.0), (None, "embed")),
                      name=name)
    self.mask_tokens = embed(self.num_mask_tokens, "mask_tokens")
    self.pb_embedding = embed(2, "pb_embedding")
    self.label_enc = embed(2, "label_enc")

  # ------------------------------------------------------------------ image side

  def project_memory(self, multi_scale_features: Sequence[Array],
                     project_values: bool = True) -> DecoderMemory:
    """Flattens the pixel decoder's maps and (optionally) projects every
    layer's cross-attention values once.

    Args:
      multi_scale_features: ``total_num_feature_levels`` NHWC maps in the
        pixel decoder's order (finest first, as the golden ``multi_scale_*``).
      project_values: precompute the per-layer value projections (costs
        ``num_layers`` x the memory size; makes :meth:`decode` cheaper).
    """
    feats = list(multi_scale_features)
    if len(feats) != self.total_num_feature_levels:
      raise ValueError(f"expected {self.total_num_feature_levels} feature levels, "
                       f"got {len(feats)}")
    ordered = feats[::-1]  # the decoder attends to the coarsest level first
    shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in ordered)
    memory = jnp.concatenate(
        [f.reshape(f.shape[0], -1, f.shape[-1]) for f in ordered], axis=1).astype(self.dtype)
    values = None
    if project_values:
      # Per token, so computed over chunks of tokens (cache-sized on CPU).
      def project(mdl, mem):
        return tuple(layer.project_value(mem) for layer in mdl.decoder.layers)
      values = map_token_chunks(self, project, (memory,), self.memory_chunk)
    return DecoderMemory(memory=memory, values=values, spatial_shapes=shapes)

  # ------------------------------------------------------------------ prompt side

  def _prediction_heads(self, hs: Array, reference: Array, mask_features: Array,
                        num_prompts: int) -> dict:
    """Masks, boxes and IoUs from one layer's (already once normalised) output."""
    b = hs.shape[0]
    t = self.num_mask_tokens
    out = self.decoder_norm(hs)  # the reference normalises a second time here
    mask_embed = self.mask_embed(out)
    masks = jnp.einsum("bqc,bhwc->bqhw", mask_embed, mask_features.astype(self.dtype))
    ious = self.iou_prediction_head(out)[..., 0]
    delta = self.bbox_embed(out).astype(jnp.float32)
    boxes = jax.nn.sigmoid(delta + inverse_sigmoid(reference))
    return {
        "pred_masks": masks.reshape((b, num_prompts, t) + masks.shape[2:]),
        "pred_boxes": boxes.reshape(b, num_prompts, t, 4),
        "pred_ious": ious.reshape(b, num_prompts, t),
    }

  def decode(self, memory: DecoderMemory, mask_features: Array, boxes: Array, pb: Array,
             valid: Optional[Array] = None, independent_prompts: bool = False,
             return_aux: bool = True, deterministic: bool = True) -> dict:
    """Decodes prompts against a cached :class:`DecoderMemory`.

    Args:
      memory: from :meth:`project_memory`.
      mask_features: (B, h, w, mask_dim) per-pixel mask embeddings.
      boxes: (B, N, 4) prompt boxes cx, cy, w, h relative to the padded image
        (clicks carry a small fixed w, h).
      pb: (B, N) int, 0 for a click and 1 for a box.
      valid: optional (B, N) bool; invalid prompts (padding) are hidden from the
        other prompts' self attention, their own outputs are meaningless but
        finite.
      independent_prompts: if True each prompt's tokens attend only to each
        other (training behaviour); otherwise all valid queries interact.
      return_aux: also return the predictions of all but the last layer.
      deterministic: disables dropout when True.

    Returns:
      ``pred_masks`` (B, N, T, h, w) logits, ``pred_boxes`` (B, N, T, 4)
      sigmoid cx,cy,w,h, ``pred_ious`` (B, N, T) and, with ``return_aux``,
      ``aux_outputs``: a list of ``num_layers - 1`` such dicts.
    """
    b, n = boxes.shape[:2]
    t = self.num_mask_tokens
    q = n * t
    c = self.hidden_dim
    levels = len(memory.spatial_shapes)

    # Queries: content and reference boxes, prompt-major / token-minor.
    content = (self.label_enc(jnp.full((b, n), PROMPT_LABEL, jnp.int32))
               + self.pb_embedding(jnp.asarray(pb, jnp.int32)))
    tokens = self.mask_tokens(jnp.arange(t, dtype=jnp.int32))
    tgt = content[:, :, None, :] + tokens[None, None]
    tgt = tgt.reshape(b, q, c).astype(self.dtype)
    ref_unsig = inverse_sigmoid(jnp.asarray(boxes, jnp.float32))
    ref_unsig = jnp.broadcast_to(ref_unsig[:, :, None, :], (b, n, t, 4)).reshape(b, q, 4)
    reference = jax.nn.sigmoid(ref_unsig)

    attn_mask = self_attention_mask(n, t, valid, independent_prompts)

    output = tgt
    references = [reference]  # box before each layer (not detached: for the heads)
    hidden = []  # decoder_norm(layer output), as the reference's intermediates
    for i, layer in enumerate(self.decoder.layers):
      query_pos = self.decoder.query_position(reference)
      ref_in = jnp.broadcast_to(reference[:, :, None, :], (b, q, levels, 4))
      value = memory.values[i] if memory.values is not None else layer.project_value(
          memory.memory)
      output = layer(output, query_pos, ref_in, value, memory.spatial_shapes, attn_mask,
                     deterministic)
      delta = self.bbox_embed(output).astype(jnp.float32)
      new_reference = jax.nn.sigmoid(delta + inverse_sigmoid(reference))
      reference = jax.lax.stop_gradient(new_reference)
      references.append(new_reference)
      hidden.append(self.decoder_norm(output))

    first = 0 if return_aux else self.num_layers - 1
    preds = [self._prediction_heads(hidden[i], references[i], mask_features, n)
             for i in range(first, self.num_layers)]
    result = dict(preds[-1])
    if return_aux:
      result["aux_outputs"] = preds[:-1]
    return result

  def __call__(self, multi_scale_features: Sequence[Array], mask_features: Array,
               boxes: Array, pb: Array, valid: Optional[Array] = None,
               independent_prompts: bool = False, return_aux: bool = True,
               deterministic: bool = True) -> dict:
    """:meth:`project_memory` followed by :meth:`decode` (see there)."""
    memory = self.project_memory(multi_scale_features, project_values=False)
    return self.decode(memory, mask_features, boxes, pb, valid=valid,
                       independent_prompts=independent_prompts, return_aux=return_aux,
                       deterministic=deterministic)
