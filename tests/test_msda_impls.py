"""The alternative deformable attention cores ("patch", "fused", "cpu_native"):
agreement with the reference "gather" implementation (output and all three
gradients) on hard inputs (outside the map, exactly on borders and pixel
centres, several batches/levels, block padding of the fused backward loop,
every channel-count path and several threads of the native kernel), dtypes,
jit/grad/vmap, non-finite locations.  Golden parity of every implementation
is in test_deformable_attention.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax.models import deformable_attention as da
from semsam_jax.models import msda_impls
from tests import golden

TOL = 1e-5
IMPLS = sorted(set(da.MSDA_IMPLS) - {"gather"})


def _vjp_all(fn, shapes, value, loc, aw, cot):
  """Output and the three input gradients of ``fn`` (jitted) for ``cot``."""
  def core(v, l, a):
    return fn(v, shapes, l, a)

  out, vjp = jax.vjp(jax.jit(core), value, loc, aw)
  return (out, *vjp(jnp.asarray(cot)))


def _hard_inputs(shapes, b=2, lq=23, m=3, d=5, p=3, seed=0):
  """Random inputs whose locations include points outside [0, 1], exactly on
  the map border, on pixel edges and on pixel centres (fractional offset 0)."""
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  n_lvl = len(shapes)
  value = rng.normal(size=(b, s, m, d)).astype(np.float32)
  loc = rng.uniform(-0.3, 1.3, size=(b, lq, m, n_lvl, p, 2))
  special = []
  for h, w in shapes:
    edges_x = np.arange(w + 1) / w                     # pixel edges incl. 0 and 1
    centres_x = (np.arange(w) + 0.5) / w               # integer pixel coordinates
    edges_y = np.arange(h + 1) / h
    centres_y = (np.arange(h) + 0.5) / h
    special.append((np.concatenate([edges_x, centres_x, [-0.5 / w, 1 + 0.5 / w, -2.0, 3.0]]),
                    np.concatenate([edges_y, centres_y, [-0.5 / h, 1 + 0.5 / h, 2.5, -1.0]])))
  # Overwrite about half of the samples with special coordinates (per level).
  mask = rng.uniform(size=loc.shape[:-1]) < 0.5
  for lvl, (sx, sy) in enumerate(special):
    pick_x = rng.choice(sx, size=loc.shape[:3] + (p,))
    pick_y = rng.choice(sy, size=loc.shape[:3] + (p,))
    lvl_mask = mask[:, :, :, lvl]
    loc[:, :, :, lvl, :, 0] = np.where(lvl_mask, pick_x, loc[:, :, :, lvl, :, 0])
    loc[:, :, :, lvl, :, 1] = np.where(lvl_mask, pick_y, loc[:, :, :, lvl, :, 1])
  aw = rng.uniform(size=(b, lq, m, n_lvl, p)).astype(np.float32)
  cot = rng.normal(size=(b, lq, m * d)).astype(np.float32)
  return value, loc.astype(np.float32), aw, cot


SHAPE_SETS = {
    "4levels": ((6, 7), (3, 4), (2, 2), (1, 3)),
    "1level": ((5, 8),),
    "thin": ((1, 9), (7, 1)),
}


def _assert_agree(impl, shapes, inputs):
  with jax.default_matmul_precision("highest"):
    ref = _vjp_all(da.MSDA_IMPLS["gather"], shapes, *inputs)
    got = _vjp_all(da.MSDA_IMPLS[impl], shapes, *inputs)
  names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
  for name, r, g_ in zip(names, ref, got):
    assert g_.shape == r.shape and g_.dtype == r.dtype, (name, g_.shape, g_.dtype)
    assert golden.rel_l2(g_, r) <= TOL, (name, golden.rel_l2(g_, r))
    np.testing.assert_allclose(np.asarray(g_), np.asarray(r), rtol=1e-4, atol=1e-5,
                               err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_set", sorted(SHAPE_SETS))
def test_agrees_with_gather_on_hard_locations(impl, shape_set):
  shapes = SHAPE_SETS[shape_set]
  _assert_agree(impl, shapes, _hard_inputs(shapes, seed=len(shape_set)))


def test_fused_backward_blocks_with_padding(monkeypatch):
  """Several backward blocks with a padded last block (B * Lq = 2 * 23 = 46
  queries in blocks of 4) give the same gradients."""
  impl = "fused"
  shapes = SHAPE_SETS["4levels"]
  k_all = len(shapes) * 3 * 4
  monkeypatch.setattr(msda_impls, "_CPU_ROWS_PER_STEP", 4 * 3 * k_all)
  monkeypatch.setattr(msda_impls, "_ACCEL_ROWS_PER_STEP", 4 * 3 * k_all)
  _assert_agree(impl, shapes, _hard_inputs(shapes, seed=7))


@pytest.mark.parametrize("impl", IMPLS)
def test_single_query_and_exact_corners(impl):
  """One query whose samples sit exactly on the four map corners, the centre
  and just outside each side; weights of the outside corners are zero."""
  shapes = ((4, 6),)
  pts = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5],
                  [-1 / 12, 0.5], [1 + 1 / 12, 0.5], [0.5, -1 / 8], [0.5, 1 + 1 / 8]],
                 np.float32)
  rng = np.random.default_rng(3)
  value = rng.normal(size=(1, 24, 1, 4)).astype(np.float32)
  loc = pts.reshape(1, 1, 1, 1, -1, 2)
  aw = rng.uniform(size=(1, 1, 1, 1, len(pts))).astype(np.float32)
  cot = rng.normal(size=(1, 1, 4)).astype(np.float32)
  _assert_agree(impl, shapes, (value, loc, aw, cot))
  # Samples half a pixel outside read zeros: with only them weighted, the output is 0.
  aw_out = np.zeros_like(aw)
  aw_out[..., 5:] = 1.0
  out = da.MSDA_IMPLS[impl](jnp.asarray(value), shapes, jnp.asarray(loc),
                            jnp.asarray(aw_out))
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_grad_vmap_and_dtypes(impl):
  fn = da.MSDA_IMPLS[impl]
  shapes = SHAPE_SETS["4levels"]
  value, loc, aw, cot = _hard_inputs(shapes, b=1, lq=5, seed=11)

  # jit with static shapes, and inside a jitted gradient of a scalar loss.
  jitted = jax.jit(fn, static_argnums=1)
  out = jitted(value, shapes, loc, aw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fn(value, shapes, loc, aw)),
                             rtol=1e-6, atol=1e-6)
  loss = lambda v, l, a: jnp.sum(fn(v, shapes, l, a) * cot)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, loc, aw)
  assert [g.shape for g in grads] == [value.shape, loc.shape, aw.shape]
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)

  # vmap over an extra leading axis == per-item calls.
  stacked = [np.stack([x, x * 0.5]) for x in (value, loc, aw)]
  vout = jax.vmap(lambda v, l, a: fn(v, shapes, l, a))(*stacked)
  np.testing.assert_allclose(np.asarray(vout[1]),
                             np.asarray(fn(stacked[0][1], shapes, stacked[1][1], stacked[2][1])),
                             rtol=1e-5, atol=1e-6)

  # bfloat16 values: bfloat16 output (float32 accumulation) and gradient dtypes
  # follow the inputs.
  v16 = jnp.asarray(value, jnp.bfloat16)
  out16, vjp = jax.vjp(lambda v, l, a: fn(v, shapes, l, a), v16, jnp.asarray(loc),
                       jnp.asarray(aw))
  assert out16.dtype == jnp.bfloat16
  ref = fn(v16.astype(jnp.float32), shapes, loc, aw)
  assert golden.rel_l2(out16.astype(jnp.float32), ref) < 1e-2
  g_v, g_l, g_a = vjp(jnp.asarray(cot, jnp.bfloat16))
  assert (g_v.dtype, g_l.dtype, g_a.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_locations_are_safe(impl):
  """NaN / huge locations contribute nothing (and never index out of range)."""
  fn = da.MSDA_IMPLS[impl]
  shapes = ((3, 4), (2, 2))
  value, loc, aw, _ = _hard_inputs(shapes, b=1, lq=4, m=1, seed=5)
  bad = loc.copy()
  bad[0, 0, 0, :, :, :] = np.nan
  bad[0, 1, 0, :, :, 0] = 1e30
  bad[0, 2, 0, :, :, 1] = -1e30
  out = np.asarray(fn(value, shapes, bad, aw))
  np.testing.assert_array_equal(out[0, :3], 0.0)
  np.testing.assert_allclose(out[0, 3], np.asarray(fn(value, shapes, loc, aw))[0, 3],
                             rtol=1e-6)


def test_registry_and_benchmark_list_every_impl():
  from benchmarks import msda as bench
  assert {"gather", "patch", "fused", "cpu_native"} <= set(da.MSDA_IMPLS)
  assert set(da.MSDA_IMPLS) <= set(bench.all_impls())
  assert da.IMPL_CHOICES[0] == "auto" and set(da.IMPL_CHOICES[1:]) == set(da.MSDA_IMPLS)
  with pytest.raises(ValueError, match="unknown ms_deform_attn implementation 'nope'"):
    da.resolve_impl("nope")
  assert da.resolve_impl("auto", backend="gpu") == "gather"
  assert da.resolve_impl("patch") == "patch"


# ---------------------------------------------------------------- native kernel

@pytest.mark.parametrize("d", [32, 16, 48, 5])
def test_native_channel_paths_and_threads(d):
  """The vector paths (16 and 32 channels) and the generic one (48, 5), with
  enough queries for many parallel chunks (B * Lq = 2 * 300)."""
  shapes = ((9, 13), (5, 7), (3, 3))
  inputs = _hard_inputs(shapes, b=2, lq=300, m=3, d=d, p=2, seed=d)
  _assert_agree("cpu_native", shapes, inputs)
