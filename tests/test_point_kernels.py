"""The objective's point reads: native kernels (semsam_jax/kernels/point_sample_cpu.cc)
against the XLA formulations of semsam_jax/losses/points.py and independent numpy
computations; the hashed uncertainty sampler against lax.top_k on the same candidates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax.kernels import native
from semsam_jax.losses import points as pts

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def _grid_sample_numpy(m, x, y):
  """torch grid_sample(align_corners=False, zeros) of one (h, w) map at (x, y) in [0, 1]."""
  h, w = m.shape
  fx, fy = x * w - 0.5, y * h - 0.5
  x0, y0 = int(np.floor(fx)), int(np.floor(fy))
  out = 0.0
  for yy, xx, wt in ((y0, x0, (x0 + 1 - fx) * (y0 + 1 - fy)), (y0, x0 + 1, (fx - x0) * (y0 + 1 - fy)),
                     (y0 + 1, x0, (x0 + 1 - fx) * (fy - y0)), (y0 + 1, x0 + 1, (fx - x0) * (fy - y0))):
    if 0 <= yy < h and 0 <= xx < w:
      out += m[yy, xx] * wt
  return out


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(7)
  b, r, h, w, n, p = 2, 10, 12, 15, 6, 33
  return dict(
      maps=rng.standard_normal((b, r, h, w)).astype(np.float32),
      index=rng.integers(0, r, (b, 2, 3)).astype(np.int32),
      coords=rng.uniform(-0.1, 1.1, (b, 2, 3, p, 2)).astype(np.float32),
      cot=rng.standard_normal((b, 2, 3, p)).astype(np.float32),
      masks=rng.uniform(size=(b, 4, 20, 24)) < 0.4,
      seeds=rng.integers(0, 2**32, (b, 2, 3), dtype=np.uint64).astype(np.uint32))


@pytest.mark.parametrize("shared", [False, True], ids=["per_group", "shared"])
def test_map_reads_equal_xla_and_numpy(data, shared):
  coords = data["coords"][:, :1, :1] if shared else data["coords"]
  got = np.asarray(jax.jit(lambda m: pts.sample_maps(m, data["index"], coords,
                                                     impl="native"))(data["maps"]))
  want = np.asarray(pts.sample_maps(data["maps"], data["index"], coords, impl="xla"))
  np.testing.assert_array_equal(got, want)
  full = np.broadcast_to(coords, data["index"].shape + coords.shape[-2:])
  for bi, g0, g1, q in [(0, 0, 0, 0), (1, 1, 2, 5), (0, 1, 1, 32), (1, 0, 2, 17)]:
    m = data["maps"][bi, data["index"][bi, g0, g1]]
    x, y = full[bi, g0, g1, q]
    assert abs(got[bi, g0, g1, q] - _grid_sample_numpy(m.astype(np.float64), x, y)) < 1e-5


def test_map_read_gradient_is_the_scatter_of_the_cotangent(data):
  def f(impl):
    return jax.grad(lambda m: jnp.sum(pts.sample_maps(m, data["index"], data["coords"],
                                                      impl=impl) * data["cot"]))(data["maps"])
  got = np.asarray(jax.jit(lambda: f("native"))())
  np.testing.assert_allclose(got, np.asarray(f("xla")), rtol=1e-5, atol=1e-6)
  # Maps no group reads get exactly zero.
  unread = np.ones(data["maps"].shape[:2], bool)
  for bi in range(2):
    unread[bi, np.unique(data["index"][bi])] = False
  assert unread.any() and np.all(got[unread] == 0)


def test_packed_mask_reads_equal_xla_and_numpy(data):
  packed = np.packbits(data["masks"], axis=-1, bitorder="little")
  idx = data["index"] % 4
  got = np.asarray(pts.sample_packed_masks(packed, idx, data["coords"], impl="native"))
  np.testing.assert_array_equal(got, pts.sample_packed_masks(packed, idx, data["coords"],
                                                             impl="xla"))
  bi, g0, g1, q = 1, 0, 2, 9
  x, y = data["coords"][bi, g0, g1, q]
  want = _grid_sample_numpy(data["masks"][bi, idx[bi, g0, g1]].astype(np.float64), x, y)
  assert abs(got[bi, g0, g1, q] - want) < 1e-6


@pytest.mark.parametrize("quantised", [False, True], ids=["distinct", "many_ties"])
@pytest.mark.parametrize("ratio", [0.0, 0.75, 1.0])
def test_hashed_uncertain_points(data, quantised, ratio):
  """Kernel == XLA path bit for bit, and the chosen set is lax.top_k's on the
  same candidates (ties: lower index), in candidate order, then the extras."""
  maps = np.round(data["maps"] * 2) / 2 if quantised else data["maps"]
  num_points, over = 40, 3.0
  got = np.asarray(pts.hashed_uncertain_coords(maps, data["index"], data["seeds"], num_points,
                                               over, ratio, impl="native"))
  xla = np.asarray(pts.hashed_uncertain_coords(maps, data["index"], data["seeds"], num_points,
                                               over, ratio, impl="xla"))
  np.testing.assert_array_equal(got, xla)
  cand, extra = (np.asarray(a) for a in pts.hashed_point_candidates(data["seeds"], num_points,
                                                                    over, ratio))
  k = pts.num_importance_points(num_points, ratio)
  assert got.shape == data["index"].shape + (num_points, 2)
  np.testing.assert_array_equal(got[..., k:, :], extra)
  logits = np.asarray(pts.sample_maps(maps, data["index"], cand, impl="xla"))
  for pos in np.ndindex(*data["index"].shape):
    order = sorted(range(cand.shape[-2]), key=lambda i: (abs(float(logits[pos][i])), i))[:k]
    np.testing.assert_array_equal(got[pos][:k], cand[pos][sorted(order)])


def test_hash_stream_is_uniform_and_seed_dependent():
  seeds = np.arange(64, dtype=np.uint32)
  u = np.asarray(pts.hash_uniform(seeds, 0, 2000))
  assert u.shape == (64, 2000, 2) and u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
  hist = np.histogram(u, bins=16, range=(0, 1))[0] / u.size
  assert np.abs(hist - 1 / 16).max() < 0.003
  assert abs(np.corrcoef(u[..., 0].ravel(), u[..., 1].ravel())[0, 1]) < 0.01
  assert abs(np.corrcoef(u[:-1, :, 0].ravel(), u[1:, :, 0].ravel())[0, 1]) < 0.01
  # A stream is a pure function of (seed, position): an offset start continues it.
  np.testing.assert_array_equal(np.asarray(pts.hash_uniform(seeds, 1500, 500)), u[:, 1500:])


def test_kernel_under_batch_sharding_equals_one_device(data):
  """Batch-partitioned on several devices (when there are some), same values."""
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("one device")
  mesh = jax.sharding.Mesh(np.asarray(devices[:2]), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  f = jax.jit(lambda m, i, s: pts.hashed_uncertain_coords(m, i, s, 40, 3.0, 0.75,
                                                          impl="native"))
  args = [jax.device_put(jnp.asarray(a), spec) for a in (data["maps"], data["index"],
                                                          data["seeds"])]
  np.testing.assert_array_equal(np.asarray(f(*args)),
                                np.asarray(f(data["maps"], data["index"], data["seeds"])))
