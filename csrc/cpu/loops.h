// Loop primitives shared by the CPU kernels: short reductions in a fixed order, the
// accumulation dtype, divup. Everything force-inlined, so it vectorises for the instruction set of
// the task loop that calls it (cpu/isa.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace attnpool {

// ceil(a / b) for a >= 0, b > 0: the number of chunks of b that cover a.
inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The dtype sums are kept in: float64 for float64, else float32.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Reductions of short rows (n-contiguous channel rows, n = 49 typically): kLanes independent
// sums stay in registers (a single running sum would serialise on the add latency), the tail
// is one scalar sum, and the lanes are folded by a constant tree. A fixed order that does not
// depend on the SIMD width.
template <int W, typename T>
C10_ALWAYS_INLINE void fold_lanes(T* acc) {
  if constexpr (W > 0) {
    for (int l = 0; l < W; ++l) acc[l] += acc[l + W];
    fold_lanes<W / 2>(acc);
  }
}

// sum_k x[k] y[k]
template <typename T>
C10_ALWAYS_INLINE T dot_short(int64_t m, const T* C10_RESTRICT x, const T* C10_RESTRICT y) {
  constexpr int kLanes = 64 / sizeof(T);
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= m; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[k + l] * y[k + l];
  T tail = 0;
  for (; k < m; ++k) tail += x[k] * y[k];
  fold_lanes<kLanes / 2>(acc);
  return acc[0] + tail;
}

// sum_k x[k]
template <typename T>
C10_ALWAYS_INLINE T sum_short(int64_t m, const T* x) {
  constexpr int kLanes = 64 / sizeof(T);
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= m; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[k + l];
  T tail = 0;
  for (; k < m; ++k) tail += x[k];
  fold_lanes<kLanes / 2>(acc);
  return acc[0] + tail;
}

}  // namespace attnpool
