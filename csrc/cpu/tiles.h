// Register-tiled products for the CPU kernels, compiled into each instruction set's copy of
// a task loop (cpu/isa.h: everything here is force-inlined; kVec is the register width in
// bytes, 64 / 32 / 16 for AVX-512 / AVX2 / the portable path):
//   gemm  c = a b     (a read with any strides; b packed per column block and chunk of K)
//   dots  d = p q^T   (rows of p and q contiguous along the sum: one register of partial sums
//                      per element, folded pairwise at the end)
// Every element is one sum in a fixed order that depends neither on the tiling nor on the
// split into tasks, so the results do not depend on the thread count.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__GNUC__)
#define ATTNPOOL_INLINE inline __attribute__((always_inline))
// Fully unrolls a loop over tile rows/registers, so that its arrays of registers become
// registers: GCC leaves some of them as rolled loops over stack arrays otherwise (the AVX2 dot
// tile did, 3x slower than its AVX-512 twin).
#define ATTNPOOL_UNROLL _Pragma("GCC unroll 16")
#else
#define ATTNPOOL_INLINE inline
#define ATTNPOOL_UNROLL
#endif

namespace attnpool {

// A kVec-byte SIMD register of T. The tiles below keep arrays of them as accumulators; written
// as plain loops, GCC leaves such arrays in memory (or adds a round trip through it), so they
// use the GCC/Clang vector extension. Elementwise loops elsewhere are plain C++ that vectorises.
#if defined(__GNUC__)
template <int kVec, typename T>
struct Simd {
  typedef T type __attribute__((vector_size(kVec)));
};
#else
template <int kVec, typename T>
struct Simd {
  struct type {
    T v[kVec / sizeof(T)];
    T operator[](int l) const { return v[l]; }
    type& operator+=(const type& o) {
      for (int l = 0; l < kVec / int(sizeof(T)); ++l) v[l] += o.v[l];
      return *this;
    }
    friend type operator*(const type& x, const type& y) {
      type z;
      for (int l = 0; l < kVec / int(sizeof(T)); ++l) z.v[l] = x.v[l] * y.v[l];
      return z;
    }
    friend type operator+(const type& x, T y) {
      type z;
      for (int l = 0; l < kVec / int(sizeof(T)); ++l) z.v[l] = x.v[l] + y;
      return z;
    }
    friend type operator*(T x, const type& y) {
      type z;
      for (int l = 0; l < kVec / int(sizeof(T)); ++l) z.v[l] = x * y.v[l];
      return z;
    }
  };
};
#endif

// One register of T from p (no alignment required): a plain vector load, where a memcpy into
// the register's array is sometimes lowered as a copy through the stack.
template <int kVec, typename T>
ATTNPOOL_INLINE typename Simd<kVec, T>::type load(const T* p) {
#if defined(__GNUC__)
  typedef T unaligned __attribute__((vector_size(kVec), aligned(alignof(T)), may_alias));
  return *reinterpret_cast<const unaligned*>(p);
#else
  typename Simd<kVec, T>::type v;
  std::memcpy(&v, p, kVec);
  return v;
#endif
}

// Tile shapes for kVec-byte registers (64: AVX-512 with 32 registers; 32: AVX2 and 16: SSE,
// with 16). A gemm tile holds kRows x kVecs accumulator registers, a dot tile kRows x kDotCols.
template <int kVec, typename T>
struct Tiling {
  static constexpr int kLanes = kVec / sizeof(T);
  static constexpr int kRows = kVec == 64 ? 8 : kVec == 32 ? 6 : 4;
  static constexpr int kVecs = 2;
  // Wider tiles where b is many registers wide and K short (the cluster's grad_x, K = 2N):
  // AVX-512's 32 registers hold 6 x 4, where each broadcast of a feeds 4 FMAs rather than 2.
  // One thread (benchmarks/tiles_bench.cpp, fp32, F=1024): 3-5 % over 8 x 2, 2 % behind at
  // N=128; in the op the difference is smaller than two copies of one build differ by
  // (benchmarks/NOTES.md, "Larger AVX-512 tiles"). The scores in 14 x 2 and V in 6 x 4 gained
  // nothing in the op; on AVX2 (16 registers) no other shape was ahead on every product.
  static constexpr int kWideRows = kVec == 64 ? 6 : kRows;
  static constexpr int kWideVecs = kVec == 64 ? 4 : kVecs;
  static constexpr int kDotRows = kVec == 64 ? 4 : 3;
  static constexpr int kDotCols = kVec == 64 ? 6 : 4;
};

// Pairwise fold of kLanes partial sums.
template <int kLanes, typename T>
ATTNPOOL_INLINE T fold(T* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// One register to dst (no alignment required), converted to Out. A plain vector store, for
// the reason of load(): GCC copied the tiles' registers through the stack with memcpy.
template <int kVec, typename T, typename Out>
ATTNPOOL_INLINE void store(Out* dst, const typename Simd<kVec, T>::type& v) {
  if constexpr (std::is_same_v<T, Out>) {
#if defined(__GNUC__)
    typedef T unaligned __attribute__((vector_size(kVec), aligned(alignof(T)), may_alias));
    *reinterpret_cast<unaligned*>(dst) = v;
#else
    std::memcpy(dst, &v, kVec);
#endif
  } else {
    for (int l = 0; l < kVec / int(sizeof(T)); ++l) dst[l] = static_cast<Out>(v[l]);
  }
}

// Pairwise fold of a register's lanes (the order of fold<kLanes>), by halves of the register.
template <int kVec, typename T>
ATTNPOOL_INLINE T fold_vec(const typename Simd<kVec, T>::type& v) {
  if constexpr (kVec == int(sizeof(T))) {
    return v[0];
  } else {
    using half = typename Simd<kVec / 2, T>::type;
    half lo, hi;
    std::memcpy(&lo, &v, kVec / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + kVec / 2, kVec / 2);
    lo += hi;
    return fold_vec<kVec / 2, T>(lo);
  }
}

// acc[r][j] = sum_{k<K} a(r, k) b[k*ldb + j*lanes ...] for r < R and NV registers of lanes,
// with a(r, k) = a[r*ars + k*aks], in registers for the caller's epilogue. Each load of b
// feeds R FMAs.
template <int kVec, int R, int NV, typename T>
ATTNPOOL_INLINE void tile_products(int64_t K, const T* a, int64_t ars, int64_t aks, const T* b,
                                   int64_t ldb, typename Simd<kVec, T>::type (&acc)[R][NV],
                                   const T* init = nullptr, int64_t ldi = 0) {
  using vec = typename Simd<kVec, T>::type;
  constexpr int V = kVec / sizeof(T);
  ATTNPOOL_UNROLL for (int r = 0; r < R; ++r)
    ATTNPOOL_UNROLL for (int j = 0; j < NV; ++j)
      acc[r][j] = init == nullptr ? vec{} : load<kVec>(init + r * ldi + j * V);
  for (int64_t k = 0; k < K; ++k) {
    vec bk[NV];
    ATTNPOOL_UNROLL for (int j = 0; j < NV; ++j) bk[j] = load<kVec>(b + k * ldb + j * V);
    ATTNPOOL_UNROLL for (int r = 0; r < R; ++r) {
      const T ark = a[r * ars + k * aks];
      ATTNPOOL_UNROLL for (int j = 0; j < NV; ++j) acc[r][j] += ark * bk[j];
    }
  }
}

// c(r, w) = sum_{k<K} a(r, k) b[k*ldb + w] for r < R and w < NV registers of lanes, stored
// converted to Out.
template <int kVec, int R, int NV, typename T, typename Out>
ATTNPOOL_INLINE void gemm_tile(int64_t K, const T* a, int64_t ars, int64_t aks, const T* b,
                               int64_t ldb, Out* c, int64_t ldc, bool add = false) {
  using vec = typename Simd<kVec, T>::type;
  constexpr int V = kVec / sizeof(T);
  vec acc[R][NV];
  if constexpr (std::is_same_v<T, Out>) {
    tile_products<kVec, R, NV>(K, a, ars, aks, b, ldb, acc, add ? c : nullptr, ldc);
  } else {
    tile_products<kVec, R, NV>(K, a, ars, aks, b, ldb, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store<kVec, T>(c + r * ldc + j * V, acc[r][j]);
}

// R rows of c over `cols` columns: tiles of NV registers, then of one, then a scalar rest.
template <int kVec, int R, int NV, typename T, typename Out>
ATTNPOOL_INLINE void gemm_panel(int64_t cols, int64_t K, const T* a, int64_t ars, int64_t aks,
                                const T* b, int64_t ldb, Out* c, int64_t ldc, bool add = false) {
  constexpr int V = kVec / sizeof(T);
  int64_t w = 0;
  for (; w + NV * V <= cols; w += NV * V)
    gemm_tile<kVec, R, NV>(K, a, ars, aks, b + w, ldb, c + w, ldc, add);
  for (; w + V <= cols; w += V)
    gemm_tile<kVec, R, 1>(K, a, ars, aks, b + w, ldb, c + w, ldc, add);
  for (; w < cols; ++w)
    for (int r = 0; r < R; ++r) {
      T acc = add ? static_cast<T>(c[r * ldc + w]) : T(0);
      for (int64_t k = 0; k < K; ++k) acc += a[r * ars + k * aks] * b[k * ldb + w];
      c[r * ldc + w] = static_cast<Out>(acc);
    }
}

// gemm_panel with R a runtime value r <= R (one switch per panel).
template <int kVec, int R, int NV, typename T, typename Out>
ATTNPOOL_INLINE void gemm_panel_of(int64_t r, int64_t cols, int64_t K, const T* a, int64_t ars,
                                   int64_t aks, const T* b, int64_t ldb, Out* c, int64_t ldc,
                                   bool add = false) {
  if constexpr (R > 1) {
    if (r < R)
      return gemm_panel_of<kVec, R - 1, NV>(r, cols, K, a, ars, aks, b, ldb, c, ldc, add);
  }
  gemm_panel<kVec, R, NV>(cols, K, a, ars, aks, b, ldb, c, ldc, add);
}

// Rows of a task split into `parts` runs of near-equal size: a remainder row alone would run
// as a 1-row tile, bound by latency and loads (25 frames: 7+6+6+6 rather than 8+8+8+1).
ATTNPOOL_INLINE int64_t balanced_part(int64_t rows, int64_t parts, int64_t i) {
  return rows / parts + (i < rows % parts);
}

// c[rows, cols] = a[rows, K] b[K, cols], by panels of at most R rows.
// With several panels, each block of b's columns (one tile wide) is first packed into a
// contiguous buffer that every panel then streams: b's rows are often 4 KiB apart
// (F = 1024 floats), so the tile's K lines of b would share one L1 set and come from L2 on
// every pass (the AVX2 tiles, with half the rows per pass of AVX-512's, suffered most).
// A long K is packed a chunk at a time that stays in L1, each chunk's products added to c
// (measured on a sum over 800 rows of b: 10-13 % faster than one pass).
// pack_b = false skips the copy where b's rows are short and adjacent (a narrow b laid out
// for the call, as the cluster's transposed scoring weight) or spaced off 4 KiB multiples
// and few enough to stay in cache between panels (the cluster's padded DV rows).
// Every element is one in-order sum over k whatever the panel, block or chunk (between
// chunks c holds the running sum in T, exactly as the register did), so none changes a bit.
// add: c += a b (the caller's own chunks of a longer sum).
template <int kVec, int R, int NV, typename T, typename Out>
ATTNPOOL_INLINE void gemm(int64_t rows, int64_t cols, int64_t K, const T* a, int64_t ars,
                          int64_t aks, const T* b, int64_t ldb, Out* c, int64_t ldc,
                          bool pack_b = true, bool add = false) {
  constexpr int W = NV * kVec / sizeof(T);
  const int64_t panels = (rows + R - 1) / R;
  int64_t w = 0;
  // Chunks of 16 KiB (8 and 16 measured alike, 32 slower). c can hold a running sum only
  // in T: for another Out, K is packed whole while it fits 256 KiB (L2), else unpacked.
  constexpr bool kChunked = std::is_same_v<T, Out>;
  const int64_t chunk = kChunked ? 16 * 1024 / (W * static_cast<int64_t>(sizeof(T))) : K;
  if (pack_b && panels > 1 && ldb != W && K > 0 &&  // K = 0: the tiles below write zeros
      (kChunked || K * W * static_cast<int64_t>(sizeof(T)) <= 256 * 1024)) {
    thread_local std::vector<T> pack;
    if (static_cast<int64_t>(pack.size()) < chunk * W) pack.resize(chunk * W);
    T* pk = pack.data();
    for (; w + W <= cols; w += W) {
      for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t kc = std::min(chunk, K - k0);
        for (int64_t k = 0; k < kc; ++k)
          std::memcpy(pk + k * W, b + (k0 + k) * ldb + w, W * sizeof(T));
        for (int64_t i = 0, r = 0; i < panels; ++i) {
          const int64_t n = balanced_part(rows, panels, i);
          gemm_panel_of<kVec, R, NV>(n, W, kc, a + r * ars + k0 * aks, ars, aks, pk, W,
                                     c + r * ldc + w, ldc, add || k0 > 0);
          r += n;
        }
      }
    }
  }
  if (w == cols) return;
  for (int64_t i = 0, r = 0; i < panels; ++i) {
    const int64_t n = balanced_part(rows, panels, i);
    gemm_panel_of<kVec, R, NV>(n, cols - w, K, a + r * ars, ars, aks, b + w, ldb,
                               c + r * ldc + w, ldc, add);
    r += n;
  }
}

// d[r*ldd + s] = sum_{k<K} p[r*ldp + k] q[s*ldq + k] for r < R, s < S: R*S dot products that
// share their loads, one register of partial sums each, folded pairwise at the end.
template <int kVec, int R, int S, typename T>
ATTNPOOL_INLINE void dot_tile(int64_t K, const T* p, int64_t ldp, const T* q, int64_t ldq, T* d,
                              int64_t ldd) {
  using vec = typename Simd<kVec, T>::type;
  constexpr int V = kVec / sizeof(T);
  vec acc[R][S] = {};
  int64_t k = 0;
  for (; k + V <= K; k += V) {
    vec pv[R], qv[S];
    ATTNPOOL_UNROLL for (int r = 0; r < R; ++r) pv[r] = load<kVec>(p + r * ldp + k);
    ATTNPOOL_UNROLL for (int s = 0; s < S; ++s) qv[s] = load<kVec>(q + s * ldq + k);
    ATTNPOOL_UNROLL for (int r = 0; r < R; ++r)
      ATTNPOOL_UNROLL for (int s = 0; s < S; ++s) acc[r][s] += pv[r] * qv[s];
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) {
      T tail = 0;
      for (int64_t j = k; j < K; ++j) tail += p[r * ldp + j] * q[s * ldq + j];
      d[r * ldd + s] = fold_vec<kVec, T>(acc[r][s]) + tail;
    }
}

// dot_tile with R, S runtime values r <= R, s <= S.
template <int kVec, int R, int S, typename T>
ATTNPOOL_INLINE void dot_tile_of(int64_t r, int64_t s, int64_t K, const T* p, int64_t ldp,
                                 const T* q, int64_t ldq, T* d, int64_t ldd) {
  if constexpr (R > 1) {
    if (r < R) return dot_tile_of<kVec, R - 1, S>(r, s, K, p, ldp, q, ldq, d, ldd);
  }
  if constexpr (S > 1) {
    if (s < S) return dot_tile_of<kVec, R, S - 1>(r, s, K, p, ldp, q, ldq, d, ldd);
  }
  dot_tile<kVec, R, S>(K, p, ldp, q, ldq, d, ldd);
}

// d[rows, cols] = p[rows, K] q[cols, K]^T, by tiles of at most R x S (balanced like gemm's).
template <int kVec, int R, int S, typename T>
ATTNPOOL_INLINE void dots(int64_t rows, int64_t cols, int64_t K, const T* p, int64_t ldp,
                          const T* q, int64_t ldq, T* d, int64_t ldd) {
  const int64_t rparts = (rows + R - 1) / R, sparts = (cols + S - 1) / S;
  for (int64_t i = 0, r = 0; i < rparts; ++i) {
    const int64_t nr = balanced_part(rows, rparts, i);
    for (int64_t j = 0, c = 0; j < sparts; ++j) {
      const int64_t nc = balanced_part(cols, sparts, j);
      dot_tile_of<kVec, R, S>(nr, nc, K, p + r * ldp, ldp, q + c * ldq, ldq, d + r * ldd + c, ldd);
      c += nc;
    }
    r += nr;
  }
}

}  // namespace attnpool
