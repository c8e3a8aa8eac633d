"""Small building blocks shared by the model parts.

Naming contract (relied upon by :mod:`semsam_jax.convert`): every Flax module and
parameter mirrors the attribute path of the original PyTorch module, with list
indices merged into the preceding name (``layers.0.blocks.1`` -> ``layers_0`` /
``blocks_1``; ``input_proj.0.1`` -> ``input_proj_0_1``).  Leaves are ``kernel``
(Linear: (in, out); Conv: HWIO), ``bias``, ``scale`` (LayerNorm/GroupNorm) and
``embedding`` (nn.Embedding); bare ``nn.Parameter`` tensors keep their own name.

Every parameter carries logical axis names so that data/FSDP/tensor sharding is
a choice of ``nn.logical_axis_rules`` rather than a code change.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's default eps for LayerNorm and GroupNorm.
TORCH_NORM_EPS = 1e-5


def gelu(x):
  """Exact (erf) GELU, as ``torch.nn.GELU()``."""
  return jax.nn.gelu(x, approximate=False)


def inverse_sigmoid(x, eps: float = 1e-5):
  """``log(x / (1 - x))`` with the clamping used by DETR-style models."""
  x = jnp.clip(x, 0.0, 1.0)
  x1 = jnp.maximum(x, eps)
  x2 = jnp.maximum(1.0 - x, eps)
  return jnp.log(x1 / x2)


def dense(features: int, name: str, axes: tuple[str, str] = ("embed", "mlp"),
          use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32,
          kernel_init: Callable = nn.initializers.lecun_normal(),
          bias_init: Callable = nn.initializers.zeros) -> nn.Dense:
  """A Dense layer whose kernel/bias carry logical axis names."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
      precision=None, name=name)


def layer_norm(name: str, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, axis_name: str = "embed") -> nn.LayerNorm:
  """LayerNorm with PyTorch's eps; statistics are computed in float32."""
  return nn.LayerNorm(
      epsilon=TORCH_NORM_EPS, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
      name=name)


def group_norm(num_groups: int, name: str, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm over NHWC inputs with PyTorch's eps."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=TORCH_NORM_EPS, dtype=dtype,
      param_dtype=param_dtype, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
      name=name)


def conv(features: int, kernel_size: int, name: str, stride: int = 1,
         padding: int | str = 0, use_bias: bool = True, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32,
         kernel_init: Callable = nn.initializers.lecun_normal()) -> nn.Conv:
  """NHWC convolution with explicit symmetric integer padding (PyTorch style)."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          kernel_init, (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
      name=name)


class MLP(nn.Module):
  """``num_layers`` Dense layers with ReLU between them (DETR's ``MLP``).

  Sub-modules are named ``layers_0 .. layers_{n-1}`` to mirror ``layers.i``.
  """
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = dense(self.output_dim if last else self.hidden_dim, name=f"layers_{i}",
                dtype=self.dtype, param_dtype=self.param_dtype)(x)
      if not last:
        x = nn.relu(x)
    return x
