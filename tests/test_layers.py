"""Shared building blocks: token chunking helpers, 1x1 convolution path."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax.models import layers


def test_chunk_layout_prefers_divisors():
  assert layers.chunk_layout(21760, 1024) == (17, 1280)     # no padding
  assert layers.chunk_layout(1000, 100) == (8, 125)      # up to 1.25 x chunk
  n, size = layers.chunk_layout(1369, 83)                    # 37 x 37 windows: padded
  assert n * size >= 1369 and size <= 83 + 83 // 4
  for length, chunk in [(7, 3), (101, 10), (4096, 1024), (50, 49)]:
    n, size = layers.chunk_layout(length, chunk)
    assert n * size >= length and (n - 1) * size < length and size <= chunk + chunk // 4


class _Tokenwise(nn.Module):
  """A per-token MLP with a residual, chunked over tokens."""
  chunk: int
  inplace: bool

  @nn.compact
  def __call__(self, x, extra):
    dense = nn.Dense(x.shape[-1], name="d")

    def fn(mdl, xc, ec):
      return xc + jnp.tanh(dense(xc)) * ec[..., None]

    return layers.map_token_chunks(self, fn, (x, extra), self.chunk, pad_values=(0.0, 1.0),
                                   inplace=self.inplace)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("length,chunk", [(37, 8), (40, 8), (40, 0), (5, 8)])
def test_map_token_chunks_equals_direct_call(length, chunk, inplace):
  rng = np.random.default_rng(length + chunk)
  x = jnp.asarray(rng.normal(size=(2, length, 6)), jnp.float32)
  extra = jnp.asarray(rng.uniform(size=(2, length)), jnp.float32)
  ref_mod = _Tokenwise(chunk=0, inplace=False)
  params = ref_mod.init(jax.random.PRNGKey(0), x, extra)
  mod = _Tokenwise(chunk=chunk, inplace=inplace)
  # Same parameter tree whatever the chunking.
  assert jax.tree.structure(mod.init(jax.random.PRNGKey(0), x, extra)) == \
      jax.tree.structure(params)
  want = ref_mod.apply(params, x, extra)
  got = jax.jit(mod.apply)(params, x, extra)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_inplace_chunks_need_an_output_shaped_like_the_input():
  class Bad(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.map_token_chunks(self, lambda mdl, xc: xc[..., :2], (x,), 4, inplace=True)

  x = jnp.ones((1, 12, 3))
  with pytest.raises(ValueError, match="shaped like its first argument"):
    Bad().init(jax.random.PRNGKey(0), x)


def test_conv2d_1x1_is_a_matrix_product_equal_to_the_convolution():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 8, 3)), jnp.float32)
  want = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision="highest")
  with jax.default_matmul_precision("highest"):
    got = layers.conv2d(x, k)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Other kernels keep the convolution (padding / stride respected).
  k3 = jnp.asarray(rng.normal(size=(3, 3, 8, 3)), jnp.float32)
  got3 = layers.conv2d(x, k3, stride=2, padding=1)
  assert got3.shape == (2, 3, 4, 3)
