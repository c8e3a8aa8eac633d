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


def conv2d(x, kernel, stride: int = 1, padding: int = 0):
  """NHWC x HWIO convolution with symmetric integer padding.

  A 1x1 convolution without stride or padding is computed as a matrix
  product over the channels: the same sums, and on CPU about twice as fast
  as XLA's convolution for the wide 1x1 layers of the pixel decoder.
  """
  kh, kw = kernel.shape[:2]
  if (kh, kw) == (1, 1) and stride == 1 and padding == 0:
    return jnp.einsum("bhwc,cf->bhwf", x, kernel[0, 0])
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
  """NHWC convolution with PyTorch-style symmetric integer padding.

  Parameters ``kernel`` (HWIO) and ``bias``, as ``flax.linen.Conv`` names and
  initialises them; computed with :func:`conv2d`.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init,
                                               (None, None, "conv_in", "conv_out")),
        (k, k, x.shape[-1], self.features), self.param_dtype)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ("conv_out",)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def conv(features: int, kernel_size: int, name: str, stride: int = 1,
         padding: int = 0, use_bias: bool = True, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32,
         kernel_init: Callable = nn.initializers.lecun_normal()) -> Conv:
  """NHWC convolution with explicit symmetric integer padding (PyTorch style)."""
  if not isinstance(padding, int):
    raise TypeError(f"padding must be an int (symmetric, PyTorch style), got {padding!r}")
  return Conv(features, kernel_size, stride=stride, padding=padding, use_bias=use_bias,
              dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, name=name)


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


def linear_upsample_phases(x: jax.Array, factor: int, axis: int) -> list:
  """Linear (align_corners=False) upsampling of ``x`` by an integer factor
  along ``axis``, as ``factor`` phase arrays of ``x``'s shape: phase ``r``
  holds the outputs ``factor * i + r``.

  Output ``factor * i + r`` samples ``i + d_r`` with
  ``d_r = (r + 0.5) / factor - 0.5``: a two-tap blend of ``x[i]`` with its
  left (``d_r < 0``) or right neighbour, clamped at the ends -- what
  ``jax.image.resize(..., "linear")`` and PyTorch's
  ``F.interpolate(mode="bilinear")`` compute there, without a dense
  interpolation matrix.
  """
  n = x.shape[axis]
  if n == 1:
    return [x] * factor
  first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
  last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
  prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
  nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis)
  out = []
  for r in range(factor):
    d = (r + 0.5) / factor - 0.5
    if d < 0:
      out.append(jnp.asarray(-d, x.dtype) * prev + jnp.asarray(1 + d, x.dtype) * x)
    else:
      out.append(jnp.asarray(1 - d, x.dtype) * x + jnp.asarray(d, x.dtype) * nxt)
  return out


def linear_upsample(x: jax.Array, factor: int, axis: int) -> jax.Array:
  """The phases of :func:`linear_upsample_phases` interleaved: ``x`` with
  axis ``axis`` ``factor`` times longer."""
  out = jnp.stack(linear_upsample_phases(x, factor, axis), axis + 1)
  return out.reshape(x.shape[:axis] + (factor * x.shape[axis],) + x.shape[axis + 1:])


def chunk_layout(length: int, chunk: int) -> tuple[int, int]:
  """(number of chunks, chunk size) used by :func:`map_token_chunks`."""
  n0 = -(-length // chunk)
  for n in range(max(1, -(-length // (chunk + chunk // 4))), 2 * n0 + 1):
    if length % n == 0:
      return n, length // n
  return n0, -(-length // n0)


def map_token_chunks(module: nn.Module, fn: Callable, xs: Sequence[Any], chunk: int,
                     pad_values: Sequence[float] | None = None, inplace: bool = False):
  """Applies ``fn(module, *xs)`` to consecutive chunks of at most ``chunk``
  tokens (axis 1 of every array in ``xs``) in a sequential loop.

  ``fn`` must treat tokens independently (anything shared, such as a value
  table, is closed over).  The results are those of one call on all tokens,
  but every chunk's intermediates (hidden FFN activations, gathered samples)
  stay small enough for the CPU caches, which makes large token counts much
  faster on CPU.  The loop is a ``flax.linen.scan`` with the parameters
  broadcast, so the parameter tree is that of a direct call.

  The token count is split into ``n`` equal chunks: a divisor of ``L`` giving
  chunks of at most 1.25 ``chunk`` tokens when there is one (no padding),
  else ``n = ceil(L / chunk)`` with the few missing tokens padded (with
  ``pad_values[i]`` for ``xs[i]``, zero by default) and cropped from the
  outputs.  ``chunk <= 0`` or ``L <= chunk`` calls ``fn`` once.  Returns
  whatever ``fn`` returns (a pytree of arrays with tokens on axis 1).

  With ``inplace=True`` ``fn`` must return one array shaped like its first
  argument: each chunk's result then overwrites that chunk of (a copy of)
  ``xs[0]`` inside the loop carry, which XLA updates in place -- no stacked
  output buffer to initialise and no copy out of it.
  """
  length = xs[0].shape[1]
  if chunk <= 0 or length <= chunk:
    return fn(module, *xs)
  n, size = chunk_layout(length, chunk)
  pad = n * size - length
  pad_values = tuple(pad_values) if pad_values is not None else (0.0,) * len(xs)

  def padded(x, fill):
    if not pad:
      return x
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=jnp.asarray(fill, x.dtype))

  if inplace:
    def step(mdl, carry, _):
      i, buf, others = carry
      start = i * size
      x0 = jax.lax.dynamic_slice_in_dim(buf, start, size, axis=1)
      rest = [jax.lax.dynamic_slice_in_dim(o, start, size, axis=1) for o in others]
      y = fn(mdl, x0, *rest)
      if not isinstance(y, jax.Array) or y.shape != x0.shape:
        raise ValueError("map_token_chunks(inplace=True) needs fn to return one array "
                         f"shaped like its first argument {x0.shape}, got "
                         f"{jax.tree.map(jnp.shape, y)}")
      buf = jax.lax.dynamic_update_slice_in_dim(buf, y.astype(buf.dtype), start, axis=1)
      return (i + 1, buf, others), None

    scan = nn.scan(step, variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True}, length=n)
    init = (jnp.zeros((), jnp.int32), padded(xs[0], pad_values[0]),
            tuple(padded(x, v) for x, v in zip(xs[1:], pad_values[1:])))
    (_, out, _), _ = scan(module, init, None)
    return out[:, :length] if pad else out

  def split(x, fill):
    x = padded(x, fill)
    x = x.reshape((x.shape[0], n, size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def merge(y):
    y = jnp.moveaxis(y, 0, 1)
    y = y.reshape((y.shape[0], n * size) + y.shape[3:])
    return y[:, :length] if pad else y

  def body(mdl, carry, chunk_xs):
    return carry, fn(mdl, *chunk_xs)

  scan = nn.scan(body, variable_broadcast="params",
                 split_rngs={"params": False, "dropout": True}, length=n)
  _, ys = scan(module, None, tuple(split(x, v) for x, v in zip(xs, pad_values)))
  return jax.tree.map(merge, ys)
