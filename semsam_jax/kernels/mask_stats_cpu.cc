// Threshold counts of bilinearly upsampled mask logits, for XLA:CPU (typed FFI).
//
//   logits      (N, h, w)  float32 low-resolution mask logits
//   image_hw    (2,)       int32 (H, W): only output pixels y < H, x < W count
//   thresholds  (K,)       float32
//   counts      (N, K)     int32: pixels of the upsampled mask with value > t_k
//
// Attribute `factor` (int64): the output canvas is (factor * h, factor * w).
// Upsampling is bilinear with align_corners=False and clamped ends, as
// semsam_jax.inference.automatic.upsample_bilinear computes it: output
// f * i + r samples i + d_r, d_r = (r + 0.5) / f - 0.5, a two-tap blend of
// x[i] with its left (d_r < 0) or right neighbour (clamped at the ends), first
// along rows, then along columns, each tap as weight * value (no fused
// multiply-add, so the values are those of the XLA formulation).
//
// The upsampled mask is never stored: each output row is the vertical blend
// of two low-resolution rows, then, per column phase, a horizontal blend of
// neighbours of that line, compared against every threshold (contiguous,
// vectorisable loops).  Masks are split over XLA's intra-op thread pool
// (kernel_common.h).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "kernel_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using semsam_kernels::ParallelFor;

// One output position of an axis: out = wa * x[ia] + wb * x[ib].
struct Tap {
  int64_t ia, ib;
  float wa, wb;
};

// Phase r of an axis upsampled by f: blend input i with its left (off = -1)
// or right (off = +1) neighbour, weights (wa, wb) in that written order.
struct Phase {
  int off;  // -1: blend with the left neighbour, +1: with the right one
  float wa, wb;
};

std::vector<Phase> Phases(int64_t f) {
  std::vector<Phase> ph;
  for (int64_t r = 0; r < f; ++r) {
    const double d = (r + 0.5) / static_cast<double>(f) - 0.5;
    if (d < 0) {
      ph.push_back({-1, static_cast<float>(-d), static_cast<float>(1.0 + d)});
    } else {
      ph.push_back({+1, static_cast<float>(1.0 - d), static_cast<float>(d)});
    }
  }
  return ph;
}

// Output `o` of an axis of n inputs upsampled by f.
inline Tap AxisTap(int64_t o, int64_t f, int64_t n, const std::vector<Phase>& ph) {
  const int64_t i = o / f;
  const Phase& p = ph[o % f];
  const int64_t nb = std::min(std::max<int64_t>(i + p.off, 0), n - 1);
  // Left blends are written (left, centre), right ones (centre, right), as in
  // the XLA formulation.
  if (p.off < 0) return Tap{nb, i, p.wa, p.wb};
  return Tap{i, nb, p.wa, p.wb};
}

void CountMasks(const float* logits, int64_t h, int64_t w, int64_t f, int64_t valid_h,
                int64_t valid_w, const float* thr, int64_t k, int32_t* counts,
                int64_t lo, int64_t hi) {
  const std::vector<Phase> ph = Phases(f);
  // vpad[1 + j]: the vertical blend of the current output row at low-res column
  // j; vpad[0] and vpad[w + 1] repeat the end values (clamped neighbours).
  std::vector<float> vpad(static_cast<size_t>(w + 2));
  std::vector<float> line(static_cast<size_t>(w));
  std::vector<int64_t> n_valid(f);  // outputs f*j + r < valid_w  <=>  j < n_valid[r]
  for (int64_t r = 0; r < f; ++r) {
    n_valid[r] = valid_w > r ? std::min<int64_t>(w, (valid_w - r + f - 1) / f) : 0;
  }
  const int64_t rows_out = std::min<int64_t>(valid_h, f * h);
  std::vector<int64_t> acc(k);
  float* vl = vpad.data() + 1;
  for (int64_t m = lo; m < hi; ++m) {
    const float* x = logits + m * h * w;
    std::fill(acc.begin(), acc.end(), 0);
    for (int64_t yo = 0; yo < rows_out; ++yo) {
      const Tap t = AxisTap(yo, f, h, ph);
      const float* a = x + t.ia * w;
      const float* b = x + t.ib * w;
      for (int64_t j = 0; j < w; ++j) vl[j] = t.wa * a[j] + t.wb * b[j];
      vpad[0] = vl[0];
      vpad[w + 1] = vl[w - 1];
      for (int64_t r = 0; r < f; ++r) {
        const Phase& p = ph[r];
        const int64_t n = n_valid[r];
        const float* left = vpad.data() + (p.off < 0 ? 0 : 1);   // first tap
        const float* right = left + 1;                             // second tap
        for (int64_t j = 0; j < n; ++j) line[j] = p.wa * left[j] + p.wb * right[j];
        for (int64_t q = 0; q < k; ++q) {
          const float tq = thr[q];
          int64_t c = 0;
          for (int64_t j = 0; j < n; ++j) c += line[j] > tq ? 1 : 0;
          acc[q] += c;
        }
      }
    }
    for (int64_t q = 0; q < k; ++q) counts[m * k + q] = static_cast<int32_t>(acc[q]);
  }
}

ffi::Error MaskCountsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                          ffi::Buffer<ffi::S32> image_hw, ffi::Buffer<ffi::F32> thresholds,
                          int64_t factor, ffi::ResultBuffer<ffi::S32> counts) {
  auto d = logits.dimensions();
  if (d.size() != 3) return ffi::Error::InvalidArgument("mask counts: logits must be (N, h, w)");
  if (image_hw.element_count() != 2) {
    return ffi::Error::InvalidArgument("mask counts: image_hw must hold (H, W)");
  }
  if (factor < 1) return ffi::Error::InvalidArgument("mask counts: factor must be >= 1");
  const int64_t n = d[0], h = d[1], w = d[2];
  const int64_t k = thresholds.element_count();
  if (static_cast<int64_t>(counts->element_count()) != n * k) {
    return ffi::Error::InvalidArgument("mask counts: output must be (N, K)");
  }
  const int32_t* hw = image_hw.typed_data();
  const int64_t valid_h = std::max<int64_t>(0, hw[0]);
  const int64_t valid_w = std::max<int64_t>(0, std::min<int64_t>(hw[1], factor * w));
  const float* x = logits.typed_data();
  const float* thr = thresholds.typed_data();
  int32_t* out = counts->typed_data();
  if (h == 0 || w == 0) {
    std::fill(out, out + n * k, 0);
    return ffi::Error::Success();
  }
  ParallelFor(pool, n, 1, [=](int64_t lo, int64_t hi) {
    CountMasks(x, h, w, factor, valid_h, valid_w, thr, k, out, lo, hi);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SemsamMaskCounts, MaskCountsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("factor")
                                  .Ret<ffi::Buffer<ffi::S32>>());
