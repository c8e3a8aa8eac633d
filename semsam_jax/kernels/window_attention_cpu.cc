// Swin window self-attention (the part between the qkv and output projections)
// for XLA:CPU, as a typed-FFI custom call.
//
//   qkv    (B, W, N, 3C)  float32: per window token, q | k | v, each (heads, D)
//   bias   (H, N, N)      float32: relative position bias per head
//   mask   (Wm, N, N)     float32: additive mask per window (Wm == W), or any
//                         array when `has_mask` is 0
//   out    (B, W, N, C)   float32: per token, the heads' outputs (heads, D)
//
// Attributes: `num_heads` H (C = H * D) and `scale` (applied to q first, as
// the reference does), `has_mask`.
//
// Per window and head: s_ij = (q_i * scale) . k_j + bias_ij (+ mask_ij),
// p_i = softmax_j(s_i) = exp(s_ij - max_j) / sum_j exp(...), out_i = sum_j p_ij v_j.
// Keys are kept transposed (D x N, padded to a multiple of 16) so that a query
// row's N scores are D broadcast multiply-adds over vectors; exp is a
// Cephes-style polynomial (about 1 ulp).  Windows are split over XLA's
// intra-op thread pool (kernel_common.h).

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

struct Shape {
  int64_t b, w, n, c, h, d;
};

// One window, all heads.  kt: D x NP scratch (keys transposed), srow: NP
// scratch.  NV = NP / 16 score vectors per query row, kept in registers when
// known at compile time (windows of 7 and 12: 49 -> 4 and 144 -> 9 vectors);
// NV = 0 is the generic path.
template <int NV>
void Window(const Shape& k, const float* qkv, const float* bias, const float* mask,
            float scale, float* out, float* kt, float* srow) {
  const int64_t np = (k.n + 15) / 16 * 16;
  const int64_t nv = NV > 0 ? NV : np / 16;
  const int64_t row = 3 * k.c;
  constexpr int kRegs = NV > 0 ? NV : 1;
  for (int64_t h = 0; h < k.h; ++h) {
    const int64_t qo = h * k.d, ko = k.c + h * k.d, vo = 2 * k.c + h * k.d;
    for (int64_t dd = 0; dd < k.d; ++dd) {
      float* kd = kt + dd * np;
      for (int64_t j = 0; j < k.n; ++j) kd[j] = qkv[j * row + ko + dd];
      for (int64_t j = k.n; j < np; ++j) kd[j] = 0.0f;
    }
    const float* bh = bias + h * k.n * k.n;
    for (int64_t i = 0; i < k.n; ++i) {
      const float* qi = qkv + i * row + qo;
      if (NV > 0) {
        F16 sc[kRegs];
        for (int v = 0; v < kRegs; ++v) sc[v] = F16{};
        for (int64_t dd = 0; dd < k.d; ++dd) {
          const F16 q = Splat(qi[dd] * scale);
          const float* kd = kt + dd * np;
          for (int v = 0; v < kRegs; ++v) sc[v] += q * Load16(kd + 16 * v);
        }
        for (int v = 0; v < kRegs; ++v) Store16(srow + 16 * v, sc[v]);
      } else {
        for (int64_t v = 0; v < nv; ++v) Store16(srow + 16 * v, F16{});
        for (int64_t dd = 0; dd < k.d; ++dd) {
          const F16 q = Splat(qi[dd] * scale);
          const float* kd = kt + dd * np;
          for (int64_t v = 0; v < nv; ++v) {
            Store16(srow + 16 * v, Load16(srow + 16 * v) + q * Load16(kd + 16 * v));
          }
        }
      }
      const float* bi = bh + i * k.n;
      const float* mi = mask ? mask + i * k.n : nullptr;
      for (int64_t j = 0; j < k.n; ++j) {
        float s = srow[j] + bi[j];
        if (mi) s += mi[j];
        srow[j] = s;
      }
      for (int64_t j = k.n; j < np; ++j) srow[j] = -INFINITY;
      F16 mx = Load16(srow);
      for (int64_t v = 1; v < nv; ++v) mx = Max16(mx, Load16(srow + 16 * v));
      const F16 m = Splat(HMax(mx));
      F16 tot = F16{};
      for (int64_t v = 0; v < nv; ++v) {
        const F16 e = ExpNonPositive(Load16(srow + 16 * v) - m);
        Store16(srow + 16 * v, e);
        tot += e;
      }
      const F16 sum = Splat(HSum(tot));
      for (int64_t v = 0; v < nv; ++v) Store16(srow + 16 * v, Load16(srow + 16 * v) / sum);
      // out_i = sum_j p_j v_j.
      float* oi = out + i * k.c + h * k.d;
      if (k.d % 16 == 0) {
        F16 acc[8];
        const int64_t dv = k.d / 16;
        for (int64_t t = 0; t < dv; ++t) acc[t] = F16{};
        for (int64_t j = 0; j < k.n; ++j) {
          const F16 p = Splat(srow[j]);
          const float* vj = qkv + j * row + vo;
          for (int64_t t = 0; t < dv; ++t) acc[t] += p * Load16(vj + 16 * t);
        }
        for (int64_t t = 0; t < dv; ++t) Store16(oi + 16 * t, acc[t]);
      } else {
        for (int64_t dd = 0; dd < k.d; ++dd) oi[dd] = 0.0f;
        for (int64_t j = 0; j < k.n; ++j) {
          const float p = srow[j];
          const float* vj = qkv + j * row + vo;
          for (int64_t dd = 0; dd < k.d; ++dd) oi[dd] += p * vj[dd];
        }
      }
    }
  }
}

ffi::Error WindowAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                               ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mask,
                               int64_t num_heads, float scale, int64_t has_mask,
                               ffi::ResultBuffer<ffi::F32> out) {
  auto qd = qkv.dimensions();
  if (qd.size() != 4 || qd[3] % 3 != 0) {
    return ffi::Error::InvalidArgument("window attention: qkv must be (B, W, N, 3C)");
  }
  Shape k{qd[0], qd[1], qd[2], qd[3] / 3, num_heads, 0};
  if (k.h <= 0 || k.c % k.h != 0) {
    return ffi::Error::InvalidArgument("window attention: channels not divisible by heads");
  }
  k.d = k.c / k.h;
  if (k.d % 16 == 0 && k.d / 16 > 8) {
    return ffi::Error::InvalidArgument("window attention: head dim above 128");
  }
  auto bd = bias.dimensions();
  if (bd.size() != 3 || bd[0] != k.h || bd[1] != k.n || bd[2] != k.n) {
    return ffi::Error::InvalidArgument("window attention: bias must be (H, N, N)");
  }
  if (has_mask) {
    auto md = mask.dimensions();
    if (md.size() != 3 || md[0] != k.w || md[1] != k.n || md[2] != k.n) {
      return ffi::Error::InvalidArgument("window attention: mask must be (W, N, N)");
    }
  }
  const float* x = qkv.typed_data();
  const float* bs = bias.typed_data();
  const float* ms = has_mask ? mask.typed_data() : nullptr;
  float* y = out->typed_data();
  const int64_t np = (k.n + 15) / 16 * 16;
  ParallelFor(pool, k.b * k.w, 4, [=](int64_t lo, int64_t hi) {
    std::vector<float> kt(static_cast<size_t>(k.d * np)), srow(static_cast<size_t>(np));
    for (int64_t bw = lo; bw < hi; ++bw) {
      const int64_t wi = bw % k.w;
      const float* xw = x + bw * k.n * 3 * k.c;
      const float* mw = ms ? ms + wi * k.n * k.n : nullptr;
      float* yw = y + bw * k.n * k.c;
      switch (np / 16) {
        case 4: Window<4>(k, xw, bs, mw, scale, yw, kt.data(), srow.data()); break;
        case 9: Window<9>(k, xw, bs, mw, scale, yw, kt.data(), srow.data()); break;
        default: Window<0>(k, xw, bs, mw, scale, yw, kt.data(), srow.data()); break;
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SemsamWindowAttention, WindowAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("has_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>());
