"""The native CPU kernels: build and cache, fallbacks, and the mask threshold
counts against an independent numpy computation (the deformable attention
kernel is checked with the other implementations in test_msda_impls.py and
test_deformable_attention.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax.inference import automatic as am
from semsam_jax.kernels import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, **env) -> subprocess.CompletedProcess:
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  return subprocess.run([sys.executable, "-c", script], env=full_env, capture_output=True,
                        text=True, cwd=ROOT)


def test_kernels_are_built_where_a_compiler_exists():
  """CI machines have a C++ compiler: there the kernels must build (a silent
  fallback would hide a broken kernel behind the slower XLA formulations)."""
  if not (os.environ.get("CI") or native.compiler()):
    pytest.skip("no C++ compiler on this machine")
  assert native.available(), native.unavailable_reason()
  from semsam_jax.models import deformable_attention as da
  assert da.resolve_impl("auto", backend="cpu") == "cpu_native"


def test_build_is_cached_and_atomic(tmp_path):
  """A fresh cache directory gets exactly one library (no temporary file left)
  and a second process reuses it without compiling."""
  script = ("import jax.numpy as jnp, numpy as np\n"
            "from semsam_jax.kernels import msda_cpu\n"
            "v = jnp.ones((1, 6, 1, 4)); l = jnp.full((1, 2, 1, 1, 1, 2), 0.5)\n"
            "a = jnp.ones((1, 2, 1, 1, 1))\n"
            "print(np.asarray(msda_cpu.msda_cpu(v, ((2, 3),), l, a)).sum())\n")
  first = _run(script, SEMSAM_JAX_KERNEL_CACHE=str(tmp_path))
  assert first.returncode == 0, first.stderr[-2000:]
  # Each of the 2 queries reads 1.0 in its 4 channels (a sample inside the map).
  assert float(first.stdout.strip()) == pytest.approx(8.0)
  libs = sorted(p.name for p in tmp_path.iterdir())
  assert len(libs) == 1 and libs[0].startswith("semsam_kernels-") and libs[0].endswith(".so"), libs
  mtime = (tmp_path / libs[0]).stat().st_mtime_ns
  second = _run(script, SEMSAM_JAX_KERNEL_CACHE=str(tmp_path))
  assert second.returncode == 0, second.stderr[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == libs
  assert (tmp_path / libs[0]).stat().st_mtime_ns == mtime


def test_disabled_by_env_falls_back_to_xla():
  script = ("from semsam_jax.models import deformable_attention as da\n"
            "from semsam_jax.kernels import native\n"
            "print(da.resolve_impl('auto', backend='cpu'), native.available())\n"
            "print(native.unavailable_reason())\n")
  res = _run(script, SEMSAM_JAX_NATIVE="0")
  assert res.returncode == 0, res.stderr[-2000:]
  first, reason = res.stdout.splitlines()[:2]
  assert first.split() == ["fused", "False"]
  assert "SEMSAM_JAX_NATIVE=0" in reason


def test_explicit_native_impl_without_kernel_is_a_clear_error():
  script = ("import jax.numpy as jnp\n"
            "from semsam_jax.models import deformable_attention as da\n"
            "v = jnp.ones((1, 6, 1, 4)); l = jnp.full((1, 2, 1, 1, 1, 2), 0.5)\n"
            "a = jnp.ones((1, 2, 1, 1, 1))\n"
            "da.ms_deform_attn(v, ((2, 3),), l, a, impl='cpu_native')\n")
  res = _run(script, SEMSAM_JAX_NATIVE="0")
  assert res.returncode != 0
  assert "KernelUnavailableError" in res.stderr and "SEMSAM_JAX_NATIVE=0" in res.stderr


def test_compile_error_is_reported_and_leaves_nothing(tmp_path):
  cxx = native.compiler()
  if cxx is None:
    pytest.skip("no C++ compiler on this machine")
  broken = tmp_path / "bad.cc"
  broken.write_text("this is not C++\n")
  with pytest.raises(native.KernelUnavailableError, match="compiling bad.cc failed"):
    native.build(cxx, tmp_path / "cache" / "x.so", sources=(broken,))
  assert list((tmp_path / "cache").iterdir()) == []


# ------------------------------------------------------------- mask threshold counts

def _numpy_counts(low, image_hw, thresholds, factor):
  """Bilinear (align_corners=False, clamped) upsampling written out per output
  pixel in float64, then counted; independent of both implementations."""
  n, h, w = low.shape
  def taps(size_in, size_out):
    src = (np.arange(size_out) + 0.5) / factor - 0.5
    src = np.clip(src, 0, size_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, src - i0
  y0, y1, fy = taps(h, h * factor)
  x0, x1, fx = taps(w, w * factor)
  x = low.astype(np.float64)
  rows = x[:, y0] * (1 - fy)[None, :, None] + x[:, y1] * fy[None, :, None]
  up = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
  up = up[:, :image_hw[0], :image_hw[1]]
  return (up[..., None] > np.asarray(thresholds, np.float64)).sum((1, 2))


CASES = [((16, 24), (64, 96), 4), ((16, 24), (60, 90), 4), ((9, 7), (27, 20), 3),
         ((5, 6), (10, 12), 2), ((4, 4), (4, 4), 1), ((1, 5), (3, 15), 3), ((6, 6), (0, 24), 4)]


@pytest.mark.parametrize("lowres_hw,image_hw,factor", CASES)
def test_threshold_counts_match_numpy(lowres_hw, image_hw, factor):
  """Kernel and XLA formulation agree exactly with each other and with an
  independent float64 upsampling (inputs on a 1/64 grid, thresholds between
  grid values, so float rounding cannot flip a comparison)."""
  rng = np.random.default_rng(sum(lowres_hw) + factor)
  low = (rng.integers(-256, 256, size=(5,) + lowres_hw) / 64.0).astype(np.float32)
  thresholds = np.asarray([1.0 + 1 / 4096, -1.0 - 1 / 4096, 1 / 8192], np.float32)
  ref = _numpy_counts(low, image_hw, thresholds, factor)
  padded = (lowres_hw[0] * factor, lowres_hw[1] * factor)
  hw = np.asarray(image_hw, np.int32)
  xla = np.asarray(jax.jit(am.threshold_counts_xla, static_argnums=3)(low, hw, thresholds,
                                                                      padded))
  np.testing.assert_array_equal(xla, ref)
  if native.available():
    from semsam_jax.kernels.mask_stats import mask_threshold_counts
    got = np.asarray(mask_threshold_counts(jnp.asarray(low), hw, thresholds, factor))
    np.testing.assert_array_equal(got, ref)


def test_stability_counts_native_and_xla_agree_on_real_logits():
  """The generator's stability counts on unrounded logits: native kernel and
  XLA formulation count the same pixels (same arithmetic), and both agree with
  jax.image.resize up to a handful of pixels at the thresholds."""
  if not native.available():
    pytest.skip(native.unavailable_reason())
  rng = np.random.default_rng(0)
  low = jnp.asarray(rng.normal(size=(3, 2, 32, 40)) * 3, jnp.float32)
  hw = np.asarray([120, 150], np.int32)
  hi, lo = am._stability_counts(low, hw, np.float32(1.0), padded_hw=(128, 160))
  xla = am.threshold_counts_xla(low.reshape(6, 32, 40), hw, jnp.asarray([1.0, -1.0]),
                                (128, 160)).reshape(3, 2, 2)
  np.testing.assert_array_equal(np.asarray(hi), np.asarray(xla[..., 0]))
  np.testing.assert_array_equal(np.asarray(lo), np.asarray(xla[..., 1]))
  up = np.asarray(jax.image.resize(low, (3, 2, 128, 160), "linear", antialias=False))
  up = up[..., :120, :150]
  assert np.abs(np.asarray(hi) - (up > 1).sum((-1, -2))).max() <= 2
  assert np.abs(np.asarray(lo) - (up > -1).sum((-1, -2))).max() <= 2


@pytest.mark.parametrize("shape,padded", [((2, 16, 24), (64, 96)), ((3, 5, 7), (15, 21)),
                                          ((1, 6, 6), (20, 21))])
def test_upsample_bilinear_matches_jax_image_resize(shape, padded):
  """The phase formulation (integer factors) and the fallback (others)."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  ref = jax.image.resize(x, shape[:1] + padded, "linear", antialias=False)
  got = am.upsample_bilinear(x, padded)
  assert got.shape == ref.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- Swin window attention

@pytest.mark.parametrize("b,w,n,c,h,masked", [
    (1, 5, 49, 96, 3, False), (1, 5, 49, 96, 3, True),     # SwinT windows (7x7), D = 32
    (2, 3, 144, 192, 6, True),                             # SwinL windows (12x12)
    (1, 4, 9, 20, 2, True),                                # generic paths: N = 9, D = 10
    (1, 2, 25, 48, 1, False),                              # D = 48 (three vectors)
])
def test_window_attention_kernel_matches_xla(b, w, n, c, h, masked):
  """Forward against the XLA formulation (an independent softmax attention),
  and the gradients (which differentiate the XLA formulation by design)."""
  if not native.available():
    pytest.skip(native.unavailable_reason())
  from semsam_jax.kernels import window_attention as wa
  rng = np.random.default_rng(n + c)
  qkv = jnp.asarray(rng.normal(size=(b, w, n, 3 * c)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(h, n, n)), jnp.float32)
  mask = (jnp.asarray(np.where(rng.uniform(size=(w, n, n)) < 0.3, -100.0, 0.0), jnp.float32)
          if masked else None)
  scale = (c // h) ** -0.5
  cot = jnp.asarray(rng.normal(size=(b, w, n, c)), jnp.float32)

  def numpy_ref():
    x = np.asarray(qkv, np.float64).reshape(b, w, n, 3, h, c // h)
    q, k, v = x[..., 0, :, :] * scale, x[..., 1, :, :], x[..., 2, :, :]
    s = np.einsum("bwqhd,bwkhd->bwhqk", q, k) + np.asarray(bias)[None, None]
    if masked:
      s = s + np.asarray(mask)[None, :, None]
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bwhqk,bwkhd->bwqhd", p, v).reshape(b, w, n, c)

  got = jax.jit(lambda q, bb, m: wa.window_attention(q, bb, m, h, scale))(qkv, bias, mask)
  want = numpy_ref()
  assert np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want) < 1e-6
  with jax.default_matmul_precision("highest"):
    g_native = jax.grad(lambda q, bb: jnp.sum(wa.window_attention(q, bb, mask, h, scale) * cot),
                        argnums=(0, 1))(qkv, bias)
    g_xla = jax.grad(lambda q, bb: jnp.sum(wa.reference(q, bb, mask, h, scale) * cot),
                     argnums=(0, 1))(qkv, bias)
  for a, e in zip(g_native, g_xla):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-6)


def test_swin_block_native_and_xla_attention_agree():
  """A shifted, padded Swin block (window 7 on a 17x19 map) with the kernel
  and with the XLA attention: same output and same parameter gradients."""
  if not native.available():
    pytest.skip(native.unavailable_reason())
  from semsam_jax.models import swin
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 17, 19, 32)), jnp.float32)
  outs, grads = {}, {}
  for impl in ("xla", "cpu_native"):
    blk = swin.SwinTransformerBlock(dim=32, num_heads=2, window_size=7, shift_size=3,
                                    attention_impl=impl)
    params = swin.SwinTransformerBlock(dim=32, num_heads=2, window_size=7, shift_size=3).init(
        jax.random.PRNGKey(0), x)
    with jax.default_matmul_precision("highest"):
      outs[impl] = blk.apply(params, x)
      grads[impl] = jax.grad(lambda p: jnp.sum(blk.apply(p, x) ** 2))(params)
  np.testing.assert_allclose(np.asarray(outs["cpu_native"]), np.asarray(outs["xla"]),
                             rtol=1e-5, atol=1e-5)
  for a, e in zip(jax.tree.leaves(grads["cpu_native"]), jax.tree.leaves(grads["xla"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5)
