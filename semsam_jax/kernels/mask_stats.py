"""Threshold counts of bilinearly upsampled mask logits (native CPU kernel).

``mask_threshold_counts(logits, image_hw, thresholds, factor)`` counts, for
every mask, the pixels of its ``factor`` x upsampled logits (bilinear,
align_corners=False) that exceed each threshold, inside the top-left
``image_hw`` region, without writing the upsampled masks to memory.  The
automatic mask generator uses it for the stability scores; its pure-XLA
counterpart is :func:`semsam_jax.inference.automatic.threshold_counts_xla`.
See ``mask_stats_cpu.cc`` for the arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semsam_jax.kernels import native

TARGET = "semsam_mask_counts_cpu"


def mask_threshold_counts(logits, image_hw, thresholds, factor: int):
  """(N, h, w) float logits, (2,) int (H, W), (K,) float -> (N, K) int32.

  Raises :class:`~semsam_jax.kernels.native.KernelUnavailableError` when the
  kernel cannot be built here.
  """
  native.load()
  n = logits.shape[0]
  k = jnp.shape(thresholds)[0]
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, k), jnp.int32),
                          vmap_method="sequential")(
      jnp.asarray(logits, jnp.float32), jnp.asarray(image_hw, jnp.int32),
      jnp.asarray(thresholds, jnp.float32), factor=int(factor))
