// Loop primitives shared by the CPU kernels: short reductions in a fixed order, the
// accumulation dtype, divup. Everything force-inlined, so it vectorises for the instruction set of
// the task loop that calls it (cpu/isa.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstddef>
#include <cstdint>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// A scratch buffer that a thread keeps between calls (declare it thread_local), grown on
// demand, its contents not kept when it grows. From 128 KiB on it is aligned to 2 MiB and,
// on Linux, offered to transparent huge pages (MADV_HUGEPAGE; with THP `never` it stays on
// 4 KiB pages). On 4 KiB pages the physical pages, and so the L2 sets the buffer maps to,
// change with every allocation: two identical builds of the cluster backward in one process
// differed by up to 13 %; on a 2 MiB page its DV scratch made the backward 7-13 % faster at
// B=32, L=25, N=32 and 0-11 % at the sweep shapes (benchmarks/NOTES.md, eleventh session).
// The price: up to 2 MiB per thread.
template <typename T>
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { release(); }

  // At least n elements, uninitialised after a growth.
  T* get(int64_t n) {
    const size_t bytes = static_cast<size_t>(n) * sizeof(T);
    if (bytes > bytes_) {
      release();
      const bool huge = bytes >= kHugeFrom;
      align_ = huge ? kHugePage : 64;
      bytes_ = (bytes + align_ - 1) / align_ * align_;
      data_ = static_cast<T*>(::operator new(bytes_, std::align_val_t(align_)));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (huge) madvise(data_, bytes_, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    }
    return data_;
  }

 private:
  static constexpr size_t kHugePage = size_t(2) << 20, kHugeFrom = size_t(128) << 10;
  void release() {
    if (data_ != nullptr) ::operator delete(data_, std::align_val_t(align_));
    data_ = nullptr;
    bytes_ = 0;
  }
  T* data_ = nullptr;
  size_t bytes_ = 0, align_ = 64;
};

}  // namespace attnpool
