"""Native CPU kernels (optional) behind pure-XLA fallbacks.

* :mod:`semsam_jax.kernels.msda_cpu` -- multi-scale deformable attention
  forward and backward (``msda_impl="cpu_native"``, the ``"auto"`` choice on
  CPU);
* :mod:`semsam_jax.kernels.window_attention` -- Swin window self-attention
  forward (``window_attention_impl="cpu_native"``, the ``"auto"`` choice on
  CPU);
* :mod:`semsam_jax.kernels.mask_stats` -- threshold counts of upsampled mask
  logits (stability scores of the automatic mask generator).

All are XLA typed-FFI custom calls compiled on first use with the system
C++ compiler and cached; see :mod:`semsam_jax.kernels.native`.
"""
