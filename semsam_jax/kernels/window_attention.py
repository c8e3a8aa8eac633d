"""Swin window self-attention as a native XLA:CPU kernel (forward).

:func:`window_attention` computes, for every window and head, the softmax
attention of the scaled queries over the keys with the relative position
bias (and the shifted-window mask) added, applied to the values -- the part
of ``WindowAttention`` between the ``qkv`` and ``proj`` layers -- in one
pass that keeps each window in the CPU caches.  The backward pass
differentiates the same computation written in XLA (``reference``), so
gradients are those of the pure-XLA path.  See ``window_attention_cpu.cc``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from semsam_jax.kernels import native

TARGET = "semsam_window_attention_cpu"


def reference(qkv, bias, mask, num_heads: int, scale: float):
  """The XLA formulation: qkv (B, W, N, 3C), bias (H, N, N), mask (W, N, N)
  or None -> (B, W, N, C) float32."""
  b, w, n, c3 = qkv.shape
  c = c3 // 3
  d = c // num_heads
  qkv = qkv.astype(jnp.float32).reshape(b, w, n, 3, num_heads, d)
  q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
  q = q * jnp.asarray(scale, jnp.float32)
  logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k) + bias[None, None]
  if mask is not None:
    logits = logits + mask[None, :, None]
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bwhqk,bwkhd->bwqhd", weights, v).reshape(b, w, n, c)


def _call(qkv, bias, mask, has_mask: bool, num_heads: int, scale: float):
  b, w, n, c3 = qkv.shape
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((b, w, n, c3 // 3), jnp.float32),
                          vmap_method="sequential")(
      qkv.astype(jnp.float32), bias.astype(jnp.float32), mask.astype(jnp.float32),
      num_heads=int(num_heads), scale=np.float32(scale), has_mask=int(has_mask))


# ``mask`` is always an array (a (1, 1, 1) placeholder when ``has_mask`` is
# False), so one custom VJP serves both the plain and the shifted windows.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(qkv, bias, mask, has_mask, num_heads, scale):
  return _call(qkv, bias, mask, has_mask, num_heads, scale)


def _fwd(qkv, bias, mask, has_mask, num_heads, scale):
  return _call(qkv, bias, mask, has_mask, num_heads, scale), (qkv, bias, mask)


def _bwd(has_mask, num_heads, scale, residuals, g):
  qkv, bias, mask = residuals
  _, vjp = jax.vjp(lambda q, bb, m: reference(q, bb, m if has_mask else None, num_heads, scale),
                   qkv, bias, mask)
  return vjp(g)


_attention.defvjp(_fwd, _bwd)


def window_attention(qkv, bias, mask, num_heads: int, scale: float):
  """qkv (B, W, N, 3C) [q | k | v, heads-major], bias (H, N, N), mask (W, N, N)
  additive or None -> (B, W, N, C) float32, on CPU through the native kernel.

  Raises :class:`~semsam_jax.kernels.native.KernelUnavailableError` when the
  kernel cannot be built here.
  """
  native.load()
  has_mask = mask is not None
  mask_arg = mask if has_mask else jnp.zeros((1, 1, 1), jnp.float32)
  return _attention(qkv, bias, mask_arg, has_mask, num_heads, scale)
