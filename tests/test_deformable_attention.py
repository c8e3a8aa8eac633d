"""Multi-scale deformable attention: golden core (output + gradients), an
independent numpy bilinear check, and the MSDeformAttn module's wiring."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax.models import deformable_attention as da
from tests import golden

TOL = 1e-5

MSDA_FILES = golden.cases_or_missing("msda_*.npz")
MSDA_IDS = golden.param_ids([f for f in MSDA_FILES if f]) or ["missing"]


IMPLS = sorted(da.MSDA_IMPLS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", MSDA_FILES, ids=MSDA_IDS)
def test_msda_core_matches_golden(path, impl):
  z = golden.load_npz(path)
  shapes = tuple((int(h), int(w)) for h, w in z["spatial_shapes"])
  np.testing.assert_array_equal(z["level_start_index"], da.level_start_index(shapes))

  def fn(v, s, a):
    return da.ms_deform_attn(v, shapes, s, a, impl=impl)

  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(jax.jit(fn), z["value"], z["sampling_locations"],
                       z["attention_weights"])
    g_value, g_loc, g_aw = vjp(jnp.asarray(z["cotangent"]))
  errs = {
      "output": golden.rel_l2(out, z["output"]),
      "grad_value": golden.rel_l2(g_value, z["grad_value"]),
      "grad_sampling_locations": golden.rel_l2(g_loc, z["grad_sampling_locations"]),
      "grad_attention_weights": golden.rel_l2(g_aw, z["grad_attention_weights"]),
  }
  assert all(e <= TOL for e in errs.values()), errs


def _numpy_grid_sample(img: np.ndarray, loc: np.ndarray) -> np.ndarray:
  """img (H, W, D); loc (N, 2) normalised x, y -> (N, D); zero padding,
  align_corners=False, written out corner by corner in float64."""
  h, w, d = img.shape
  out = np.zeros((loc.shape[0], d))
  for n, (lx, ly) in enumerate(loc.astype(np.float64)):
    x, y = lx * w - 0.5, ly * h - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    for xi in (x0, x0 + 1):
      for yi in (y0, y0 + 1):
        if 0 <= xi < w and 0 <= yi < h:
          out[n] += (1 - abs(x - xi)) * (1 - abs(y - yi)) * img[yi, xi]
  return out


@pytest.mark.parametrize("impl", IMPLS)
def test_single_level_matches_numpy_bilinear_with_borders(impl):
  rng = np.random.default_rng(0)
  h, w, d = 5, 7, 3
  img = rng.normal(size=(h, w, d)).astype(np.float32)
  # Points at pixel centres, exactly on the map border (0, 1), half a pixel
  # beyond it, far outside, and random ones (some outside).
  special = np.array([
      [0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5],
      [0.5 / w, 0.5 / h], [1 - 0.5 / w, 1 - 0.5 / h],     # first / last pixel centre
      [-0.5 / w, 0.3], [1 + 0.5 / w, 0.3],                 # fully outside by half a pixel
      [0.3, -0.5 / h], [0.3, 1 + 0.5 / h],
      [-0.25 / w, 0.6], [1 + 0.25 / w, 0.6],               # partly outside
      [-3.0, 2.0], [2.0, 0.5],
  ], np.float32)
  rand = rng.uniform(-0.2, 1.2, size=(20, 2)).astype(np.float32)
  loc = np.concatenate([special, rand])
  n = loc.shape[0]
  value = img.reshape(1, h * w, 1, d)
  sampling = loc.reshape(1, n, 1, 1, 1, 2)
  weights = np.ones((1, n, 1, 1, 1), np.float32)
  with jax.default_matmul_precision("highest"):
    out = da.ms_deform_attn(value, ((h, w),), sampling, weights, impl=impl)
  expected = _numpy_grid_sample(img, loc)
  np.testing.assert_allclose(np.asarray(out)[0], expected, rtol=1e-5, atol=1e-6)
  # Fully-outside points read exactly zero.
  np.testing.assert_array_equal(np.asarray(out)[0, 7:11], 0.0)
  np.testing.assert_array_equal(np.asarray(out)[0, 13:15], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_level_heads_points_weighting(impl):
  """Output = sum over levels/points of weight * per-level bilinear sample,
  channels head-major."""
  rng = np.random.default_rng(1)
  shapes = ((4, 6), (2, 3))
  b, lq, m, dh, p = 2, 5, 2, 3, 3
  s = sum(h * w for h, w in shapes)
  value = rng.normal(size=(b, s, m, dh)).astype(np.float32)
  loc = rng.uniform(-0.1, 1.1, size=(b, lq, m, len(shapes), p, 2)).astype(np.float32)
  aw = rng.uniform(size=(b, lq, m, len(shapes), p)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    out = np.asarray(da.ms_deform_attn(value, shapes, loc, aw, impl=impl))
  expected = np.zeros((b, lq, m, dh))
  starts = da.level_start_index(shapes)
  for bi in range(b):
    for mi in range(m):
      for li, (h, w) in enumerate(shapes):
        img = value[bi, starts[li]:starts[li] + h * w, mi].reshape(h, w, dh)
        for pi in range(p):
          smp = _numpy_grid_sample(img, loc[bi, :, mi, li, pi])
          expected[bi, :, mi] += aw[bi, :, mi, li, pi, None] * smp
  np.testing.assert_allclose(out, expected.reshape(b, lq, m * dh), rtol=1e-5, atol=1e-6)


def test_unknown_impl_and_bad_shapes():
  value = jnp.zeros((1, 4, 1, 2))
  loc = jnp.zeros((1, 3, 1, 1, 2, 2))
  aw = jnp.zeros((1, 3, 1, 1, 2))
  with pytest.raises(ValueError, match="gather"):
    da.ms_deform_attn(value, ((2, 2),), loc, aw, impl="nope")
  with pytest.raises(ValueError, match="positions"):
    da.ms_deform_attn(value, ((3, 2),), loc, aw)


def nn_unbox(tree):
  return nn.meta.unbox(tree)


def _init_module(mod, lq=6, shapes=((4, 5), (2, 3)), ref_dim=2, seed=0):
  c = mod.d_model
  s = sum(h * w for h, w in shapes)
  q = jnp.zeros((1, lq, c))
  ref = jnp.full((1, lq, len(shapes), ref_dim), 0.5)
  mem = jnp.zeros((1, s, c))
  init = jax.jit(lambda k: mod.init(k, q, ref, mem, shapes))
  return init(jax.random.PRNGKey(seed))["params"]


def test_module_init_matches_reference_scheme():
  mod = da.MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
  params = jax.tree_util.tree_map(np.asarray, nn_unbox(_init_module(mod)))
  assert sorted(params) == ["attention_weights", "output_proj", "sampling_offsets", "value_proj"]
  assert params["sampling_offsets"]["kernel"].shape == (16, 4 * 2 * 3 * 2)
  np.testing.assert_array_equal(params["sampling_offsets"]["kernel"], 0)
  np.testing.assert_array_equal(params["attention_weights"]["kernel"], 0)
  np.testing.assert_array_equal(params["attention_weights"]["bias"], 0)
  bias = params["sampling_offsets"]["bias"].reshape(4, 2, 3, 2)
  # Head directions 0, 90, 180, 270 degrees, normalised to max |.| = 1,
  # point p at distance p + 1, identical on every level.
  dirs = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
  expected = dirs[:, None, None, :] * np.arange(1, 4)[None, None, :, None]
  np.testing.assert_allclose(bias, np.broadcast_to(expected, bias.shape), atol=1e-6)
  limit = math.sqrt(6 / (16 + 16))
  for name in ("value_proj", "output_proj"):
    assert np.abs(params[name]["kernel"]).max() <= limit
    np.testing.assert_array_equal(params[name]["bias"], 0)


def _random_params(params, seed):
  leaves, treedef = jax.tree_util.tree_flatten(nn_unbox(params))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_locations_and_halves(ref_dim, impl):
  """The module computes locations as the reference does (with "cpu_native"
  inside the kernel); project_value + attend equals __call__; padded
  positions read zero values."""
  shapes = ((4, 5), (2, 3))
  c, m, l, p, lq = 16, 4, 2, 3, 6
  s = sum(h * w for h, w in shapes)
  mod = da.MSDeformAttn(d_model=c, n_levels=l, n_heads=m, n_points=p, impl=impl)
  params = _random_params(_init_module(mod, lq, shapes, ref_dim), 3)
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, lq, c)).astype(np.float32)
  mem = rng.normal(size=(2, s, c)).astype(np.float32)
  ref = rng.uniform(0.1, 0.9, size=(2, lq, l, ref_dim)).astype(np.float32)
  pad = rng.uniform(size=(2, s)) < 0.3

  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda prm: mod.apply({"params": prm}, q, ref, mem, shapes, pad))(params)
    value = jax.jit(lambda prm: mod.apply({"params": prm}, mem, pad,
                                          method=da.MSDeformAttn.project_value))(params)
    out2 = jax.jit(lambda prm, v: mod.apply({"params": prm}, q, ref, v, shapes,
                                            method=da.MSDeformAttn.attend))(params, value)

    pn = jax.tree_util.tree_map(np.asarray, params)
    lin = lambda x, n: x @ pn[n]["kernel"] + pn[n]["bias"]
    v = np.where(pad[..., None], 0.0, lin(mem, "value_proj")).reshape(2, s, m, c // m)
    off = lin(q, "sampling_offsets").reshape(2, lq, m, l, p, 2)
    logits = lin(q, "attention_weights").reshape(2, lq, m, l * p)
    aw = np.exp(logits - logits.max(-1, keepdims=True))
    aw = (aw / aw.sum(-1, keepdims=True)).reshape(2, lq, m, l, p)
    if ref_dim == 2:
      wh = np.array([[w, h] for h, w in shapes], np.float32)
      loc = ref[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
    else:
      loc = ref[:, :, None, :, None, :2] + off / p * ref[:, :, None, :, None, 2:] * 0.5
    core = jax.jit(da.ms_deform_attn, static_argnums=1)(v.astype(np.float32), shapes, loc.astype(np.float32),
                             aw.astype(np.float32))
    expected = np.asarray(core) @ pn["output_proj"]["kernel"] + pn["output_proj"]["bias"]
  assert golden.rel_l2(out, expected) <= TOL
  assert golden.rel_l2(out2, out) <= 1e-7
  np.testing.assert_array_equal(np.asarray(value)[pad], 0.0)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_gradients_agree_across_impls(ref_dim):
  """Gradients of a loss through the whole module (parameters, queries,
  reference points, memory) are the same with every implementation; for
  "cpu_native" the forward forms locations and softmax inside the kernel."""
  shapes = ((5, 6), (3, 2))
  c, m, l, p, lq = 16, 4, 2, 3, 7
  s = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(2, lq, c)), jnp.float32)
  mem = jnp.asarray(rng.normal(size=(2, s, c)), jnp.float32)
  ref = jnp.asarray(rng.uniform(0.05, 0.95, size=(2, lq, l, ref_dim)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, lq, c)), jnp.float32)
  base = da.MSDeformAttn(d_model=c, n_levels=l, n_heads=m, n_points=p, impl="gather")
  params = _random_params(_init_module(base, lq, shapes, ref_dim), 7)
  results = {}
  with jax.default_matmul_precision("highest"):
    for impl in IMPLS:
      mod = da.MSDeformAttn(d_model=c, n_levels=l, n_heads=m, n_points=p, impl=impl)
      loss = lambda prm, q, r, mm: jnp.sum(mod.apply({"params": prm}, q, r, mm, shapes) * cot)
      results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(params, q, ref, mem)
  want = jax.tree.leaves(results["gather"])
  for impl in IMPLS:
    for got, exp in zip(jax.tree.leaves(results[impl]), want):
      assert golden.rel_l2(got, exp) <= 1e-5, impl


def test_jit_with_static_shapes():
  mod = da.MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2)
  shapes = ((3, 3),)
  params = _init_module(mod, 4, shapes)
  f = jax.jit(lambda prm, q, r, x: mod.apply({"params": prm}, q, r, x, shapes))
  out = f(params, jnp.ones((1, 4, 8)), jnp.full((1, 4, 1, 2), 0.5), jnp.ones((1, 9, 8)))
  assert out.shape == (1, 4, 8) and bool(jnp.all(jnp.isfinite(out)))


def test_implementations_agree_with_gradients():
  """Every implementation equals "gather" in value and all three gradients on
  random data with samples inside, on and beyond the borders."""
  rng = np.random.default_rng(5)
  shapes = ((6, 9), (3, 5), (2, 2))
  b, lq, m, dh, p = 2, 11, 3, 4, 2
  s = sum(h * w for h, w in shapes)
  args = (rng.normal(size=(b, s, m, dh)).astype(np.float32),
          rng.uniform(-0.3, 1.3, size=(b, lq, m, len(shapes), p, 2)).astype(np.float32),
          rng.uniform(size=(b, lq, m, len(shapes), p)).astype(np.float32))
  cot = rng.normal(size=(b, lq, m * dh)).astype(np.float32)
  results = {}
  with jax.default_matmul_precision("highest"):
    for impl in IMPLS:
      out, vjp = jax.vjp(lambda v, l, a: da.ms_deform_attn(v, shapes, l, a, impl=impl), *args)
      results[impl] = (out,) + vjp(jnp.asarray(cot))
  for impl in IMPLS:
    for got, want in zip(results[impl], results["gather"]):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
