// Multi-scale deformable attention for XLA:CPU, as typed-FFI custom calls.
//
// Semantics are those of semsam_jax.models.deformable_attention.ms_deform_attn
// (bilinear sampling with zero padding, align_corners=False: a normalised
// location l of a side of n pixels maps to the pixel coordinate l * n - 0.5).
//
//   value                (B, S, M, D)        float32, levels flattened row-major
//   sampling_locations   (B, Q, M, L, P, 2)  float32 normalised (x, y)
//   attention_weights    (B, Q, M, L, P)     float32
//   output               (B, Q, M, D)        float32
//
// Attribute `shapes`: int64 [H0, W0, H1, W1, ...] of the L levels.
//
// Forward: every (b, q, m) accumulates its L * P * 4 weighted corner rows of
// D channels in registers; work is split over queries.  A second forward
// (SemsamMsdaQueryForward) takes the module's raw inputs instead -- reference
// points, sampling offsets and attention logits -- and forms the locations
// and the softmax itself, which saves XLA:CPU several passes over the
// (Q, M, L, P) tensors.  Backward: for every
// (b, m) the pass over all queries accumulates the value gradient of that
// head (rows of different heads are disjoint, so threads never write the same
// row) and writes the location / attention-weight gradients of its samples.
//
// Work runs on XLA's intra-op thread pool (kernel_common.h).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "kernel_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace semsam_kernels;  // NOLINT

struct Level {
  int64_t h, w, start;
};

// ---------------------------------------------------------------- geometry

// The (up to) four corners of one bilinear sample.  `row[c]` is the position
// (inside the flattened sequence) of corner c = (top-left, top-right,
// bottom-left, bottom-right) or -1 when that corner lies outside the map.
struct Corners {
  int64_t row[4];
  int64_t safe[4];  // row[c], or a valid row of the level for outside corners
  float w[4];   // bilinear weights (zero for outside corners)
  float fx, fy;
  bool any;     // false: the sample lies entirely outside the map
};

inline Corners Locate(float lx, float ly, const Level& lv) {
  Corners c;
  const float x = lx * static_cast<float>(lv.w) - 0.5f;
  const float y = ly * static_cast<float>(lv.h) - 0.5f;
  // Some corner is inside iff floor(x) in [-1, W-1] and floor(y) in [-1, H-1];
  // written so that NaN locations count as outside.
  c.any = (x >= -1.0f) && (x < static_cast<float>(lv.w)) && (y >= -1.0f) &&
          (y < static_cast<float>(lv.h));
  if (!c.any) return c;
  const float x0f = std::floor(x);
  const float y0f = std::floor(y);
  c.fx = x - x0f;
  c.fy = y - y0f;
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const float gx = 1.0f - c.fx, gy = 1.0f - c.fy;
  const bool xin0 = x0 >= 0, xin1 = x0 + 1 < lv.w;
  const bool yin0 = y0 >= 0, yin1 = y0 + 1 < lv.h;
  const int64_t base = lv.start + y0 * lv.w + x0;
  c.row[0] = (yin0 && xin0) ? base : -1;
  c.row[1] = (yin0 && xin1) ? base + 1 : -1;
  c.row[2] = (yin1 && xin0) ? base + lv.w : -1;
  c.row[3] = (yin1 && xin1) ? base + lv.w + 1 : -1;
  c.w[0] = c.row[0] >= 0 ? gy * gx : 0.0f;
  c.w[1] = c.row[1] >= 0 ? gy * c.fx : 0.0f;
  c.w[2] = c.row[2] >= 0 ? c.fy * gx : 0.0f;
  c.w[3] = c.row[3] >= 0 ? c.fy * c.fx : 0.0f;
  for (int j = 0; j < 4; ++j) c.safe[j] = c.row[j] >= 0 ? c.row[j] : lv.start;
  return c;
}

// --------------------------------------------------------------- inner loops

// Channel loops for kD = 16 * N channels (N > 0), held in vector registers;
// kD = 0 is the generic fallback for any channel count.
template <int kD>
struct Channels {
  static constexpr int N = kD / 16;
  F16 acc[N > 0 ? N : 1];
  void Zero(int64_t) {
    for (int n = 0; n < N; ++n) acc[n] = F16{} ;
  }
  void Axpy(const float* v, float a, int64_t) {
    const F16 av = F16{} + a;
    for (int n = 0; n < N; ++n) acc[n] += av * Load16(v + 16 * n);
  }
  // acc += (a0 v0 + a1 v1) + (a2 v2 + a3 v3): one bilinear sample, summed as
  // a tree so that successive samples form a short dependency chain.
  void Axpy4(const float* const* v, const float* a, int64_t) {
    const F16 a0 = F16{} + a[0], a1 = F16{} + a[1], a2 = F16{} + a[2], a3 = F16{} + a[3];
    for (int n = 0; n < N; ++n) {
      const int o = 16 * n;
      acc[n] += (a0 * Load16(v[0] + o) + a1 * Load16(v[1] + o)) +
                (a2 * Load16(v[2] + o) + a3 * Load16(v[3] + o));
    }
  }
  void Store(float* out, int64_t) const {
    for (int n = 0; n < N; ++n) Store16(out + 16 * n, acc[n]);
  }
};

template <>
struct Channels<0> {
  std::vector<float> acc;
  void Zero(int64_t d) { acc.assign(d, 0.0f); }
  void Axpy(const float* v, float a, int64_t d) {
    for (int64_t i = 0; i < d; ++i) acc[i] += a * v[i];
  }
  void Axpy4(const float* const* v, const float* a, int64_t d) {
    for (int64_t i = 0; i < d; ++i) {
      acc[i] += (a[0] * v[0][i] + a[1] * v[1][i]) + (a[2] * v[2][i] + a[3] * v[3][i]);
    }
  }
  void Store(float* out, int64_t d) const { std::memcpy(out, acc.data(), sizeof(float) * d); }
};

// out[0:kD] += a * g[0:kD] (in memory) and <v, g>, for the backward pass.
template <int kD>
struct RowOps {
  static constexpr int N = kD / 16;
  static inline float Dot(const float* v, const float* g, int64_t) {
    F16 s = F16{};
    for (int n = 0; n < N; ++n) s += Load16(v + 16 * n) * Load16(g + 16 * n);
    return HSum(s);
  }
  static inline void Axpy(float* out, const float* g, float a, int64_t) {
    const F16 av = F16{} + a;
    for (int n = 0; n < N; ++n) Store16(out + 16 * n, Load16(out + 16 * n) + av * Load16(g + 16 * n));
  }
};

template <>
struct RowOps<0> {
  static inline float Dot(const float* v, const float* g, int64_t d) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; ++i) s += v[i] * g[i];
    return s;
  }
  static inline void Axpy(float* out, const float* g, float a, int64_t d) {
    for (int64_t i = 0; i < d; ++i) out[i] += a * g[i];
  }
};

struct Dims {
  int64_t b, s, m, d, q, l, p;
};

ffi::Error CheckDims(const Dims& k, ffi::Span<const int64_t> shapes, std::vector<Level>* levels) {
  if (static_cast<int64_t>(shapes.size()) != 2 * k.l) {
    return ffi::Error::InvalidArgument("msda: `shapes` must hold 2 values per level");
  }
  int64_t total = 0;
  for (int64_t i = 0; i < k.l; ++i) {
    Level lv{shapes[2 * i], shapes[2 * i + 1], total};
    if (lv.h <= 0 || lv.w <= 0) return ffi::Error::InvalidArgument("msda: empty level");
    total += lv.h * lv.w;
    levels->push_back(lv);
  }
  if (total != k.s) {
    return ffi::Error::InvalidArgument("msda: spatial shapes do not sum to the value length");
  }
  if (k.l * k.p > 64) {
    return ffi::Error::InvalidArgument("msda: at most 64 samples (levels x points) per head");
  }
  if (k.s * k.m * k.d >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("msda: S * M * D must be below 2^31 per batch item");
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ forward

// Per-sample level constants, for the L * P samples of a (query, head).
struct LaneLevels {
  std::vector<float> wf, hf;
  std::vector<int32_t> w, h, start;
  explicit LaneLevels(const Dims& k, const std::vector<Level>& lv) {
    for (int64_t l = 0; l < k.l; ++l) {
      for (int64_t p = 0; p < k.p; ++p) {
        wf.push_back(static_cast<float>(lv[l].w));
        hf.push_back(static_cast<float>(lv[l].h));
        w.push_back(static_cast<int32_t>(lv[l].w));
        h.push_back(static_cast<int32_t>(lv[l].h));
        start.push_back(static_cast<int32_t>(lv[l].start));
      }
    }
  }
};

// Accumulates the samples of one (query, head): `loc` holds the L * P (x, y)
// pairs and `att` their attention weights; `vm` points at head m of position
// 0.  The corner geometry of all samples is computed first, in loops over the
// samples that the compiler vectorises (the arithmetic of Locate(), with
// outside corners given weight 0 and a clamped, valid row), then the rows
// are accumulated.  Row offsets are int32: callers check S * M * D < 2^31.
template <int kD, int LP>
inline void SampleQueryHeadLanes(Channels<kD>& acc, const Dims& k, const LaneLevels& ll,
                                 const float* vm, const float* loc, const float* att) {
  const int32_t row_stride = static_cast<int32_t>(k.m * k.d);
  const int n = LP > 0 ? LP : static_cast<int>(k.l * k.p);
  constexpr int kCap = LP > 0 ? LP : 64;
  alignas(64) float lx[kCap], ly[kCap], w00[kCap], w01[kCap], w10[kCap], w11[kCap];
  alignas(64) int32_t r00[kCap], r01[kCap], r10[kCap], r11[kCap];
  for (int i = 0; i < n; ++i) {
    lx[i] = loc[2 * i];
    ly[i] = loc[2 * i + 1];
  }
  const float* wf = ll.wf.data();
  const float* hf = ll.hf.data();
  const int32_t* wi = ll.w.data();
  const int32_t* hi = ll.h.data();
  const int32_t* st = ll.start.data();
  for (int i = 0; i < n; ++i) {
    const float x = lx[i] * wf[i] - 0.5f;
    const float y = ly[i] * hf[i] - 0.5f;
    const bool any = (x >= -1.0f) & (x < wf[i]) & (y >= -1.0f) & (y < hf[i]);
    const float xs = any ? x : 0.0f, ys = any ? y : 0.0f;   // keeps the conversions defined
    const float x0f = std::floor(xs), y0f = std::floor(ys);
    const float fx = xs - x0f, fy = ys - y0f;
    const int32_t x0 = static_cast<int32_t>(x0f), y0 = static_cast<int32_t>(y0f);
    const float gx = 1.0f - fx, gy = 1.0f - fy;
    const bool xin0 = x0 >= 0, xin1 = x0 + 1 < wi[i], yin0 = y0 >= 0, yin1 = y0 + 1 < hi[i];
    const int32_t cx0 = xin0 ? x0 : 0, cx1 = xin1 ? x0 + 1 : wi[i] - 1;
    const int32_t cy0 = yin0 ? y0 : 0, cy1 = yin1 ? y0 + 1 : hi[i] - 1;
    const float a = any ? att[i] : 0.0f;
    w00[i] = (yin0 & xin0) ? gy * gx * a : 0.0f;
    w01[i] = (yin0 & xin1) ? gy * fx * a : 0.0f;
    w10[i] = (yin1 & xin0) ? fy * gx * a : 0.0f;
    w11[i] = (yin1 & xin1) ? fy * fx * a : 0.0f;
    r00[i] = (st[i] + cy0 * wi[i] + cx0) * row_stride;
    r01[i] = (st[i] + cy0 * wi[i] + cx1) * row_stride;
    r10[i] = (st[i] + cy1 * wi[i] + cx0) * row_stride;
    r11[i] = (st[i] + cy1 * wi[i] + cx1) * row_stride;
  }
  acc.Zero(k.d);
  for (int i = 0; i < n; ++i) {
    const float* rows[4] = {vm + r00[i], vm + r01[i], vm + r10[i], vm + r11[i]};
    const float wts[4] = {w00[i], w01[i], w10[i], w11[i]};
    acc.Axpy4(rows, wts, k.d);
  }
}

// L * P == 16: the geometry of the 16 samples as one vector each (GCC/Clang
// vector extensions), same arithmetic as SampleQueryHeadLanes.
template <int kD>
inline void SampleQueryHead16(Channels<kD>& acc, const Dims& k, const LaneLevels& ll,
                              const float* vm, const float* loc, const float* att) {
  alignas(64) float lx[16], ly[16], w[4][16];
  alignas(64) int32_t r[4][16];
  for (int i = 0; i < 16; ++i) {
    lx[i] = loc[2 * i];
    ly[i] = loc[2 * i + 1];
  }
  const F16 wf = Load16(ll.wf.data()), hf = Load16(ll.hf.data());
  const I16 wi = LoadI16(ll.w.data()), hi = LoadI16(ll.h.data());
  const I16 st = LoadI16(ll.start.data());
  const F16 half = F16{} + 0.5f, one = F16{} + 1.0f, zero = F16{};
  const I16 izero = I16{}, ione = I16{} + 1;
  const F16 x = Load16(lx) * wf - half;
  const F16 y = Load16(ly) * hf - half;
  const I16 any = (x >= -one) & (x < wf) & (y >= -one) & (y < hf);
  const F16 xs = Select(any, x, zero), ys = Select(any, y, zero);
  I16 x0 = ToInt(xs), y0 = ToInt(ys);
  x0 = Select(ToFloat(x0) > xs, x0 - ione, x0);   // floor
  y0 = Select(ToFloat(y0) > ys, y0 - ione, y0);
  const F16 fx = xs - ToFloat(x0), fy = ys - ToFloat(y0);
  const F16 gx = one - fx, gy = one - fy;
  const I16 xin0 = x0 >= izero, xin1 = x0 + ione < wi, yin0 = y0 >= izero, yin1 = y0 + ione < hi;
  const I16 cx0 = Select(xin0, x0, izero), cx1 = Select(xin1, x0 + ione, wi - ione);
  const I16 cy0 = Select(yin0, y0, izero), cy1 = Select(yin1, y0 + ione, hi - ione);
  const F16 a = Select(any, Load16(att), zero);
  const F16 w00 = Select(yin0 & xin0, gy * gx * a, zero), w01 = Select(yin0 & xin1, gy * fx * a, zero);
  const F16 w10 = Select(yin1 & xin0, fy * gx * a, zero), w11 = Select(yin1 & xin1, fy * fx * a, zero);
  const I16 stride = I16{} + static_cast<int32_t>(k.m * k.d);
  const I16 r00 = (st + cy0 * wi + cx0) * stride, r01 = (st + cy0 * wi + cx1) * stride;
  const I16 r10 = (st + cy1 * wi + cx0) * stride, r11 = (st + cy1 * wi + cx1) * stride;
  Store16(w[0], w00);
  Store16(w[1], w01);
  Store16(w[2], w10);
  Store16(w[3], w11);
  StoreI16(r[0], r00);
  StoreI16(r[1], r01);
  StoreI16(r[2], r10);
  StoreI16(r[3], r11);
  acc.Zero(k.d);
  for (int i = 0; i < 16; ++i) {
    const float* rows[4] = {vm + r[0][i], vm + r[1][i], vm + r[2][i], vm + r[3][i]};
    const float wts[4] = {w[0][i], w[1][i], w[2][i], w[3][i]};
    acc.Axpy4(rows, wts, k.d);
  }
}

template <int kD>
inline void SampleQueryHead(Channels<kD>& acc, const Dims& k, const LaneLevels& ll,
                            const float* vm, const float* loc, const float* att) {
  if (k.l * k.p == 16) {
    SampleQueryHead16<kD>(acc, k, ll, vm, loc, att);
  } else {
    SampleQueryHeadLanes<kD, 0>(acc, k, ll, vm, loc, att);
  }
}

template <int kD>
void Forward(const Dims& k, const std::vector<Level>& lv, const float* value,
             const float* loc, const float* aw, float* out, int64_t lo, int64_t hi) {
  // [lo, hi) ranges over b * Q + q.
  const int64_t lp = k.l * k.p;
  const LaneLevels ll(k, lv);
  Channels<kD> acc;
  for (int64_t bq = lo; bq < hi; ++bq) {
    const float* vb = value + (bq / k.q) * k.s * k.m * k.d;
    for (int64_t m = 0; m < k.m; ++m) {
      const int64_t qm = bq * k.m + m;
      SampleQueryHead<kD>(acc, k, ll, vb + m * k.d, loc + qm * lp * 2, aw + qm * lp);
      acc.Store(out + qm * k.d, k.d);
    }
  }
}

// The module-level forward: attention weights are the softmax of `logits`
// over the L * P samples of a head, and locations are made from reference
// points (B, Q, L, R) and raw offsets (B, Q, M, L, P, 2) as
// MSDeformAttn.attend does: R = 2 (points): ref + offset / (W_l, H_l);
// R = 4 (boxes cx, cy, w, h): ref_xy + offset / P * ref_wh * 0.5.
template <int kD>
void ForwardFromQueries(const Dims& k, const std::vector<Level>& lv, const float* value,
                        const float* ref, int64_t ref_dim, const float* offsets,
                        const float* logits, float* out, int64_t lo, int64_t hi) {
  const int64_t lp = k.l * k.p;
  const LaneLevels ll(k, lv);
  Channels<kD> acc;
  std::vector<float> loc(2 * lp), att(std::max<int64_t>(lp, 16));
  const float inv_p = 1.0f / static_cast<float>(k.p);
  for (int64_t bq = lo; bq < hi; ++bq) {
    const float* vb = value + (bq / k.q) * k.s * k.m * k.d;
    const float* rq = ref + bq * k.l * ref_dim;
    for (int64_t m = 0; m < k.m; ++m) {
      const int64_t qm = bq * k.m + m;
      const float* lg = logits + qm * lp;
      const float* off = offsets + qm * lp * 2;
      if (lp == 16) {
        // Softmax over the 16 samples as one vector.
        const F16 x = Load16(lg);
        const F16 e = ExpNonPositive(x - Splat(HMax(x)));
        Store16(att.data(), e / Splat(HSum(e)));
      } else {
        float mx = lg[0];
        for (int64_t i = 1; i < lp; ++i) mx = std::max(mx, lg[i]);
        float sum = 0.0f;
        for (int64_t i = 0; i < lp; ++i) {
          att[i] = std::exp(lg[i] - mx);
          sum += att[i];
        }
        for (int64_t i = 0; i < lp; ++i) att[i] = att[i] / sum;
      }
      for (int64_t l = 0; l < k.l; ++l) {
        const float* r = rq + l * ref_dim;
        for (int64_t p = 0; p < k.p; ++p) {
          const int64_t i = l * k.p + p;
          if (ref_dim == 2) {
            loc[2 * i] = r[0] + off[2 * i] / static_cast<float>(lv[l].w);
            loc[2 * i + 1] = r[1] + off[2 * i + 1] / static_cast<float>(lv[l].h);
          } else {
            loc[2 * i] = r[0] + off[2 * i] * inv_p * r[2] * 0.5f;
            loc[2 * i + 1] = r[1] + off[2 * i + 1] * inv_p * r[3] * 0.5f;
          }
        }
      }
      SampleQueryHead<kD>(acc, k, ll, vb + m * k.d, loc.data(), att.data());
      acc.Store(out + qm * k.d, k.d);
    }
  }
}

// ----------------------------------------------------------------- backward

template <int kD>
void Backward(const Dims& k, const std::vector<Level>& lv, const float* value,
              const float* loc, const float* aw, const float* g, float* g_value,
              float* g_loc, float* g_aw, int64_t lo, int64_t hi) {
  // [lo, hi) ranges over b * M + m.
  const int64_t lp = k.l * k.p;
  const int64_t row_stride = k.m * k.d;
  for (int64_t bm = lo; bm < hi; ++bm) {
    const int64_t b = bm / k.m, m = bm % k.m;
    const float* vm = value + b * k.s * row_stride + m * k.d;
    float* gvm = g_value + b * k.s * row_stride + m * k.d;
    for (int64_t s = 0; s < k.s; ++s) std::fill(gvm + s * row_stride, gvm + s * row_stride + k.d, 0.0f);
    for (int64_t q = 0; q < k.q; ++q) {
      const int64_t qm = (b * k.q + q) * k.m + m;
      const float* gq = g + qm * k.d;
      for (int64_t l = 0; l < k.l; ++l) {
        for (int64_t p = 0; p < k.p; ++p) {
          const int64_t i = qm * lp + l * k.p + p;
          const Corners c = Locate(loc[2 * i], loc[2 * i + 1], lv[l]);
          if (!c.any) {
            g_aw[i] = 0.0f;
            g_loc[2 * i] = 0.0f;
            g_loc[2 * i + 1] = 0.0f;
            continue;
          }
          const float att = aw[i];
          float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          for (int j = 0; j < 4; ++j) {
            if (c.row[j] < 0) continue;
            const int64_t off = c.row[j] * row_stride;
            dot[j] = RowOps<kD>::Dot(vm + off, gq, k.d);
            RowOps<kD>::Axpy(gvm + off, gq, c.w[j] * att, k.d);
          }
          const float gx = 1.0f - c.fx, gy = 1.0f - c.fy;
          g_aw[i] = c.w[0] * dot[0] + c.w[1] * dot[1] + c.w[2] * dot[2] + c.w[3] * dot[3];
          // d sample / d x = (1 - fy)(v_tr - v_tl) + fy (v_br - v_bl); dx / d loc_x = W.
          g_loc[2 * i] = att * static_cast<float>(lv[l].w) *
                         (gy * (dot[1] - dot[0]) + c.fy * (dot[3] - dot[2]));
          g_loc[2 * i + 1] = att * static_cast<float>(lv[l].h) *
                             (gx * (dot[2] - dot[0]) + c.fx * (dot[3] - dot[1]));
        }
      }
    }
  }
}

Dims DimsOf(ffi::Buffer<ffi::F32>& value, ffi::Buffer<ffi::F32>& loc) {
  auto vd = value.dimensions();
  auto ld = loc.dimensions();
  return Dims{vd[0], vd[1], vd[2], vd[3], ld[1], ld[3], ld[4]};
}

ffi::Error CheckRanks(ffi::Buffer<ffi::F32>& value, ffi::Buffer<ffi::F32>& loc,
                      ffi::Buffer<ffi::F32>& aw) {
  auto vd = value.dimensions();
  auto ld = loc.dimensions();
  auto ad = aw.dimensions();
  if (vd.size() != 4 || ld.size() != 6 || ad.size() != 5 || ld[5] != 2) {
    return ffi::Error::InvalidArgument("msda: bad operand ranks");
  }
  if (ld[0] != vd[0] || ld[2] != vd[2]) {
    return ffi::Error::InvalidArgument("msda: batch / head sizes disagree");
  }
  for (int i = 0; i < 5; ++i) {
    if (ad[i] != ld[i]) return ffi::Error::InvalidArgument("msda: attention weight shape");
  }
  return ffi::Error::Success();
}

// Queries per forward chunk: enough work to amortise scheduling.
constexpr int64_t kForwardGrain = 64;

ffi::Error MsdaForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> value,
                           ffi::Buffer<ffi::F32> loc, ffi::Buffer<ffi::F32> aw,
                           ffi::Span<const int64_t> shapes,
                           ffi::ResultBuffer<ffi::F32> out) {
  if (auto e = CheckRanks(value, loc, aw); e.failure()) return e;
  const Dims k = DimsOf(value, loc);
  std::vector<Level> lv;
  if (auto e = CheckDims(k, shapes, &lv); e.failure()) return e;
  const float* v = value.typed_data();
  const float* l = loc.typed_data();
  const float* a = aw.typed_data();
  float* o = out->typed_data();
  auto run = [&](auto tag) {
    constexpr int kD = decltype(tag)::value;
    ParallelFor(pool, k.b * k.q, kForwardGrain, [&k, &lv, v, l, a, o](int64_t lo, int64_t hi) {
      Forward<kD>(k, lv, v, l, a, o, lo, hi);
    });
  };
  switch (k.d) {
    case 16: run(std::integral_constant<int, 16>()); break;
    case 32: run(std::integral_constant<int, 32>()); break;
    case 64: run(std::integral_constant<int, 64>()); break;
    default: run(std::integral_constant<int, 0>()); break;
  }
  return ffi::Error::Success();
}

ffi::Error MsdaBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> value,
                            ffi::Buffer<ffi::F32> loc, ffi::Buffer<ffi::F32> aw,
                            ffi::Buffer<ffi::F32> g, ffi::Span<const int64_t> shapes,
                            ffi::ResultBuffer<ffi::F32> g_value,
                            ffi::ResultBuffer<ffi::F32> g_loc,
                            ffi::ResultBuffer<ffi::F32> g_aw) {
  if (auto e = CheckRanks(value, loc, aw); e.failure()) return e;
  const Dims k = DimsOf(value, loc);
  std::vector<Level> lv;
  if (auto e = CheckDims(k, shapes, &lv); e.failure()) return e;
  const float* v = value.typed_data();
  const float* l = loc.typed_data();
  const float* a = aw.typed_data();
  const float* gg = g.typed_data();
  float* gv = g_value->typed_data();
  float* gl = g_loc->typed_data();
  float* ga = g_aw->typed_data();
  auto run = [&](auto tag) {
    constexpr int kD = decltype(tag)::value;
    ParallelFor(pool, k.b * k.m, 1, [&k, &lv, v, l, a, gg, gv, gl, ga](int64_t lo, int64_t hi) {
      Backward<kD>(k, lv, v, l, a, gg, gv, gl, ga, lo, hi);
    });
  };
  switch (k.d) {
    case 16: run(std::integral_constant<int, 16>()); break;
    case 32: run(std::integral_constant<int, 32>()); break;
    case 64: run(std::integral_constant<int, 64>()); break;
    default: run(std::integral_constant<int, 0>()); break;
  }
  return ffi::Error::Success();
}

ffi::Error MsdaQueryForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> value,
                                ffi::Buffer<ffi::F32> ref, ffi::Buffer<ffi::F32> offsets,
                                ffi::Buffer<ffi::F32> logits, ffi::Span<const int64_t> shapes,
                                ffi::ResultBuffer<ffi::F32> out) {
  auto vd = value.dimensions();
  auto rd = ref.dimensions();
  auto od = offsets.dimensions();
  auto gd = logits.dimensions();
  if (vd.size() != 4 || rd.size() != 4 || od.size() != 6 || gd.size() != 4 || od[5] != 2) {
    return ffi::Error::InvalidArgument("msda: bad operand ranks");
  }
  const Dims k{vd[0], vd[1], vd[2], vd[3], od[1], od[3], od[4]};
  if (od[0] != k.b || od[2] != k.m || rd[0] != k.b || rd[1] != k.q || rd[2] != k.l ||
      (rd[3] != 2 && rd[3] != 4) || gd[0] != k.b || gd[1] != k.q || gd[2] != k.m ||
      gd[3] != k.l * k.p) {
    return ffi::Error::InvalidArgument("msda: operand shapes disagree");
  }
  std::vector<Level> lv;
  if (auto e = CheckDims(k, shapes, &lv); e.failure()) return e;
  const float* v = value.typed_data();
  const float* r = ref.typed_data();
  const float* o = offsets.typed_data();
  const float* g = logits.typed_data();
  float* y = out->typed_data();
  const int64_t rdim = rd[3];
  auto run = [&](auto tag) {
    constexpr int kD = decltype(tag)::value;
    ParallelFor(pool, k.b * k.q, kForwardGrain, [&k, &lv, v, r, rdim, o, g, y](int64_t lo,
                                                                                int64_t hi) {
      ForwardFromQueries<kD>(k, lv, v, r, rdim, o, g, y, lo, hi);
    });
  };
  switch (k.d) {
    case 16: run(std::integral_constant<int, 16>()); break;
    case 32: run(std::integral_constant<int, 32>()); break;
    case 64: run(std::integral_constant<int, 64>()); break;
    default: run(std::integral_constant<int, 0>()); break;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SemsamMsdaForward, MsdaForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("shapes")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SemsamMsdaQueryForward, MsdaQueryForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("shapes")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SemsamMsdaBackward, MsdaBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("shapes")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Version of the calling conventions of this library (all its sources); the
// Python side checks it.
extern "C" int SemsamKernelsAbiVersion() { return 1; }

// The vector extensions this build was compiled for (reported by benchmarks).
extern "C" const char* SemsamKernelsIsa() {
  return ""
#if defined(__AVX512F__)
         "avx512f "
#endif
#if defined(__AVX2__)
         "avx2 "
#endif
#if defined(__FMA__)
         "fma "
#endif
#if defined(__AVX__)
         "avx "
#endif
#if defined(__SSE4_2__)
         "sse4.2 "
#endif
#if defined(__ARM_NEON)
         "neon "
#endif
         "";
}
