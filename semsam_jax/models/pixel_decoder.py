"""MaskDINO's deformable pixel decoder as used by Semantic-SAM (NHWC).

Data flow (default configuration, ``feature_order="low2high"``):

1. ``res3``, ``res4``, ``res5`` each go through a 1x1 conv + GroupNorm
   (``input_proj_0`` .. ``input_proj_2``, in that order); one extra level is
   made from ``res5`` by a stride-2 3x3 conv + GroupNorm (``input_proj_3``).
   Level order inside the encoder: strides 8, 16, 32, 64.
2. Each level gets a normalised sine position encoding plus a learned level
   embedding (``transformer/level_embed``); all levels are flattened
   (row-major) and concatenated.
3. ``num_encoder_layers`` post-norm deformable encoder layers
   (``transformer/encoder/layers_i``): every position attends, with
   multi-scale deformable attention, around its own pixel centre on every
   level.  The reference runs its inference path without padding masks, so
   all valid ratios are 1 and nothing is masked.
4. The encoder output is split back into maps.  A small FPN step adds the
   bilinearly upsampled (align_corners=False) stride-8 map to the lateral
   projection of ``res2`` (``adapter_1``) and refines it with a 3x3 conv +
   GroupNorm + ReLU (``layer_1``); ``mask_features`` (1x1 conv) of that map is
   the per-pixel embedding at stride 4.

Outputs: ``mask_features`` (B, H/4, W/4, mask_dim) and the first
``total_num_feature_levels`` maps (strides 8, 16, 32, 64), which the
granularity decoder consumes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semsam_jax.models.deformable_attention import MSDeformAttn
from semsam_jax.models.layers import (conv, conv2d, dense, group_norm, layer_norm,
                                      linear_upsample, map_token_chunks)

Array = jax.Array
Dtype = Any

# Strides of the Swin feature maps.
DEFAULT_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

# detectron2's ``c2_xavier_fill``: kaiming_uniform with a=1, i.e. U(+-sqrt(3 / fan_in)).
c2_xavier_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
  """PyTorch's default ``nn.Linear`` bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def sine_position_embedding(height: int, width: int, num_pos_feats: int,
                            temperature: float = 10000.0,
                            scale: float = 2 * math.pi) -> Array:
  """Normalised 2-d sine position encoding of an unpadded (height, width) map.

  Returns (height, width, 2 * num_pos_feats) float32: the first half encodes
  the row, the second half the column.  Position ``i`` (1-based) of a side of
  length ``n`` becomes ``i / (n + 1e-6) * scale``; channel pairs (2k, 2k+1)
  hold sin / cos of that value divided by ``temperature ** (2k / num_pos_feats)``.
  """
  eps = 1e-6
  y = jnp.arange(1, height + 1, dtype=jnp.float32) / (jnp.float32(height) + eps) * scale
  x = jnp.arange(1, width + 1, dtype=jnp.float32) / (jnp.float32(width) + eps) * scale
  k = jnp.arange(num_pos_feats, dtype=jnp.float32)
  dim_t = jnp.power(jnp.float32(temperature), 2 * jnp.floor(k / 2) / num_pos_feats)

  def encode(v):  # (n,) -> (n, num_pos_feats), interleaved sin/cos
    a = v[:, None] / dim_t
    return jnp.stack([jnp.sin(a[:, 0::2]), jnp.cos(a[:, 1::2])], axis=-1).reshape(
        v.shape[0], num_pos_feats)

  # The barrier keeps XLA from fusing the sin/cos of the (n, feats) tables into
  # the broadcasts below, which would evaluate them once per map position.
  enc_y, enc_x = jax.lax.optimization_barrier((encode(y), encode(x)))
  pos_y = jnp.broadcast_to(enc_y[:, None, :], (height, width, num_pos_feats))
  pos_x = jnp.broadcast_to(enc_x[None, :, :], (height, width, num_pos_feats))
  return jnp.concatenate([pos_y, pos_x], axis=-1)


def _linear_resize_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out, in) matrix of 1-d linear interpolation, align_corners=False, as
  ``torch.nn.functional.interpolate(mode='bilinear')`` computes it."""
  m = np.zeros((out_size, in_size), np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  for o in range(out_size):
    src = max(np.float32(scale * np.float32(o + 0.5) - np.float32(0.5)), np.float32(0.0))
    i0 = min(int(np.floor(src)), in_size - 1)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    lam = np.float32(src - i0)
    m[o, i0] += np.float32(1.0) - lam
    m[o, i1] += lam
  return m


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
  """Bilinear resize of NHWC ``x`` to static ``size`` (align_corners=False,
  no antialiasing), matching PyTorch's ``F.interpolate(mode='bilinear')``."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  if tuple(size) == (2 * h, 2 * w) and h > 1 and w > 1:
    # Exact 2x: output 2i is 0.25 x[i-1] + 0.75 x[i], 2i+1 is 0.75 x[i] +
    # 0.25 x[i+1] (the weights of _linear_resize_matrix), no matrix product.
    return linear_upsample(linear_upsample(x, 2, 1), 2, 2)
  mh = jnp.asarray(_linear_resize_matrix(size[0], h), x.dtype)
  mw = jnp.asarray(_linear_resize_matrix(size[1], w), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", mh, x)
  return jnp.einsum("pw,bowc->bopc", mw, x)


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> Array:
  """(S, 2) normalised (x, y) pixel centres of every level, flattened in order.

  With no padding (valid ratio 1 on every level) each position uses the same
  point on all levels, so callers broadcast this to (B, S, L, 2).
  """
  pts = []
  for h, w in spatial_shapes:
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
    pts.append(jnp.stack([xx.reshape(-1), yy.reshape(-1)], -1))
  return jnp.concatenate(pts, 0)


class Conv2dNorm(nn.Module):
  """detectron2 ``Conv2d`` with a norm and an optional activation.

  Owns ``kernel`` (HWIO) and ``bias`` (only without a norm) directly and the
  norm as sub-module ``norm``, mirroring the torch attribute layout.
  """
  features: int
  kernel_size: int
  padding: int = 0
  use_norm: bool = True
  num_groups: int = 32
  activation: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(
            c2_xavier_init, (None, None, "conv_in", "conv_out")),
        (k, k, x.shape[-1], self.features), self.param_dtype)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), 1, self.padding)
    if self.use_norm:
      y = group_norm(self.num_groups, name="norm", dtype=self.dtype,
                     param_dtype=self.param_dtype)(y)
    else:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, ("conv_out",)), (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.activation:
      y = nn.relu(y)
    return y


class DeformableEncoderLayer(nn.Module):
  """Post-norm encoder layer: deformable self attention, then a ReLU FFN.

  Only the sampling needs the whole (projected) sequence; the value
  projection and everything after the sampling (output projection, norms and
  FFN) are per token, so with ``query_chunk > 0`` they run over chunks of
  about that many tokens in a loop (see
  :func:`~semsam_jax.models.layers.map_token_chunks`).  Same results, and on
  CPU much faster at full resolution (every chunk's intermediates stay in
  the caches).
  """
  d_model: int
  d_ffn: int
  n_levels: int
  n_heads: int
  n_points: int
  dropout: float = 0.0
  msda_impl: str = "auto"
  query_chunk: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.self_attn = MSDeformAttn(d_model=self.d_model, n_levels=self.n_levels,
                                  n_heads=self.n_heads, n_points=self.n_points,
                                  impl=self.msda_impl, **kw)
    self.norm1 = layer_norm("norm1", **kw)
    self.linear1 = dense(self.d_ffn, name="linear1", axes=("embed", "mlp"),
                         kernel_init=nn.initializers.xavier_uniform(),
                         bias_init=torch_linear_bias_init(self.d_model), **kw)
    self.linear2 = dense(self.d_model, name="linear2", axes=("mlp", "embed"),
                         kernel_init=nn.initializers.xavier_uniform(),
                         bias_init=torch_linear_bias_init(self.d_ffn), **kw)
    self.norm2 = layer_norm("norm2", **kw)
    self.drop = nn.Dropout(self.dropout)

  def _query_side(self, src: Array, query: Array, reference_points: Array, value: Array,
                  spatial_shapes: tuple[tuple[int, int], ...], deterministic: bool) -> Array:
    drop = lambda x: self.drop(x, deterministic=deterministic)
    src2 = self.self_attn.attend(query, reference_points, value, spatial_shapes)
    src = self.norm1(src + drop(src2))
    h = drop(nn.relu(self.linear1(src)))
    return self.norm2(src + drop(self.linear2(h)))

  def __call__(self, src: Array, pos: Array, reference_points: Array,
               spatial_shapes: tuple[tuple[int, int], ...],
               padding_mask: Optional[Array] = None, deterministic: bool = True) -> Array:
    """src/pos (B, S, C), reference_points (B, S, L, 2) -> (B, S, C)."""
    # The value projection keeps the (B, S, C) shape, so its chunks overwrite
    # a copy of src in place; the head split is a free reshape afterwards.
    def project(mdl, s_, *m_):
      v = mdl.self_attn.project_value(s_, *m_)
      return v.reshape(s_.shape[:2] + (-1,)).astype(s_.dtype)

    xs = (src,) if padding_mask is None else (src, padding_mask)
    value = map_token_chunks(self, project, xs, self.query_chunk, inplace=True)
    value = value.reshape(value.shape[:2] + (self.n_heads, self.d_model // self.n_heads))
    query = src + pos

    def query_side(mdl, src_c, query_c, ref_c):
      return mdl._query_side(src_c, query_c, ref_c, value, spatial_shapes, deterministic)

    return map_token_chunks(self, query_side, (src, query, reference_points),
                            self.query_chunk, pad_values=(0.0, 0.0, 0.5), inplace=True)


class DeformableEncoder(nn.Module):
  """Stack of :class:`DeformableEncoderLayer` (torch ``transformer.encoder``)."""
  num_layers: int
  d_model: int
  d_ffn: int
  n_levels: int
  n_heads: int
  n_points: int
  dropout: float = 0.0
  msda_impl: str = "auto"
  query_chunk: int = 0
  remat_layers: bool = False               # rematerialise each layer (nn.remat)
  remat_policy: Optional[Callable] = None  # jax.checkpoint_policies member (None: save nothing)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, src: Array, pos: Array, spatial_shapes: tuple[tuple[int, int], ...],
               deterministic: bool = True) -> Array:
    b = src.shape[0]
    ref = encoder_reference_points(spatial_shapes)                     # (S, 2)
    ref = jnp.broadcast_to(ref[None, :, None, :], (b, ref.shape[0], len(spatial_shapes), 2))
    layer_cls = DeformableEncoderLayer
    if self.remat_layers:
      # Lifted-call arguments: 0 the module, then src, pos, reference_points,
      # spatial_shapes (4), padding_mask (5), deterministic (6).
      layer_cls = nn.remat(DeformableEncoderLayer, static_argnums=(4, 5, 6),
                           policy=self.remat_policy)
    out = src
    for i in range(self.num_layers):
      out = layer_cls(
          self.d_model, self.d_ffn, self.n_levels, self.n_heads, self.n_points,
          dropout=self.dropout, msda_impl=self.msda_impl, query_chunk=self.query_chunk,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
              out, pos, ref, spatial_shapes, None, deterministic)
    return out


class DeformableTransformerEncoderOnly(nn.Module):
  """Level embedding + flattening + encoder (torch ``pixel_decoder.transformer``)."""
  d_model: int
  n_heads: int
  num_encoder_layers: int
  d_ffn: int
  dropout: float
  n_levels: int
  n_points: int
  msda_impl: str = "auto"
  query_chunk: int = 0
  remat_layers: bool = False
  remat_policy: Optional[Callable] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, srcs: Sequence[Array], pos_embeds: Sequence[Array],
               deterministic: bool = True) -> list[Array]:
    """srcs / pos_embeds: L maps (B, H_l, W_l, C) -> L encoded maps, same shapes."""
    if len(srcs) != self.n_levels:
      raise ValueError(f"expected {self.n_levels} feature levels, got {len(srcs)}")
    level_embed = self.param(
        "level_embed", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None, "embed")),
        (self.n_levels, self.d_model), self.param_dtype).astype(self.dtype)
    shapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in srcs)
    b = srcs[0].shape[0]
    flat = jnp.concatenate([s.reshape(b, -1, s.shape[-1]) for s in srcs], 1)
    lvl_pos = jnp.concatenate(
        [(p.reshape(b, -1, p.shape[-1]) + level_embed[l]) for l, p in enumerate(pos_embeds)], 1)
    memory = DeformableEncoder(
        self.num_encoder_layers, self.d_model, self.d_ffn, self.n_levels, self.n_heads,
        self.n_points, dropout=self.dropout, msda_impl=self.msda_impl,
        query_chunk=self.query_chunk, remat_layers=self.remat_layers,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        name="encoder")(
            flat, lvl_pos, shapes, deterministic=deterministic)
    outs, start = [], 0
    for h, w in shapes:
      outs.append(memory[:, start:start + h * w].reshape(b, h, w, -1))
      start += h * w
    return outs


class DeformablePixelDecoder(nn.Module):
  """MaskDINO deformable pixel decoder (torch ``sem_seg_head.pixel_decoder``).

  Attributes mirror ``config.pixel_decoder`` (see :mod:`semsam_jax.config`);
  ``in_channels`` / ``strides`` are ((name, value), ...) pairs of the backbone
  features.
  """
  in_channels: tuple[tuple[str, int], ...]
  conv_dim: int = 256
  mask_dim: int = 256
  norm: str = "GN"
  num_groups: int = 32
  num_heads: int = 8
  dim_feedforward: int = 2048
  dropout: float = 0.0
  num_encoder_layers: int = 6
  n_points: int = 4
  in_features: tuple[str, ...] = ("res2", "res3", "res4", "res5")
  transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5")
  total_num_feature_levels: int = 4
  common_stride: int = 4
  feature_order: str = "low2high"
  strides: tuple[tuple[str, int], ...] = tuple(DEFAULT_STRIDES.items())
  msda_impl: str = "auto"
  query_chunk: int = 0
  remat_encoder_layers: bool = False       # rematerialise each encoder layer
  remat_policy: Optional[Callable] = None  # jax.checkpoint_policies member (None: save nothing)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, cfg: Mapping, in_channels: Mapping[str, int],
                  strides: Optional[Mapping[str, int]] = None, **kwargs) -> "DeformablePixelDecoder":
    """Builds the module from ``config.pixel_decoder``.

    ``in_channels`` maps backbone feature names to channels; ``strides``
    defaults to the Swin strides; ``kwargs`` (``msda_impl``, ``query_chunk``, ``dtype``,
    ``param_dtype``, ``name``, ...) go to the constructor.
    """
    strides = dict(DEFAULT_STRIDES if strides is None else strides)
    in_features = tuple(cfg["in_features"])
    missing = [f for f in in_features if f not in in_channels or f not in strides]
    if missing:
      raise ValueError(f"pixel decoder in_features {missing} have no channels/stride "
                       f"(in_channels: {dict(in_channels)}, strides: {strides})")
    return cls(
        in_channels=tuple((f, int(in_channels[f])) for f in in_features),
        conv_dim=int(cfg["conv_dim"]),
        mask_dim=int(cfg["mask_dim"]),
        norm=str(cfg["norm"]),
        num_groups=int(cfg["num_groups"]),
        num_heads=int(cfg["num_heads"]),
        dim_feedforward=int(cfg["dim_feedforward"]),
        dropout=float(cfg["dropout"]),
        num_encoder_layers=int(cfg["num_encoder_layers"]),
        n_points=int(cfg["n_points"]),
        in_features=in_features,
        transformer_in_features=tuple(cfg["transformer_in_features"]),
        total_num_feature_levels=int(cfg["total_num_feature_levels"]),
        common_stride=int(cfg["common_stride"]),
        feature_order=str(cfg["feature_order"]),
        strides=tuple((f, int(strides[f])) for f in in_features),
        **kwargs)

  # ---- static structure (mirrors the reference constructor)

  def _layout(self):
    """Static wiring derived from the config.

    Returns (fpn_features, proj_features, extra_input, num_fpn_levels) where
    ``proj_features`` lists the backbone features in ``input_proj_i`` order and
    ``extra_input`` is the feature the first extra (downsampled) level reads.
    """
    if self.feature_order not in ("low2high", "high2low"):
      raise ValueError(f"feature_order must be 'low2high' or 'high2low', got "
                       f"{self.feature_order!r}")
    if self.norm not in ("GN", ""):
      raise ValueError(f"norm {self.norm!r} is not supported ('GN' or '')")
    channels, strides = dict(self.in_channels), dict(self.strides)
    bad = [f for f in self.transformer_in_features if f not in channels]
    if bad:
      raise ValueError(f"transformer_in_features {bad} are not in in_features "
                       f"{list(channels)}")
    fpn_features = sorted(channels, key=lambda f: strides[f])          # high res first
    sign = -1 if self.feature_order == "low2high" else 1
    tr = sorted(self.transformer_in_features, key=lambda f: sign * strides[f])
    n_tr = len(tr)
    if self.total_num_feature_levels < n_tr:
      raise ValueError(f"total_num_feature_levels {self.total_num_feature_levels} < "
                       f"{n_tr} transformer input features")
    if n_tr == 1 and self.total_num_feature_levels > 1:
      raise ValueError("extra downsampled levels need more than one transformer feature "
                       "(the reference has no projection for them otherwise)")
    tr_channels = [channels[f] for f in tr]
    extra_input = tr[tr_channels.index(max(tr_channels))]
    proj_features = tr[::-1]
    min_stride = min(strides[f] for f in tr)
    num_fpn = max(int(np.log2(min_stride) - np.log2(self.common_stride)), 1)
    return fpn_features, proj_features, extra_input, num_fpn

  # ---- forward

  @nn.compact
  def __call__(self, features: Mapping[str, Array],
               deterministic: bool = True) -> tuple[Array, list[Array]]:
    """features: backbone maps ``{name: (B, H, W, C)}`` (NHWC).

    Returns ``(mask_features (B, H2, W2, mask_dim), multi_scale_features)``
    where ``multi_scale_features`` are the first ``total_num_feature_levels``
    encoder maps in the order the reference hands them to its decoder.
    """
    fpn_features, proj_features, extra_input, num_fpn = self._layout()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = self.conv_dim
    n_tr = len(proj_features)
    pos_feats = c // 2

    def proj(i: int, x: Array, kernel_size: int, stride: int, padding: int) -> Array:
      y = conv(c, kernel_size, name=f"input_proj_{i}_0", stride=stride, padding=padding,
               kernel_init=nn.initializers.xavier_uniform(), **kw)(x.astype(self.dtype))
      return group_norm(self.num_groups, name=f"input_proj_{i}_1", **kw)(y)

    def pos_of(x: Array) -> Array:
      pe = sine_position_embedding(x.shape[1], x.shape[2], pos_feats).astype(self.dtype)
      return jnp.broadcast_to(pe[None], (x.shape[0],) + pe.shape)

    # Extra levels (downsampled from the coarsest backbone feature).
    extra, extra_pos = [], []
    for l in range(n_tr, self.total_num_feature_levels):
      src_in = features[extra_input] if l == n_tr else extra[-1]
      s = proj(l, src_in, 3, 2, 1)
      extra.append(s)
      extra_pos.append(pos_of(s))
    extra, extra_pos = extra[::-1], extra_pos[::-1]

    srcs, pos = [], []
    for i, f in enumerate(proj_features):
      x = features[f]
      srcs.append(proj(i, x, 1, 1, 0))
      pos.append(pos_of(x))
    if self.feature_order == "low2high":
      srcs, pos = srcs + extra, pos + extra_pos
    else:
      srcs, pos = extra + srcs, extra_pos + pos

    out = DeformableTransformerEncoderOnly(
        d_model=c, n_heads=self.num_heads, num_encoder_layers=self.num_encoder_layers,
        d_ffn=self.dim_feedforward, dropout=self.dropout, n_levels=len(srcs),
        n_points=self.n_points, msda_impl=self.msda_impl, query_chunk=self.query_chunk,
        remat_layers=self.remat_encoder_layers, remat_policy=self.remat_policy,
        name="transformer", **kw)(
            srcs, pos, deterministic=deterministic)

    # FPN on the higher-resolution backbone features, coarse to fine.
    high_res = 0 if self.feature_order == "low2high" else -1
    use_norm = self.norm == "GN"
    for j in reversed(range(num_fpn)):
      x = features[fpn_features[j]].astype(self.dtype)
      lateral = Conv2dNorm(c, 1, 0, use_norm=use_norm, num_groups=self.num_groups,
                           name=f"adapter_{j + 1}", **kw)(x)
      y = lateral + resize_bilinear(out[high_res], lateral.shape[1:3])
      y = Conv2dNorm(c, 3, 1, use_norm=use_norm, num_groups=self.num_groups,
                     activation=True, name=f"layer_{j + 1}", **kw)(y)
      out.append(y)

    mask_features = conv(self.mask_dim, 1, name="mask_features",
                         kernel_init=c2_xavier_init, **kw)(out[-1])
    return mask_features, out[:self.total_num_feature_levels]
