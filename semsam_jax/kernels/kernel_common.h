// Shared helpers of the native CPU kernels: work splitting on XLA's intra-op
// thread pool and 16-lane float vectors (one AVX-512 register, two AVX2 ones,
// four SSE/NEON ones; see "vectors" below).

#ifndef SEMSAM_JAX_KERNELS_KERNEL_COMMON_H_
#define SEMSAM_JAX_KERNELS_KERNEL_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace semsam_kernels {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------- threading
//
// The calling thread takes part, chunks are claimed from an atomic counter
// and the caller only waits for chunks another thread has already started,
// so a kernel never waits for a pool thread to become free (no deadlock when
// the pool is busy with other work).

struct ForState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t num_chunks = 0;
};

template <typename F>
void RunChunks(ForState* st, int64_t n, int64_t grain, const F& f) {
  while (true) {
    const int64_t c = st->next.fetch_add(1, std::memory_order_relaxed);
    if (c >= st->num_chunks) return;
    const int64_t lo = c * grain;
    f(lo, std::min(n, lo + grain));
    st->done.fetch_add(1, std::memory_order_release);
  }
}

// Calls f(lo, hi) on disjoint ranges covering [0, n), `grain` items each.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, F f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t num_chunks = (n + grain - 1) / grain;
  const int64_t threads = pool.num_threads();
  if (threads <= 1 || num_chunks <= 1) {
    f(0, n);
    return;
  }
  auto st = std::make_shared<ForState>();
  st->num_chunks = num_chunks;
  // Helpers copy `f` (it only holds references to buffers that outlive every
  // chunk) and the shared state; one that starts after the last chunk was
  // claimed returns without touching anything else.
  const int64_t helpers = std::min(threads, num_chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([st, n, grain, f]() { RunChunks(st.get(), n, grain, f); });
  }
  RunChunks(st.get(), n, grain, f);
  while (st->done.load(std::memory_order_acquire) < num_chunks) std::this_thread::yield();
}

// ---------------------------------------------------------------- vectors
//
// F16 / I16 are 16 float / int32 lanes.  With AVX-512 each is one register
// (a plain GCC/Clang vector type).  Without it, GCC lowers 64-byte vector
// types piecewise, often lane by lane through memory (measured: 9-15x slower
// kernels on an AVX2 build), so there they are structs of the widest native
// vectors (two 8-lane AVX registers, four 16-byte SSE/NEON ones) with the
// same operators.  Every lane computes the same IEEE operations in the same
// order either way, so results do not depend on the ISA built for.  Vector
// selects are written Select(mask, a, b) (C++ cannot overload `?:`).

#define SEMSAM_INLINE inline __attribute__((always_inline))

#if defined(__AVX512F__)
#define SEMSAM_VECTOR_BYTES 64
#elif defined(__AVX__)
#define SEMSAM_VECTOR_BYTES 32
#else
#define SEMSAM_VECTOR_BYTES 16
#endif

#if SEMSAM_VECTOR_BYTES == 64

typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));

SEMSAM_INLINE F16 Select(I16 m, F16 a, F16 b) { return m ? a : b; }
SEMSAM_INLINE I16 Select(I16 m, I16 a, I16 b) { return m ? a : b; }
SEMSAM_INLINE I16 ToInt(F16 x) { return __builtin_convertvector(x, I16); }    // toward zero
SEMSAM_INLINE F16 ToFloat(I16 x) { return __builtin_convertvector(x, F16); }

#else

typedef float NativeF __attribute__((vector_size(SEMSAM_VECTOR_BYTES)));
typedef int32_t NativeI __attribute__((vector_size(SEMSAM_VECTOR_BYTES)));
constexpr int kVecLanes = SEMSAM_VECTOR_BYTES / 4;
constexpr int kVecParts = 16 / kVecLanes;

template <typename V, typename E>
struct Wide16 {
  V p[kVecParts];
  SEMSAM_INLINE E operator[](int i) const { return p[i / kVecLanes][i % kVecLanes]; }
};
struct F16 : Wide16<NativeF, float> {};
struct I16 : Wide16<NativeI, int32_t> {};

// Every helper below is forced inline: as ordinary calls the 64-byte structs
// travel through memory (and ExpNonPositive was even called through the PLT),
// which made the AVX2 build 7x slower than the AVX-512 one.
#define SEMSAM_WIDE_BINARY(T, R, OP)                                                   \
  SEMSAM_INLINE R operator OP(const T& a, const T& b) {                                \
    R r;                                                                               \
    for (int k = 0; k < kVecParts; ++k) r.p[k] = a.p[k] OP b.p[k];                     \
    return r;                                                                          \
  }
#define SEMSAM_WIDE_SCALAR(T, S, OP)                                                   \
  SEMSAM_INLINE T operator OP(const T& a, S b) {                                       \
    T r;                                                                               \
    for (int k = 0; k < kVecParts; ++k) r.p[k] = a.p[k] OP b;                          \
    return r;                                                                          \
  }                                                                                    \
  SEMSAM_INLINE T& operator OP##=(T& a, const T& b) {                                  \
    for (int k = 0; k < kVecParts; ++k) a.p[k] OP##= b.p[k];                           \
    return a;                                                                          \
  }
SEMSAM_WIDE_BINARY(F16, F16, +) SEMSAM_WIDE_BINARY(F16, F16, -)
SEMSAM_WIDE_BINARY(F16, F16, *) SEMSAM_WIDE_BINARY(F16, F16, /)
SEMSAM_WIDE_SCALAR(F16, float, +) SEMSAM_WIDE_SCALAR(F16, float, -)
SEMSAM_WIDE_SCALAR(F16, float, *) SEMSAM_WIDE_SCALAR(F16, float, /)
SEMSAM_WIDE_BINARY(F16, I16, <) SEMSAM_WIDE_BINARY(F16, I16, <=)
SEMSAM_WIDE_BINARY(F16, I16, >) SEMSAM_WIDE_BINARY(F16, I16, >=)
SEMSAM_WIDE_BINARY(I16, I16, +) SEMSAM_WIDE_BINARY(I16, I16, -)
SEMSAM_WIDE_BINARY(I16, I16, *) SEMSAM_WIDE_BINARY(I16, I16, &)
SEMSAM_WIDE_BINARY(I16, I16, |)
SEMSAM_WIDE_BINARY(I16, I16, <) SEMSAM_WIDE_BINARY(I16, I16, <=)
SEMSAM_WIDE_BINARY(I16, I16, >) SEMSAM_WIDE_BINARY(I16, I16, >=)
SEMSAM_WIDE_SCALAR(I16, int32_t, +) SEMSAM_WIDE_SCALAR(I16, int32_t, -)
SEMSAM_WIDE_SCALAR(I16, int32_t, *)
#undef SEMSAM_WIDE_BINARY
#undef SEMSAM_WIDE_SCALAR

SEMSAM_INLINE F16 operator-(const F16& a) {
  F16 r;
  for (int k = 0; k < kVecParts; ++k) r.p[k] = -a.p[k];
  return r;
}
SEMSAM_INLINE I16 operator<<(const I16& a, int s) {
  I16 r;
  for (int k = 0; k < kVecParts; ++k) r.p[k] = a.p[k] << s;
  return r;
}
SEMSAM_INLINE F16 Select(const I16& m, const F16& a, const F16& b) {
  F16 r;
  for (int k = 0; k < kVecParts; ++k) r.p[k] = m.p[k] ? a.p[k] : b.p[k];
  return r;
}
SEMSAM_INLINE I16 Select(const I16& m, const I16& a, const I16& b) {
  I16 r;
  for (int k = 0; k < kVecParts; ++k) r.p[k] = m.p[k] ? a.p[k] : b.p[k];
  return r;
}
SEMSAM_INLINE I16 ToInt(const F16& x) {                                    // toward zero
  I16 r;
  for (int k = 0; k < kVecParts; ++k) r.p[k] = __builtin_convertvector(x.p[k], NativeI);
  return r;
}
SEMSAM_INLINE F16 ToFloat(const I16& x) {
  F16 r;
  for (int k = 0; k < kVecParts; ++k) r.p[k] = __builtin_convertvector(x.p[k], NativeF);
  return r;
}

#endif  // SEMSAM_VECTOR_BYTES

SEMSAM_INLINE F16 Splat(float a) { return F16{} + a; }

// Loads and stores go part by part: one 64-byte memcpy into the struct was
// lowered to 16-byte moves through a stack temporary that the 32-byte loads
// then read back (a store-forwarding stall on every vector).
#if SEMSAM_VECTOR_BYTES == 64
template <typename V, typename E>
SEMSAM_INLINE V LoadVec(const E* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename E>
SEMSAM_INLINE void StoreVec(E* p, const V& v) { std::memcpy(p, &v, sizeof(v)); }
SEMSAM_INLINE F16 BitsToFloat(I16 x) { return (F16)x; }
#else
template <typename V, typename E>
SEMSAM_INLINE V LoadVec(const E* p) {
  V v;
  for (int k = 0; k < kVecParts; ++k) std::memcpy(&v.p[k], p + k * kVecLanes, SEMSAM_VECTOR_BYTES);
  return v;
}
template <typename V, typename E>
SEMSAM_INLINE void StoreVec(E* p, const V& v) {
  for (int k = 0; k < kVecParts; ++k) std::memcpy(p + k * kVecLanes, &v.p[k], SEMSAM_VECTOR_BYTES);
}
SEMSAM_INLINE F16 BitsToFloat(const I16& x) {
  F16 r;
  for (int k = 0; k < kVecParts; ++k) r.p[k] = (NativeF)x.p[k];
  return r;
}
#endif

SEMSAM_INLINE F16 Load16(const float* p) { return LoadVec<F16>(p); }
SEMSAM_INLINE void Store16(float* p, const F16& v) { StoreVec(p, v); }
SEMSAM_INLINE I16 LoadI16(const int32_t* p) { return LoadVec<I16>(p); }
SEMSAM_INLINE void StoreI16(int32_t* p, const I16& v) { StoreVec(p, v); }

SEMSAM_INLINE F16 Max16(F16 a, F16 b) { return Select(a > b, a, b); }

SEMSAM_INLINE float HMax(F16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}

SEMSAM_INLINE float HSum(F16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// floor() of values well inside the int32 range.
SEMSAM_INLINE I16 FloorI(F16 x) {
  const I16 t = ToInt(x);        // truncation toward zero
  return Select(ToFloat(t) > x, t - 1, t);
}

// exp(x) for x <= 0 (softmax after subtracting the maximum); inputs below
// -87.3 give 0.  Range reduction x = n ln2 + r, |r| <= ln2 / 2, the Cephes
// expf polynomial, then 2^n through the exponent bits (about 1 ulp).
SEMSAM_INLINE F16 ExpNonPositive(F16 x) {
  const F16 lo = Splat(-87.3f);
  const I16 underflow = x < lo;
  x = Select(x < lo, lo, x);
  const I16 n = FloorI(x * Splat(1.44269504088896341f) + Splat(0.5f));
  const F16 nf = ToFloat(n);
  F16 r = x - nf * Splat(0.693359375f);
  r = r - nf * Splat(-2.12194440e-4f);
  const F16 r2 = r * r;
  F16 p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * r2 + r + Splat(1.0f);
  const I16 bits = (n + 127) << 23;
  const F16 y = p * BitsToFloat(bits);
  return Select(underflow, F16{}, y);
}

}  // namespace semsam_kernels

#endif  // SEMSAM_JAX_KERNELS_KERNEL_COMMON_H_
