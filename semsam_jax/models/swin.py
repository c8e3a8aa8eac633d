"""Swin Transformer backbone (the hierarchical ViT used by Semantic-SAM).

Data layout is NHWC throughout.  The module tree follows the PyTorch attribute
paths of the original backbone so that checkpoints convert mechanically (see
:mod:`semsam_jax.models.layers`)::

  patch_embed/{proj, norm}
  absolute_pos_embed                       (only when ``ape``; torch layout 1,C,H,W)
  layers_{i}/blocks_{j}/norm1
  layers_{i}/blocks_{j}/attn/{qkv, proj, relative_position_bias_table}
  layers_{i}/blocks_{j}/norm2
  layers_{i}/blocks_{j}/mlp/{fc1, fc2}
  layers_{i}/downsample/{norm, reduction}  (all stages but the last)
  norm{i}                                  (one output norm per stage)

Behaviour reproduced from the reference implementation:

* the image is zero-padded at the right/bottom to a multiple of the patch size
  before the strided patch convolution;
* inside every block the (normalised) feature map is zero-padded at the
  right/bottom to a multiple of the window size; the padded tokens take part in
  the attention like any other token and are cropped afterwards;
* the window size is never reduced for small feature maps, and odd blocks
  always use the cyclic shift ``window_size // 2`` with an additive mask of
  -100 between tokens that come from different regions of the padded map;
* PatchMerging zero-pads odd sizes, so a stage of size (H, W) is followed by
  one of size (ceil(H/2), ceil(W/2)).

Static shapes only: every pad amount, window count and attention mask is
derived with numpy from the (static) input shape at trace time.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semsam_jax.models.layers import (Dtype, conv, dense, gelu, layer_norm,
                                      map_token_chunks)

Array = jax.Array

# Additive logit penalty between tokens of different shifted regions.
SHIFT_MASK_VALUE = -100.0
FEATURE_NAMES = ("res2", "res3", "res4", "res5")

_linear_init = nn.initializers.truncated_normal(stddev=0.02)


# ----------------------------------------------------------------------------
# Static helpers (numpy, evaluated at trace time)
# ----------------------------------------------------------------------------

def relative_position_index(window_size: int) -> np.ndarray:
  """(N, N) index into the bias table, N = window_size**2.

  Entry (i, j) encodes the offset of token i relative to token j inside a
  window as ``(dy + ws - 1) * (2 ws - 1) + (dx + ws - 1)``.
  """
  ws = window_size
  ys, xs = np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")
  ys, xs = ys.reshape(-1), xs.reshape(-1)
  dy = ys[:, None] - ys[None, :] + (ws - 1)
  dx = xs[:, None] - xs[None, :] + (ws - 1)
  return dy * (2 * ws - 1) + dx


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def shifted_window_mask(height: int, width: int, window_size: int,
                        shift_size: int) -> np.ndarray:
  """Additive attention mask (nW, N, N) for shifted windows on a padded map.

  ``height``/``width`` must already be multiples of ``window_size``.  After the
  cyclic shift every position belongs to one of up to 3x3 regions (bands
  ``[0, S-ws)``, ``[S-ws, S-shift)``, ``[S-shift, S)`` along each axis); tokens
  of different regions must not attend to each other.
  """
  def bands(size: int) -> np.ndarray:
    label = np.zeros(size, np.int64)
    label[max(size - window_size, 0):] = 1
    label[max(size - shift_size, 0):] = 2
    return label

  region = bands(height)[:, None] * 3 + bands(width)[None, :]
  windows = window_partition_np(region, window_size)          # (nW, N)
  different = windows[:, :, None] != windows[:, None, :]
  return np.where(different, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def window_partition_np(x: np.ndarray, window_size: int) -> np.ndarray:
  """(H, W) -> (nW, ws*ws), windows in row-major order."""
  h, w = x.shape
  ws = window_size
  x = x.reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3)
  return x.reshape(-1, ws * ws)


def window_partition(x: Array, window_size: int) -> Array:
  """(B, H, W, C) -> (B, nW, ws*ws, C); H and W multiples of ``window_size``."""
  b, h, w, c = x.shape
  ws = window_size
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_merge(windows: Array, window_size: int, height: int, width: int) -> Array:
  """Inverse of :func:`window_partition`: (B, nW, ws*ws, C) -> (B, H, W, C)."""
  b, _, _, c = windows.shape
  ws = window_size
  x = windows.reshape(b, height // ws, width // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def _torch_cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """The 4 tap weights of PyTorch's bicubic kernel for fractional offsets t."""
  def near(x):   # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):    # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of ``F.interpolate(mode='bicubic', align_corners=False)``
  along one axis (no antialiasing; taps outside the input are clamped)."""
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  weights = _torch_cubic_weights(src - base)                  # (out, 4)
  m = np.zeros((out_size, in_size), np.float64)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
    np.add.at(m, (np.arange(out_size), idx), weights[:, k])
  return m


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------

# Variable collection that can carry explicit stochastic-depth decisions (for
# replaying recorded draws): ``{"drop_path_keep": {<block path>: {"attn": (B,),
# "mlp": (B,)}}}`` with 1.0 = keep and 0.0 = drop, passed to ``model.apply``.
DROP_PATH_KEEP = "drop_path_keep"


def drop_path(module: nn.Module, x: Array, rate: float, deterministic: bool,
              branch: str = "branch") -> Array:
  """Stochastic depth: drops the whole residual branch per sample, rescaling
  the kept ones by 1/keep, as ``x * (keep_mask / keep_prob)`` (timm >= 0.6).

  The decision comes from the variable ``DROP_PATH_KEEP``/``branch`` of
  ``module`` when the caller provides it (shape (B,), 1 keep / 0 drop), else
  from the 'dropout' rng stream.
  """
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  if module.has_variable(DROP_PATH_KEEP, branch):
    mask = jnp.asarray(module.get_variable(DROP_PATH_KEEP, branch), x.dtype).reshape(shape)
  else:
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape).astype(x.dtype)
  return x * (mask / jnp.asarray(keep, x.dtype))


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2 (dropout after each when ``drop`` > 0)."""
  hidden_features: int
  out_features: int
  drop: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_linear_init)
    x = dense(self.hidden_features, name="fc1", axes=("embed", "mlp"), **kw)(x)
    x = gelu(x)
    x = nn.Dropout(self.drop)(x, deterministic=deterministic)
    x = dense(self.out_features, name="fc2", axes=("mlp", "embed"), **kw)(x)
    return nn.Dropout(self.drop)(x, deterministic=deterministic)


class WindowAttention(nn.Module):
  """Multi-head self attention inside windows, with a learned relative
  position bias (table ``relative_position_bias_table`` of shape
  ((2ws-1)^2, heads))."""
  dim: int
  window_size: int
  num_heads: int
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  # "auto": the native CPU kernel on CPU (float32, no attention dropout in
  # use) when it builds here, else "xla"; or "xla" / "cpu_native".
  impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _use_native(self, deterministic: bool) -> bool:
    if self.impl not in ("auto", "xla", "cpu_native"):
      raise ValueError(f"unknown window attention implementation {self.impl!r}; "
                       "valid: 'auto', 'xla', 'cpu_native'")
    if self.impl == "xla":
      return False
    if self.impl == "cpu_native":
      return True
    from semsam_jax.kernels import native
    return (jnp.dtype(self.dtype) == jnp.float32 and (deterministic or self.attn_drop == 0.0)
            and native.usable_here())

  @nn.compact
  def __call__(self, x: Array, mask: Optional[np.ndarray] = None,
               deterministic: bool = True) -> Array:
    """x: (B, nW, N, C) window tokens; mask: (nW, N, N) additive or None."""
    b, nw, n, c = x.shape
    h = self.num_heads
    d = c // h
    ws = self.window_size
    # The reference uses ``qk_scale or head_dim ** -0.5`` (0 also falls back).
    scale = self.qk_scale or d ** -0.5

    table = self.param(
        "relative_position_bias_table",
        nn.with_logical_partitioning(_linear_init, (None, "heads")),
        ((2 * ws - 1) ** 2, h), self.param_dtype)

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_linear_init)
    qkv = dense(3 * c, name="qkv", axes=("embed", "mlp"), use_bias=self.qkv_bias, **kw)(x)
    if self._use_native(deterministic):
      from semsam_jax.kernels.window_attention import window_attention
      index = relative_position_index(ws).reshape(-1)
      bias = jnp.asarray(table, jnp.float32)[index].reshape(n, n, h).transpose(2, 0, 1)
      win_mask = None if mask is None else jnp.asarray(mask, jnp.float32).reshape(nw, n, n)
      out = window_attention(qkv, bias, win_mask, h, scale).astype(self.dtype)
      out = dense(c, name="proj", axes=("mlp", "embed"), **kw)(out)
      return nn.Dropout(self.proj_drop)(out, deterministic=deterministic)
    qkv = qkv.reshape(b, nw, n, 3, h, d)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    q = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32)

    index = relative_position_index(ws).reshape(-1)
    bias = jnp.asarray(table, jnp.float32)[index].reshape(n, n, h).transpose(2, 0, 1)
    logits = logits + bias[None, None]
    if mask is not None:
      logits = logits + jnp.asarray(mask, jnp.float32)[None, :, None]
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.attn_drop)(weights, deterministic=deterministic)

    out = jnp.einsum("bwhqk,bwkhd->bwqhd", weights, v).reshape(b, nw, n, c)
    out = dense(c, name="proj", axes=("mlp", "embed"), **kw)(out)
    return nn.Dropout(self.proj_drop)(out, deterministic=deterministic)


def padded_token_mask(height: int, width: int, window_size: int,
                      shift_size: int) -> np.ndarray:
  """(nW, ws*ws) float32, 1 for real tokens and 0 for the zero padding that
  brings (height, width) to multiples of the window size, laid out like the
  (cyclically shifted) windows of a block."""
  ws = window_size
  hp, wp = _round_up(height, ws), _round_up(width, ws)
  real = np.zeros((hp, wp), np.float32)
  real[:height, :width] = 1.0
  if shift_size:
    real = np.roll(real, (-shift_size, -shift_size), axis=(0, 1))
  return window_partition_np(real, ws)


class SwinTransformerBlock(nn.Module):
  """(Shifted-)window attention + MLP, both pre-norm residual branches.

  The attention branch works in window layout: the input is padded,
  cyclically shifted and partitioned, the residual is added on window tokens
  (padded tokens are zeroed after ``norm1`` exactly as the reference pads the
  normalised map) and the windows are merged back and cropped.  The MLP branch
  then runs on the unpadded map only, as in the reference (no work on padding
  tokens).  With ``token_chunk > 0`` (and no stochastic depth in use) both
  branches process chunks of about that many tokens in a loop, which keeps
  every intermediate in the CPU caches; the results do not depend on it.
  """
  dim: int
  num_heads: int
  window_size: int = 7
  shift_size: int = 0
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: float = 0.0
  token_chunk: int = 0
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if not 0 <= self.shift_size < self.window_size:
      raise ValueError(f"shift_size {self.shift_size} must be in [0, window_size="
                       f"{self.window_size})")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.norm1 = layer_norm("norm1", **kw)
    self.attn = WindowAttention(
        self.dim, self.window_size, self.num_heads, qkv_bias=self.qkv_bias,
        qk_scale=self.qk_scale, attn_drop=self.attn_drop, proj_drop=self.drop,
        impl=self.attention_impl, name="attn", **kw)
    self.norm2 = layer_norm("norm2", **kw)
    self.mlp = Mlp(int(self.dim * self.mlp_ratio), self.dim, drop=self.drop, name="mlp", **kw)

  def _attention_branch(self, x: Array, real: Array, mask: Optional[Array],
                        deterministic: bool) -> Array:
    """Attention residual branch on window tokens x (B, w, N, C); ``real``
    (1, w, N) zeroes the padding after norm1, ``mask`` (1, w, N, N) or None."""
    y = self.norm1(x) * real[..., None].astype(self.dtype)
    y = self.attn(y, None if mask is None else mask[0], deterministic=deterministic)
    return x + drop_path(self, y, self.drop_path, deterministic, "attn")

  def _mlp_branch(self, x: Array, deterministic: bool) -> Array:
    """MLP residual branch on tokens x (B, L, C)."""
    y = self.mlp(self.norm2(x), deterministic=deterministic)
    return x + drop_path(self, y, self.drop_path, deterministic, "mlp")

  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """x: (B, H, W, C) -> (B, H, W, C)."""
    _, height, width, _ = x.shape
    ws, shift = self.window_size, self.shift_size
    hp, wp = _round_up(height, ws), _round_up(width, ws)
    y = x
    if (hp, wp) != (height, width):
      y = jnp.pad(y, ((0, 0), (0, hp - height), (0, wp - width), (0, 0)))
    if shift > 0:
      y = jnp.roll(y, shift=(-shift, -shift), axis=(1, 2))
    windows = window_partition(y, ws)

    real = jnp.asarray(padded_token_mask(height, width, ws, shift))[None]
    xs = (windows, real)
    if shift > 0:
      xs += (jnp.asarray(shifted_window_mask(hp, wp, ws, shift))[None],)

    def attention(mdl, w, r, m=None):
      return mdl._attention_branch(w, r, m, deterministic)

    def mlp(mdl, t):
      return mdl._mlp_branch(t, deterministic)

    # Stochastic depth draws one decision per sample for the whole map, so
    # chunks (each with its own rng) are only used when it is off.
    use_chunks = (deterministic or self.drop_path == 0.0) and self.token_chunk > 0
    window_chunk = max(1, self.token_chunk // (ws * ws)) if use_chunks else 0
    windows = map_token_chunks(self, attention, xs, window_chunk, inplace=True)

    y = window_merge(windows, ws, hp, wp)
    if shift > 0:
      y = jnp.roll(y, shift=(shift, shift), axis=(1, 2))
    y = y[:, :height, :width, :]
    batch, channels = y.shape[0], y.shape[-1]
    tokens = y.reshape(batch, height * width, channels)
    tokens = map_token_chunks(self, mlp, (tokens,), self.token_chunk if use_chunks else 0,
                              inplace=True)
    return tokens.reshape(batch, height, width, channels)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concatenation (order (0,0), (1,0), (0,1), (1,1) as
  (row, col) offsets) -> LayerNorm(4C) -> Linear(4C -> 2C, no bias)."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _, height, width, _ = x.shape
    if height % 2 or width % 2:
      x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    x = jnp.concatenate(
        [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layer_norm("norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return dense(2 * self.dim, name="reduction", axes=("mlp", "embed"), use_bias=False,
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_linear_init)(x)


class BasicLayer(nn.Module):
  """One stage: ``depth`` blocks alternating plain/shifted windows, then an
  optional PatchMerging.  Returns (stage output, input of the next stage)."""
  dim: int
  depth: int
  num_heads: int
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: Sequence[float] = ()
  downsample: bool = False
  remat: bool = False                 # rematerialise each block
  remat_policy: Optional[Callable] = None  # jax.checkpoint_policies member (None: save nothing)
  token_chunk: int = 0
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> tuple[Array, Array]:
    block_cls = SwinTransformerBlock
    if self.remat:
      # Argument 0 is the module itself, so ``deterministic`` is argument 2.
      block_cls = nn.remat(SwinTransformerBlock, static_argnums=(2,), policy=self.remat_policy)
    rates = tuple(self.drop_path) or (0.0,) * self.depth
    if len(rates) != self.depth:
      raise ValueError(f"{len(rates)} drop-path rates for {self.depth} blocks")
    for j in range(self.depth):
      x = block_cls(
          dim=self.dim, num_heads=self.num_heads, window_size=self.window_size,
          shift_size=0 if j % 2 == 0 else self.window_size // 2,
          mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, qk_scale=self.qk_scale,
          drop=self.drop, attn_drop=self.attn_drop, drop_path=float(rates[j]),
          token_chunk=self.token_chunk, attention_impl=self.attention_impl,
          dtype=self.dtype, param_dtype=self.param_dtype,
          name=f"blocks_{j}")(x, deterministic)
    if not self.downsample:
      return x, x
    down = PatchMerging(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="downsample")(x)
    return x, down


class PatchEmbed(nn.Module):
  """Pads to a multiple of the patch size, strided conv, optional LayerNorm."""
  patch_size: int = 4
  embed_dim: int = 96
  patch_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _, height, width, _ = x.shape
    p = self.patch_size
    pad_h, pad_w = (-height) % p, (-width) % p
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    x = conv(self.embed_dim, p, name="proj", stride=p, padding=0, dtype=self.dtype,
             param_dtype=self.param_dtype)(x)
    if self.patch_norm:
      x = layer_norm("norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return x


class SwinTransformer(nn.Module):
  """Swin Transformer backbone returning NHWC features ``res2``..``res5``
  (strides 4, 8, 16, 32; channels ``embed_dim * 2**i``), each passed through
  its output LayerNorm ``norm{i}``.

  ``deterministic=False`` enables stochastic depth (linearly increasing from 0
  to ``drop_path_rate`` over all blocks) and dropout, drawing from the
  'dropout' rng stream.
  """
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  ape: bool = False
  patch_norm: bool = True
  pretrain_img_size: int = 224
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  out_features: Sequence[str] = FEATURE_NAMES
  remat: bool = False                 # rematerialise each block (nn.remat)
  remat_stages: bool = False          # rematerialise each stage (blocks + patch merging)
  remat_policy: Optional[Callable] = None  # jax.checkpoint_policies member (None: save nothing)
  token_chunk: int = 0
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, cfg: Any, **overrides) -> "SwinTransformer":
    """Builds the backbone from ``model_config().backbone`` (a ConfigDict or
    any mapping with the same field names); keyword arguments override."""
    def get(name, default=None):
      try:
        value = cfg[name]
      except (KeyError, AttributeError):
        return default
      return default if value is None and default is not None else value

    kwargs = dict(
        embed_dim=int(cfg["embed_dim"]),
        depths=tuple(int(d) for d in cfg["depths"]),
        num_heads=tuple(int(h) for h in cfg["num_heads"]),
        window_size=int(cfg["window_size"]),
        patch_size=int(get("patch_size", 4)),
        mlp_ratio=float(get("mlp_ratio", 4.0)),
        qkv_bias=bool(get("qkv_bias", True)),
        qk_scale=None if get("qk_scale") is None else float(get("qk_scale")),
        ape=bool(get("ape", False)),
        patch_norm=bool(get("patch_norm", True)),
        pretrain_img_size=int(get("pretrain_img_size", 224)),
        drop_rate=float(get("drop_rate", 0.0)),
        attn_drop_rate=float(get("attn_drop_rate", 0.0)),
        drop_path_rate=float(get("drop_path_rate", 0.0)),
        out_features=tuple(get("out_features", FEATURE_NAMES)),
        remat=bool(get("remat", False)),
    )
    # remat / remat_stages / remat_policy normally come from model.remat
    # (SemanticSAM passes them); backbone.remat = True is its legacy "block".
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def num_features(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

  def _check(self) -> None:
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {tuple(self.depths)} and num_heads "
                       f"{tuple(self.num_heads)} differ in length")
    if len(self.depths) > len(FEATURE_NAMES):
      raise ValueError(f"at most {len(FEATURE_NAMES)} stages are supported")
    for i, (c, h) in enumerate(zip(self.num_features, self.num_heads)):
      if c % h:
        raise ValueError(f"stage {i}: width {c} is not divisible by {h} heads")
    unknown = [f for f in self.out_features if f not in FEATURE_NAMES[:len(self.depths)]]
    if unknown:
      raise ValueError(f"unknown out_features {unknown}; "
                       f"known: {FEATURE_NAMES[:len(self.depths)]}")

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> dict[str, Array]:
    """x: (B, H, W, 3) normalised images -> {'res2': (B, H/4, W/4, C), ...}."""
    self._check()
    if x.ndim != 4:
      raise ValueError(f"SwinTransformer expects (B, H, W, C) images, got {x.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    x = PatchEmbed(self.patch_size, self.embed_dim, self.patch_norm, name="patch_embed",
                   **kw)(x)

    if self.ape:
      res = self.pretrain_img_size // self.patch_size
      # Kept in the PyTorch layout (1, C, H, W) so the checkpoint maps 1:1.
      pos = self.param("absolute_pos_embed",
                       nn.with_logical_partitioning(_linear_init, (None, "embed", None, None)),
                       (1, self.embed_dim, res, res), self.param_dtype)
      _, wh, ww, _ = x.shape
      mh = jnp.asarray(bicubic_resize_matrix(res, wh), jnp.float32)
      mw = jnp.asarray(bicubic_resize_matrix(res, ww), jnp.float32)
      pos = jnp.einsum("yi,xj,cij->yxc", mh, mw, jnp.asarray(pos[0], jnp.float32))
      x = x + pos[None].astype(self.dtype)
    x = nn.Dropout(self.drop_rate)(x, deterministic=deterministic)

    total = sum(self.depths)
    rates = [float(r) for r in np.linspace(0.0, self.drop_path_rate, total, dtype=np.float32)]
    outs = {}
    start = 0
    num_stages = len(self.depths)
    # Argument 0 of the lifted call is the module, so ``deterministic`` is 2.
    stage_cls = (nn.remat(BasicLayer, static_argnums=(2,), policy=self.remat_policy)
                 if self.remat_stages else BasicLayer)
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      stage_out, x = stage_cls(
          dim=self.num_features[i], depth=depth, num_heads=heads,
          window_size=self.window_size, mlp_ratio=self.mlp_ratio,
          qkv_bias=self.qkv_bias, qk_scale=self.qk_scale, drop=self.drop_rate,
          attn_drop=self.attn_drop_rate, drop_path=tuple(rates[start:start + depth]),
          downsample=i < num_stages - 1, remat=self.remat, remat_policy=self.remat_policy,
          token_chunk=self.token_chunk, attention_impl=self.attention_impl,
          name=f"layers_{i}", **kw)(x, deterministic)
      start += depth
      # Every stage owns its output norm (the checkpoints hold all of them).
      normed = layer_norm(f"norm{i}", **kw)(stage_out)
      if FEATURE_NAMES[i] in self.out_features:
        outs[FEATURE_NAMES[i]] = normed
    return outs
