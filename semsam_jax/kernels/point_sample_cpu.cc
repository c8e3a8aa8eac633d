// Point reads of the training objective as XLA:CPU typed-FFI custom calls.
//
// XLA:CPU runs gathers and scatters element by element with index
// arithmetic in between, which made the PointRend-style point sampling of the
// mask losses most of a SwinT training step.  Four kernels:
//
//   SemsamPointSample      maps (B, R, h, w) f32, map_index (B, N) s32,
//                          coords (B, N | 1, P, 2) f32  ->  (B, N, P) f32
//   SemsamPointSampleGrad  cotangent (B, N, P), map_index, coords
//                          ->  d maps (B, R, h, w)
//   SemsamPackedSample     masks (B, M, H, W/8) u8 (bit x % 8 of byte x / 8),
//                          mask_index (B, N), coords  ->  (B, N, P) f32
//   SemsamUncertainPoints  maps, map_index, seeds (B, N) u32
//                          ->  coords (B, N, K + E, 2): of C hashed uniform
//                          candidates the K with the smallest |logit| (ties:
//                          lower candidate index first), in candidate order,
//                          then E more hashed uniform points.
//
// Group n of image b reads map map_index[b, n] (clamped to [0, R)) at its own
// P points, or at points shared by every group when coords has one group.
//
// The bilinear read is grid_sample(align_corners=False, zero padding) on
// 2 * coord - 1 and repeats the arithmetic of semsam_jax/losses/points.py op
// for op (same operation order, no contraction into FMAs: the library is
// built with -ffp-contract=off), so forward values are bit-identical to the
// XLA formulation.  The hash stream is points.hash_uniform's.  The gradient
// accumulates every map's contributions in group order, then point order, so
// it does not depend on the thread count.
//
// Work runs on XLA's intra-op thread pool (kernel_common.h): groups are
// split between threads (forward), maps are (gradient).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_common.h"

namespace {

namespace ffi = xla::ffi;
using semsam_kernels::ParallelFor;

// The four bilinear taps (nw, ne, sw, se) of points._corners for up to kBlock
// points at once, in structure-of-arrays form so that the geometry vectorises.
constexpr int kBlock = 64;

struct BlockTaps {
  int32_t off[4][kBlock];
  int32_t x[4][kBlock];
  float w[4][kBlock];
  int32_t in[4][kBlock];
};

SEMSAM_INLINE void BlockCorners(const float* cx, const float* cy, int n, int64_t h, int64_t w,
                                int64_t row, BlockTaps* t) {
  const float fw = static_cast<float>(w), fh = static_cast<float>(h);
  const float wm = static_cast<float>(w - 1), hm = static_cast<float>(h - 1);
  const int32_t irow = static_cast<int32_t>(row);
  for (int j = 0; j < n; ++j) {
    const float gx = 2.0f * cx[j] - 1.0f;
    const float gy = 2.0f * cy[j] - 1.0f;
    const float ix = ((gx + 1.0f) / 2.0f) * fw - 0.5f;
    const float iy = ((gy + 1.0f) / 2.0f) * fh - 0.5f;
    const float ix_w = std::floor(ix);
    const float iy_n = std::floor(iy);
    const float ix_e = ix_w + 1.0f;
    const float iy_s = iy_n + 1.0f;
    t->w[0][j] = (ix_e - ix) * (iy_s - iy);
    t->w[1][j] = (ix - ix_w) * (iy_s - iy);
    t->w[2][j] = (ix_e - ix) * (iy - iy_n);
    t->w[3][j] = (ix - ix_w) * (iy - iy_n);
    const bool in_w = ix_w >= 0.0f && ix_w <= wm, in_e = ix_e >= 0.0f && ix_e <= wm;
    const bool in_n = iy_n >= 0.0f && iy_n <= hm, in_s = iy_s >= 0.0f && iy_s <= hm;
    t->in[0][j] = in_w && in_n;
    t->in[1][j] = in_e && in_n;
    t->in[2][j] = in_w && in_s;
    t->in[3][j] = in_e && in_s;
    const int32_t xw = static_cast<int32_t>(std::min(std::max(ix_w, 0.0f), wm));
    const int32_t xe = static_cast<int32_t>(std::min(std::max(ix_e, 0.0f), wm));
    const int32_t yn = static_cast<int32_t>(std::min(std::max(iy_n, 0.0f), hm));
    const int32_t ys = static_cast<int32_t>(std::min(std::max(iy_s, 0.0f), hm));
    t->x[0][j] = xw;
    t->x[1][j] = xe;
    t->x[2][j] = xw;
    t->x[3][j] = xe;
    t->off[0][j] = yn * irow + xw;
    t->off[1][j] = yn * irow + xe;
    t->off[2][j] = ys * irow + xw;
    t->off[3][j] = ys * irow + xe;
  }
}

// (x, y) of points q0 .. q0 + n - 1 of interleaved coords into cx, cy.
SEMSAM_INLINE void LoadBlock(const float* pc, int64_t q0, int n, float* cx, float* cy) {
  for (int j = 0; j < n; ++j) {
    cx[j] = pc[2 * (q0 + j)];
    cy[j] = pc[2 * (q0 + j) + 1];
  }
}

// out[j] = the packed-mask read for the block's taps, computed with a row
// stride of W/8 bytes (offset y * W/8 + x): the tap's byte is y * W/8 + x / 8,
// its bit x % 8.
SEMSAM_INLINE void BlockReadPacked(const uint8_t* mask, const BlockTaps& t, int n, float* out) {
  for (int j = 0; j < n; ++j) {
    float acc = 0.0f;
    for (int k = 0; k < 4; ++k) {
      const int32_t x = t.x[k][j];
      const int32_t byte = mask[t.off[k][j] - x + (x >> 3)];
      const float bit = static_cast<float>((byte >> (x & 7)) & 1);
      const float term = t.in[k][j] ? bit * t.w[k][j] : 0.0f;
      acc = k == 0 ? term : acc + term;
    }
    out[j] = acc;
  }
}

// out[j] = the bilinear read of `map` for the block's taps: zero for a tap
// outside the map, summed nw, ne, sw, se (the XLA formulation's order).
SEMSAM_INLINE void BlockReadMap(const float* map, const BlockTaps& t, int n, float* out) {
  float v[4][kBlock];
  for (int k = 0; k < 4; ++k) {
    for (int j = 0; j < n; ++j) v[k][j] = map[t.off[k][j]];
  }
  for (int j = 0; j < n; ++j) {
    const float t0 = t.in[0][j] ? v[0][j] * t.w[0][j] : 0.0f;
    const float t1 = t.in[1][j] ? v[1][j] * t.w[1][j] : 0.0f;
    const float t2 = t.in[2][j] ? v[2][j] * t.w[2][j] : 0.0f;
    const float t3 = t.in[3][j] ? v[3][j] * t.w[3][j] : 0.0f;
    out[j] = ((t0 + t1) + t2) + t3;
  }
}

// Integer hash (Wellons' lowbias32) of points.hash_uniform.
SEMSAM_INLINE uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

constexpr uint32_t kWeyl = 0x9e3779b9U;

SEMSAM_INLINE float HashUniform(uint32_t base, uint32_t j) {
  return static_cast<float>(Mix32(base + j * kWeyl) >> 8) * (1.0f / 16777216.0f);
}

struct Geometry {
  int64_t b = 0, r = 0, h = 0, w = 0, n = 0, p = 0;
  bool shared = false;   // one set of points for every group
};

ffi::Error CheckGroups(const char* what, ffi::Span<const int64_t> idx,
                       ffi::Span<const int64_t> coords, Geometry* g) {
  if (idx.size() != 2 || idx[0] != g->b) {
    return ffi::Error::InvalidArgument(std::string(what) + ": index must be (B, N)");
  }
  g->n = idx[1];
  if (coords.size() != 4 || coords[0] != g->b || coords[3] != 2 ||
      (coords[1] != g->n && coords[1] != 1)) {
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": coords must be (B, N, P, 2) or (B, 1, P, 2)");
  }
  g->shared = coords[1] == 1 && g->n != 1;
  g->p = coords[2];
  return ffi::Error::Success();
}

SEMSAM_INLINE int64_t ClampIndex(int32_t i, int64_t r) {
  return std::min<int64_t>(std::max<int64_t>(i, 0), r - 1);
}

// Points of one group per chunk item; a chunk of this many groups.
constexpr int64_t kGroupGrain = 4;

ffi::Error PointSampleImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> maps,
                           ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> coords,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto d = maps.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("point sample: maps must be (B, R, h, w)");
  Geometry g;
  g.b = d[0], g.r = d[1], g.h = d[2], g.w = d[3];
  auto e = CheckGroups("point sample", index.dimensions(), coords.dimensions(), &g);
  if (e.failure()) return e;
  float* o = out->typed_data();
  if (g.r == 0 || g.h == 0 || g.w == 0) {
    std::fill(o, o + g.b * g.n * g.p, 0.0f);
    return ffi::Error::Success();
  }
  const float* m = maps.typed_data();
  const int32_t* ix = index.typed_data();
  const float* c = coords.typed_data();
  ParallelFor(pool, g.b * g.n, kGroupGrain, [=](int64_t lo, int64_t hi) {
    BlockTaps bt;
    float cx[kBlock], cy[kBlock];
    for (int64_t bn = lo; bn < hi; ++bn) {
      const int64_t bi = bn / g.n;
      const float* map = m + (bi * g.r + ClampIndex(ix[bn], g.r)) * g.h * g.w;
      const float* pc = c + (g.shared ? bi : bn) * g.p * 2;
      float* po = o + bn * g.p;
      for (int64_t q0 = 0; q0 < g.p; q0 += kBlock) {
        const int nb = static_cast<int>(std::min<int64_t>(kBlock, g.p - q0));
        LoadBlock(pc, q0, nb, cx, cy);
        BlockCorners(cx, cy, nb, g.h, g.w, g.w, &bt);
        BlockReadMap(map, bt, nb, po + q0);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error PointSampleGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> cot,
                               ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> coords,
                               ffi::ResultBuffer<ffi::F32> grad) {
  auto d = grad->dimensions();
  if (d.size() != 4) {
    return ffi::Error::InvalidArgument("point sample grad: result must be (B, R, h, w)");
  }
  Geometry g;
  g.b = d[0], g.r = d[1], g.h = d[2], g.w = d[3];
  auto e = CheckGroups("point sample grad", index.dimensions(), coords.dimensions(), &g);
  if (e.failure()) return e;
  auto cd = cot.dimensions();
  if (cd.size() != 3 || cd[0] != g.b || cd[1] != g.n || cd[2] != g.p) {
    return ffi::Error::InvalidArgument("point sample grad: cotangent must be (B, N, P)");
  }
  float* gm = grad->typed_data();
  const int64_t hw = g.h * g.w;
  if (g.r == 0 || hw == 0) return ffi::Error::Success();
  const int32_t* ix = index.typed_data();
  // Groups of each map, in group order (a counting sort per image).
  std::vector<int64_t> start(g.b * g.r + 1, 0);
  std::vector<int64_t> order(g.b * g.n);
  for (int64_t bn = 0; bn < g.b * g.n; ++bn) {
    start[(bn / g.n) * g.r + ClampIndex(ix[bn], g.r) + 1] += 1;
  }
  for (int64_t i = 0; i < g.b * g.r; ++i) start[i + 1] += start[i];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t bn = 0; bn < g.b * g.n; ++bn) {
      order[fill[(bn / g.n) * g.r + ClampIndex(ix[bn], g.r)]++] = bn;
    }
  }
  const float* gc = cot.typed_data();
  const float* c = coords.typed_data();
  const int64_t* st = start.data();
  const int64_t* od = order.data();
  ParallelFor(pool, g.b * g.r, 1, [=](int64_t lo, int64_t hi) {
    BlockTaps bt;
    float cx[kBlock], cy[kBlock];
    for (int64_t br = lo; br < hi; ++br) {
      float* map = gm + br * hw;
      std::fill(map, map + hw, 0.0f);
      const int64_t bi = br / g.r;
      for (int64_t s = st[br]; s < st[br + 1]; ++s) {
        const int64_t bn = od[s];
        const float* pc = c + (g.shared ? bi : bn) * g.p * 2;
        const float* pg = gc + bn * g.p;
        for (int64_t q0 = 0; q0 < g.p; q0 += kBlock) {
          const int nb = static_cast<int>(std::min<int64_t>(kBlock, g.p - q0));
          LoadBlock(pc, q0, nb, cx, cy);
          BlockCorners(cx, cy, nb, g.h, g.w, g.w, &bt);
          for (int j = 0; j < nb; ++j) {   // point by point, taps in order
            const float v = pg[q0 + j];
            for (int k = 0; k < 4; ++k) {
              if (bt.in[k][j]) map[bt.off[k][j]] += v * bt.w[k][j];
            }
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error PackedSampleImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> masks,
                            ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> coords,
                            ffi::ResultBuffer<ffi::F32> out) {
  auto d = masks.dimensions();
  if (d.size() != 4) {
    return ffi::Error::InvalidArgument("packed sample: masks must be (B, M, H, W/8)");
  }
  Geometry g;
  g.b = d[0], g.r = d[1], g.h = d[2];
  const int64_t wb = d[3];
  g.w = wb * 8;
  auto e = CheckGroups("packed sample", index.dimensions(), coords.dimensions(), &g);
  if (e.failure()) return e;
  float* o = out->typed_data();
  if (g.r == 0 || g.h == 0 || wb == 0) {
    std::fill(o, o + g.b * g.n * g.p, 0.0f);
    return ffi::Error::Success();
  }
  const uint8_t* m = masks.typed_data();
  const int32_t* ix = index.typed_data();
  const float* c = coords.typed_data();
  ParallelFor(pool, g.b * g.n, kGroupGrain, [=](int64_t lo, int64_t hi) {
    BlockTaps bt;
    float cx[kBlock], cy[kBlock];
    for (int64_t bn = lo; bn < hi; ++bn) {
      const int64_t bi = bn / g.n;
      const uint8_t* mask = m + (bi * g.r + ClampIndex(ix[bn], g.r)) * g.h * wb;
      const float* pc = c + (g.shared ? bi : bn) * g.p * 2;
      float* po = o + bn * g.p;
      for (int64_t q0 = 0; q0 < g.p; q0 += kBlock) {
        const int nb = static_cast<int>(std::min<int64_t>(kBlock, g.p - q0));
        LoadBlock(pc, q0, nb, cx, cy);
        BlockCorners(cx, cy, nb, g.h, g.w, wb, &bt);
        BlockReadPacked(mask, bt, nb, po + q0);
      }
    }
  });
  return ffi::Error::Success();
}

// The `k` smallest keys (ties: lower index first) of key[0, n): sets `take`
// to the threshold key and `need` to how many keys equal to it are taken
// (the first `need` of them in index order), by a three-pass radix select.
void RadixSelect(const uint32_t* key, int64_t n, int64_t k, uint32_t* thresh, int64_t* need) {
  static constexpr int kShift[3] = {21, 10, 0};
  static constexpr uint32_t kBins[3] = {2048, 2048, 1024};
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = k;
  int64_t hist[2048];
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = kShift[pass];
    const uint32_t bins = kBins[pass];
    std::fill(hist, hist + bins, 0);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t v = key[i];
      if ((v & mask) == prefix) hist[(v >> shift) & (bins - 1)] += 1;
    }
    int64_t below = 0;
    uint32_t bin = 0;
    for (; bin < bins - 1; ++bin) {
      if (below + hist[bin] >= remaining) break;
      below += hist[bin];
    }
    remaining -= below;
    prefix |= bin << shift;
    mask |= (bins - 1) << shift;
  }
  *thresh = prefix;
  *need = remaining;
}

ffi::Error UncertainPointsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> maps,
                               ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::U32> seeds,
                               int64_t num_candidates, int64_t num_uncertain,
                               int64_t num_random, ffi::ResultBuffer<ffi::F32> out) {
  auto d = maps.dimensions();
  if (d.size() != 4) {
    return ffi::Error::InvalidArgument("uncertain points: maps must be (B, R, h, w)");
  }
  const int64_t b = d[0], r = d[1], h = d[2], w = d[3];
  auto id = index.dimensions();
  if (id.size() != 2 || id[0] != b) {
    return ffi::Error::InvalidArgument("uncertain points: index must be (B, N)");
  }
  const int64_t n = id[1];
  auto sd = seeds.dimensions();
  if (sd.size() != 2 || sd[0] != b || sd[1] != n) {
    return ffi::Error::InvalidArgument("uncertain points: seeds must be (B, N)");
  }
  if (num_candidates < 0 || num_uncertain < 0 || num_random < 0 ||
      num_uncertain > num_candidates || 2 * (num_candidates + num_random) > 0xffffffffLL) {
    return ffi::Error::InvalidArgument("uncertain points: need 0 <= K <= C, E >= 0");
  }
  const int64_t p = num_uncertain + num_random;
  auto od = out->dimensions();
  if (od.size() != 4 || od[0] != b || od[1] != n || od[2] != p || od[3] != 2) {
    return ffi::Error::InvalidArgument("uncertain points: result must be (B, N, K + E, 2)");
  }
  const float* m = maps.typed_data();
  const int32_t* ix = index.typed_data();
  const uint32_t* sp = seeds.typed_data();
  float* o = out->typed_data();
  const bool empty = r == 0 || h == 0 || w == 0;
  ParallelFor(pool, b * n, kGroupGrain, [=](int64_t lo, int64_t hi) {
    std::vector<float> cx(num_candidates), cy(num_candidates);
    std::vector<uint32_t> key(num_candidates);
    BlockTaps bt;
    for (int64_t bn = lo; bn < hi; ++bn) {
      const uint32_t base = Mix32(sp[bn]);
      float* po = o + bn * p * 2;
      if (num_uncertain > 0) {
        for (int64_t i = 0; i < num_candidates; ++i) {
          cx[i] = HashUniform(base, static_cast<uint32_t>(2 * i));
          cy[i] = HashUniform(base, static_cast<uint32_t>(2 * i + 1));
        }
        if (empty) {
          std::fill(key.begin(), key.end(), 0u);
        } else {
          const float* map = m + ((bn / n) * r + ClampIndex(ix[bn], r)) * h * w;
          float val[kBlock];
          for (int64_t i0 = 0; i0 < num_candidates; i0 += kBlock) {
            const int nb = static_cast<int>(std::min<int64_t>(kBlock, num_candidates - i0));
            BlockCorners(cx.data() + i0, cy.data() + i0, nb, h, w, w, &bt);
            BlockReadMap(map, bt, nb, val);
            for (int j = 0; j < nb; ++j) {
              uint32_t bits;
              std::memcpy(&bits, &val[j], 4);
              key[i0 + j] = bits & 0x7fffffffU;   // |v|: ordered like the float
            }
          }
        }
        uint32_t thresh;
        int64_t need;
        RadixSelect(key.data(), num_candidates, num_uncertain, &thresh, &need);
        int64_t j = 0;
        for (int64_t i = 0; i < num_candidates && j < num_uncertain; ++i) {
          const uint32_t v = key[i];
          if (v < thresh || (v == thresh && need-- > 0)) {
            po[2 * j] = cx[i];
            po[2 * j + 1] = cy[i];
            ++j;
          }
        }
      }
      for (int64_t e = 0; e < num_random; ++e) {
        const uint32_t jj = static_cast<uint32_t>(2 * (num_candidates + e));
        po[2 * (num_uncertain + e)] = HashUniform(base, jj);
        po[2 * (num_uncertain + e) + 1] = HashUniform(base, jj + 1);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SemsamPointSample, PointSampleImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SemsamPointSampleGrad, PointSampleGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SemsamPackedSample, PackedSampleImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SemsamUncertainPoints, UncertainPointsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Attr<int64_t>("num_candidates")
                                  .Attr<int64_t>("num_uncertain")
                                  .Attr<int64_t>("num_random")
                                  .Ret<ffi::Buffer<ffi::F32>>());
