// Fused CPU kernels of attentional pooling (Girdhar & Ramanan 2017), factored core:
//   h[b,p,i] = sum_c wb[p,c] x[b,c,i] + bb[p]          z[b,p,c] = (1/n) sum_i h[b,p,i] x[b,c,i]
// and its backward (contract: attnpool.h); and the weighted pool, the same with h
// given (z only; backward grad_x = grad_z^T h / n, grad_h = grad_z x / n; contract in attnpool.h).
//
// Work is split into tasks = (sample, block of positions). A task reads its block of x from
// memory once and takes the second product (z after h; grad_wb after dh) from cache:
//   * n-contiguous x (NCHW): the block is [C, ni], channel rows of ni positions. h needs every
//     channel of a position before z can use it, so the block is sized to stay in cache (a
//     whole sample when it fits; see positions_per_block).
//   * C-contiguous x (NHWC): a position is a row of C channels; rows are taken kRows at a time
//     and both products done while they are in L1. The block is only a unit of work.
// Everything is computed in opmath (float, or double for double); half/bfloat16 rows are
// converted once, as they are read. Deterministic: no atomics, every sum in a fixed order, so
// the results are bitwise reproducible for a given shape, thread count and instruction set
// (the thread count sets how a small batch is split, and how many grad_wb/grad_bb partials
// are summed; the tiles and the 7x7 kernels fold their lanes in an order of their own).
#include "attnpool.h"
#include "cpu/isa.h"
#include "cpu/loops.h"
#include "cpu/tiles.h"
#include "layout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>


namespace attnpool {
namespace {

// ---------------------------------------------------------------- loop primitives

// sum_k x[k] y[k]. IEEE order forbids vectorising a single running sum, so kLanes independent
// sums (one cache line) are kept, the tail added lane-wise, and the lanes folded pairwise: the
// order of operations does not depend on the SIMD width.
template <typename T>
C10_ALWAYS_INLINE T dot(int64_t m, const T* C10_RESTRICT x, const T* C10_RESTRICT y) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= m; k += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[k + l] * y[k + l];
  for (int64_t l = 0; k < m; ++k, ++l) acc[l] += x[k] * y[k];
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// y[k] += sum_{r<R} a[r] x[r*ld + k]: R rows folded into one pass over y.
template <int R, typename T>
C10_ALWAYS_INLINE void axpy_rows(int64_t m, const T* a, const T* x, int64_t ld,
                                 T* C10_RESTRICT y) {
  for (int64_t k = 0; k < m; ++k) {
    T s = y[k];
    for (int r = 0; r < R; ++r) s += a[r] * x[r * ld + k];
    y[k] = s;
  }
}

// y[p*ldy + k] += sum_{r<rows} a[p*sa + r] x[r*ld + k] for every p < P: four rows of x per
// pass over y (4x fewer loads/stores of y), each used by every p while it is in L1.
template <typename T>
C10_ALWAYS_INLINE void gemv_t(int64_t m, int64_t rows, int64_t P, const T* a, int64_t sa,
                              const T* x, int64_t ld, T* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    for (int64_t p = 0; p < P; ++p) axpy_rows<4>(m, a + p * sa + r, x + r * ld, ld, y + p * ldy);
  for (; r < rows; ++r)
    for (int64_t p = 0; p < P; ++p) axpy_rows<1>(m, a + p * sa + r, x + r * ld, ld, y + p * ldy);
}

template <typename Src, typename Dst>
C10_ALWAYS_INLINE void convert(int64_t m, const Src* C10_RESTRICT src, Dst* C10_RESTRICT dst) {
  for (int64_t k = 0; k < m; ++k) dst[k] = static_cast<Dst>(src[k]);
}

// `rows` rows of `len` elements, `ld` apart, as opmath: the data itself when it already is
// opmath, else a converted copy packed in `scratch` (then ld becomes len).
template <typename T, typename scalar_t>
C10_ALWAYS_INLINE const T* as_opmath(const scalar_t* src, int64_t rows, int64_t len, int64_t& ld,
                                     T* scratch) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) convert(len, src + r * ld, scratch + r * len);
    ld = len;
    return scratch;
  }
}

// One row of grad_x: dst[k] = sum_p a[p*s] u[p*ld + k] + b[p*s] v[p*ld + k], in opmath.
template <typename T, typename scalar_t>
C10_ALWAYS_INLINE void grad_x_row(int64_t m, int64_t P, const T* a, const T* b, int64_t s,
                                  const T* u, const T* v, int64_t ld, T* tmp, scalar_t* dst) {
  T* acc = tmp;
  if constexpr (std::is_same_v<scalar_t, T>) acc = dst;  // accumulate in place
  for (int64_t k = 0; k < m; ++k) acc[k] = a[0] * u[k] + b[0] * v[k];
  for (int64_t p = 1; p < P; ++p) {
    const T ap = a[p * s], bp = b[p * s];
    const T* up = u + p * ld;
    const T* vp = v + p * ld;
    for (int64_t k = 0; k < m; ++k) acc[k] += ap * up[k] + bp * vp[k];
  }
  if constexpr (!std::is_same_v<scalar_t, T>) convert(m, tmp, dst);
}

// One row of an outer product: dst[k] = sum_p a[p*s] u[p*ld + k], in opmath.
template <typename T, typename scalar_t>
C10_ALWAYS_INLINE void outer_row(int64_t m, int64_t P, const T* a, int64_t s, const T* u,
                                 int64_t ld, T* tmp, scalar_t* dst) {
  T* acc = tmp;
  if constexpr (std::is_same_v<scalar_t, T>) acc = dst;  // accumulate in place
  const T a0 = a[0];
  for (int64_t k = 0; k < m; ++k) acc[k] = a0 * u[k];
  for (int64_t p = 1; p < P; ++p) {
    const T ap = a[p * s];
    const T* up = u + p * ld;
    for (int64_t k = 0; k < m; ++k) acc[k] += ap * up[k];
  }
  if constexpr (!std::is_same_v<scalar_t, T>) convert(m, tmp, dst);
}

// ---------------------------------------------------------------- geometry

struct Geometry {
  int64_t B, C, n, P;
  bool channels_last;  // x(b, c, i) at b*C*n + i*C + c, else at b*C*n + c*n + i
  int64_t block;       // positions per task
  int64_t blocks;      // tasks per sample
};

constexpr int64_t kRows = 4;  // C-contiguous: positions per L1-resident row group

// Positions per task. An n-contiguous block [C, ni] is read twice, so it should stay in L2
// (kBlockBytes of opmath) in between; but channel rows shorter than kMinRun positions stream
// poorly from memory (the prefetchers run past each row segment), which costs more than taking
// the second read from L3. Blocks are balanced over the sample, and a small batch is split
// further, into about kParallelTasks tasks, so that every thread gets work. That number is
// fixed, not the thread count: the split sets the order of the sums, so results would
// otherwise depend on the number of threads.
constexpr int64_t kParallelTasks = 16;

int64_t positions_per_block(int64_t B, int64_t C, int64_t n, int64_t opmath_bytes) {
  constexpr int64_t kBlockBytes = 1024 * 1024;
  constexpr int64_t kMinRun = 256;
  constexpr int64_t kAlign = 16;  // whole SIMD vectors per channel row
  const int64_t fit = std::max(kMinRun, kBlockBytes / (C * opmath_bytes) / kAlign * kAlign);
  const int64_t blocks = std::min(std::max(divup(n, fit), divup(kParallelTasks, B)),
                                  divup(n, kAlign));
  return std::min(n, divup(divup(n, blocks), kAlign) * kAlign);
}

// x in one of the two layouts the kernels read in place (layout.h).
Geometry make_geometry(at::Tensor& x, int64_t P) {
  const int64_t B = x.size(0), C = x.size(1), n = x.size(2);
  const bool channels_last = bcn_channels_last(x);
  const int64_t block = positions_per_block(B, C, n, x.scalar_type() == at::kDouble ? 8 : 4);
  return {B, C, n, P, channels_last, block, divup(n, block)};
}

void check_inputs(const at::Tensor& x, const at::Tensor& wb) {
  TORCH_CHECK(x.device().is_cpu() && wb.device().is_cpu(),
              "attentional_pooling cpu: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 3, "attentional_pooling cpu: x must be [B, C, n], got ", x.sizes());
  TORCH_CHECK(wb.dim() == 2 && wb.size(1) == x.size(1),
              "attentional_pooling cpu: wb must be [P, C=", x.size(1), "], got ", wb.sizes());
  TORCH_CHECK(wb.scalar_type() == x.scalar_type(),
              "attentional_pooling cpu: wb must have x's dtype ", x.scalar_type());
}

// ---------------------------------------------------------------- z of a forward task

// Where a task's share of z[b] (unscaled) accumulates: the task's zpart row when a sample
// spans several tasks (finish_z sums them), else a zeroed per-thread buffer that end_task
// scales straight into z, which saves the partials' round trip through memory.
template <typename T>
T* begin_task(const Geometry& g, T* zpart, std::vector<T>& local, int64_t t) {
  if (g.blocks > 1) return zpart + t * g.P * g.C;
  std::fill(local.begin(), local.end(), T(0));
  return local.data();
}

template <typename scalar_t, typename T>
void end_task(const Geometry& g, const std::vector<T>& local, scalar_t* z, int64_t t) {
  if (g.blocks > 1) return;
  const int64_t PC = g.P * g.C;
  const T inv_n = T(1) / static_cast<T>(g.n);
  for (int64_t e = 0; e < PC; ++e) z[t * PC + e] = static_cast<scalar_t>(local[e] * inv_n);
}

// z[b] = (1/n) * sum of the sample's block partials, in block order (samples of several tasks).
template <typename scalar_t>
void finish_z(const Geometry& g, const at::opmath_type<scalar_t>* zpart, scalar_t* z) {
  using T = at::opmath_type<scalar_t>;
  if (g.blocks == 1) return;
  const int64_t PC = g.P * g.C;
  const T inv_n = T(1) / static_cast<T>(g.n);
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> acc(PC);
    for (int64_t b = b0; b < b1; ++b) {
      const T* part = zpart + b * g.blocks * PC;
      std::copy_n(part, PC, acc.data());
      for (int64_t k = 1; k < g.blocks; ++k)
        for (int64_t e = 0; e < PC; ++e) acc[e] += part[k * PC + e];
      for (int64_t e = 0; e < PC; ++e) z[b * PC + e] = static_cast<scalar_t>(acc[e] * inv_n);
    }
  });
}

// zpart for finish_z: only when a sample spans several tasks.
at::Tensor z_partials(const Geometry& g, const at::Tensor& x) {
  if (g.blocks == 1) return at::Tensor();
  return at::zeros({g.B * g.blocks, g.P, g.C}, x.options().dtype(opmath_dtype(x.scalar_type())));
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}


// ---------------------------------------------------------------- attentional backward

// grad_x = h (x) grad_z / n + dh (x) wb needs no x: a task reads its block of x for dh (first
// read) and grad_wb (second, from cache) and writes its block of grad_x. Groups [k0, k1): group
// k owns a fixed contiguous range of tasks and its own grad_wb/grad_bb partial.
template <typename scalar_t>
struct BackwardJob {
  using T = at::opmath_type<scalar_t>;
  Geometry g;
  int64_t groups;
  const scalar_t* x;
  const scalar_t* h;       // [B, P, n]
  const T* grad_h;         // [B, P, n], opmath
  const T* gz;             // [B, P, C], grad_z / n
  const T* w;              // [P, C]
  scalar_t* grad_x;        // x's layout
  T* wb_parts;             // [groups, P, C], zero-filled
  T* bb_parts;             // [groups, P], zero-filled

  template <int kVec>
  C10_ALWAYS_INLINE void run(int64_t k0, int64_t k1) const {
    using Tile = Tiling<kVec, T>;
    const int64_t C = g.C, n = g.n, P = g.P, PC = P * C, tasks = g.B * g.blocks;
    constexpr bool kConvert = !std::is_same_v<scalar_t, T>;
    const int64_t rows = g.channels_last ? kRows : g.block;
    // channels-last: h and dh of a row group; n-contiguous: [h; dh] of the block [2P, ni] and
    // [gz; wb] [2P, C], the two factors of grad_x (wb copied once; the gz rows first hold the
    // block's grad_wb [P, C])
    const bool cl = g.channels_last;
    std::vector<T> hb(cl ? P * rows : 0), dh(cl ? P * rows : 0);
    std::vector<T> tmp(cl ? std::max(C, g.block) : 0);
    std::vector<T> hd(cl ? 0 : 2 * P * rows), gw(cl ? 0 : 2 * PC);
    if (!cl) std::copy_n(w, PC, gw.data() + PC);
    std::vector<T> xs(kConvert ? C * rows : 0);
    for (int64_t k = k0; k < k1; ++k) {
      T* gwb = wb_parts + k * PC;
      T* gbb = bb_parts + k * P;
      for (int64_t t = tasks * k / groups; t < tasks * (k + 1) / groups; ++t) {
        const int64_t b = t / g.blocks, i0 = (t % g.blocks) * g.block;
        const int64_t ni = std::min(g.block, n - i0);
        const scalar_t* xb = x + b * C * n;
        const scalar_t* hin = h + b * P * n;
        const T* ghin = grad_h + b * P * n;
        const T* gzb = gz + b * PC;
        scalar_t* gxb = grad_x + b * C * n;
        if (g.channels_last) {
          for (int64_t i = i0; i < i0 + ni; i += kRows) {
            const int64_t nr = std::min(kRows, i0 + ni - i);
            int64_t ld = C;
            const T* xr = as_opmath(xb + i * C, nr, C, ld, xs.data());
            for (int64_t p = 0; p < P; ++p)
              for (int64_t r = 0; r < nr; ++r) {
                const T d = static_cast<T>(ghin[p * n + i + r]) +
                            dot(C, gzb + p * C, xr + r * ld);
                dh[p * kRows + r] = d;
                hb[p * kRows + r] = static_cast<T>(hin[p * n + i + r]);
                gbb[p] += d;
              }
            gemv_t(C, nr, P, dh.data(), kRows, xr, ld, gwb, C);
            for (int64_t r = 0; r < nr; ++r)
              grad_x_row(C, P, hb.data() + r, dh.data() + r, kRows, gzb, w, C, tmp.data(),
                         gxb + (i + r) * C);
          }
        } else {
          int64_t ld = n;
          const T* xr = as_opmath(xb + i0, C, ni, ld, xs.data());
          T* hk = hd.data();
          T* dk = hk + P * ni;
          for (int64_t p = 0; p < P; ++p) {
            convert(ni, ghin + p * n + i0, dk + p * ni);
            convert(ni, hin + p * n + i0, hk + p * ni);
          }
          gemv_t(ni, C, P, gzb, C, xr, ld, dk, ni);  // dh: first read of the block
          for (int64_t p = 0; p < P; ++p) gbb[p] += sum_short(ni, dk + p * ni);
          // Second read, from cache, as register tiles (per channel and rank these were
          // P dot products and P passes over a grad_x row: the cost grew faster than P):
          // grad_wb += dh x^T, P x C dot products along the block's positions;
          dots<kVec, Tile::kDotRows, Tile::kDotCols>(P, C, ni, dk, ni, xr, ld, gw.data(), C);
          for (int64_t e = 0; e < PC; ++e) gwb[e] += gw[e];
          // grad_x = [gz; wb]^T [h; dh], a product over the 2P ranks.
          std::copy_n(gzb, PC, gw.data());
          gemm<kVec, Tile::kRows, Tile::kVecs>(C, ni, 2 * P, gw.data(), 1, C, hk, ni,
                                               gxb + i0, n);
        }
      }
    }
  }
};


// ---------------------------------------------------------------- AVX-512 and AVX2, 7x7-sized blocks

#if ATTNPOOL_MULTI_ISA
#include <immintrin.h>

// {x[0], x[ld], ..., x[15*ld]}: lane-masked broadcasts in 4 independent chains (cheaper than
// a gather here).
ATTNPOOL_TARGET_AVX512 C10_ALWAYS_INLINE __m512 column16(const float* x, int64_t ld) {
  __m512 q[4];
  for (int j = 0; j < 4; ++j) {
    q[j] = _mm512_setzero_ps();
    for (int r = j; r < 16; r += 4)
      q[j] = _mm512_mask_broadcastss_ps(q[j], static_cast<__mmask16>(1u << r),
                                        _mm_load_ss(x + r * ld));
  }
  return _mm512_or_ps(_mm512_or_ps(q[0], q[1]), _mm512_or_ps(q[2], q[3]));
}

// z[c] += dot_short(m, h, x + c*ld) for c < C, 16 rows at a time, same order as dot_short:
// NF whole 16-lane chunks FMA'd into one accumulator per row, lanes folded by the same tree
// (l += l+8, l+4, l+2, l+1; done transposed over 16 rows), then plus the row's scalar tail.
template <int NF>
ATTNPOOL_TARGET_AVX512 __attribute__((noinline)) void weighted_rows_avx512(
    int64_t C, int64_t m, const float* h, const float* x, int64_t ld, float* z) {
  __m512 hv[NF];
  for (int k = 0; k < NF; ++k) hv[k] = _mm512_loadu_ps(h + 16 * k);
  const __m512i perm =
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    const float* xr = x + c * ld;
    __m512 a[16];
    for (int r = 0; r < 16; ++r) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(xr + r * ld), hv[0]);
      for (int k = 1; k < NF; ++k)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(xr + r * ld + 16 * k), hv[k], acc);
      a[r] = acc;
    }
    __m512 t[8];
    for (int r = 0; r < 8; ++r)
      t[r] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * r], a[2 * r + 1], 0x44),
                           _mm512_shuffle_f32x4(a[2 * r], a[2 * r + 1], 0xEE));
    __m512 u[4];
    for (int s = 0; s < 4; ++s)
      u[s] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * s], t[2 * s + 1], 0x88),
                           _mm512_shuffle_f32x4(t[2 * s], t[2 * s + 1], 0xDD));
    __m512 w[2];
    for (int q = 0; q < 2; ++q)
      w[q] = _mm512_add_ps(
          _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(u[2 * q]),
                                              _mm512_castps_pd(u[2 * q + 1]))),
          _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(u[2 * q]),
                                              _mm512_castps_pd(u[2 * q + 1]))));
    __m512 v = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    v = _mm512_permutexvar_ps(perm, v);  // lane r = row r
    if (m > 16 * NF) {
      __m512 tail = _mm512_mul_ps(column16(xr + 16 * NF, ld),
                                  _mm512_set1_ps(h[16 * NF]));
      for (int64_t k = 16 * NF + 1; k < m; ++k)
        tail = _mm512_fmadd_ps(column16(xr + k, ld), _mm512_set1_ps(h[k]), tail);
      v = _mm512_add_ps(v, tail);
    }
    _mm512_storeu_ps(z + c, _mm512_add_ps(_mm512_loadu_ps(z + c), v));
  }
  for (; c < C; ++c) z[c] += dot_short(m, h, x + c * ld);
}

// The AVX2 twin of weighted_rows_avx512, for float blocks of 9..64 positions: 8 rows at a
// time, each a chain of NF 8-lane FMAs (the last chunk a masked load, h zero-padded), the
// 8 rows' lanes folded by one transposed hadd tree. Its own fixed order (not dot_short's):
// the per-row fold of dot_short's 16 lanes left AVX2 at 0.67 of the read floor here.
template <int NF>
ATTNPOOL_TARGET_AVX2 __attribute__((noinline)) void weighted_rows_avx2(
    int64_t C, int64_t m, const float* h, const float* x, int64_t ld, float* z) {
  alignas(32) float hpad[8 * NF] = {};
  alignas(32) int32_t lanes[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t k = 0; k < m; ++k) hpad[k] = h[k];
  __m256 hv[NF];
  for (int k = 0; k < NF; ++k) hv[k] = _mm256_load_ps(hpad + 8 * k);
  const int last = static_cast<int>(m - 8 * (NF - 1));  // 1..8 positions in the last chunk
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(last), _mm256_load_si256(
      reinterpret_cast<const __m256i*>(lanes)));
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const float* xr = x + c * ld;
    __m256 a[8];
    for (int r = 0; r < 8; ++r) {
      const float* row = xr + r * ld;
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(row), hv[0]);
      for (int k = 1; k < NF - 1; ++k) acc = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8 * k), hv[k], acc);
      if constexpr (NF > 1)
        acc = _mm256_fmadd_ps(_mm256_maskload_ps(row + 8 * (NF - 1), tail), hv[NF - 1], acc);
      a[r] = acc;
    }
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    const __m256 v = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                   _mm256_permute2f128_ps(u0, u1, 0x31));  // lane r = row r
    _mm256_storeu_ps(z + c, _mm256_add_ps(_mm256_loadu_ps(z + c), v));
  }
  for (; c < C; ++c) z[c] += dot_short(m, h, x + c * ld);
}

// dst[c*n + i] = g[c] * h[i] for c < C (one contiguous [C, n] block), 16 rows (n vectors) at a
// time. Same products as outer_row with P = 1. Streaming stores (when asked, and dst is 64-byte
// aligned) skip the read of each line that a plain store makes into memory used before; into
// fresh pages, which the OS has just zeroed in cache, they are slower (see kStreamBelow).
ATTNPOOL_TARGET_AVX512 __attribute__((noinline)) void outer_block_avx512(
    int64_t C, int64_t n, const float* g, const float* h, float* dst, bool stream) {
  alignas(64) float hp[64 * 16];
  alignas(64) int32_t ci[64 * 16];
  for (int64_t e = 0; e < 16 * n; ++e) {
    hp[e] = h[e % n];
    ci[e] = static_cast<int32_t>(e / n);
  }
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    const __m512 gv = _mm512_loadu_ps(g + c);
    float* d = dst + c * n;
    if (stream && reinterpret_cast<uintptr_t>(d) % 64 == 0) {
      for (int64_t j = 0; j < n; ++j)
        _mm512_stream_ps(d + 16 * j,
                         _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_load_si512(ci + 16 * j), gv),
                                       _mm512_load_ps(hp + 16 * j)));
    } else {
      for (int64_t j = 0; j < n; ++j)
        _mm512_storeu_ps(d + 16 * j,
                         _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_load_si512(ci + 16 * j), gv),
                                       _mm512_load_ps(hp + 16 * j)));
    }
  }
  for (; c < C; ++c)
    for (int64_t i = 0; i < n; ++i) dst[c * n + i] = g[c] * h[i];
  if (stream) _mm_sfence();
}
#endif

// ---------------------------------------------------------------- forward (both pools)

// z[p*C + c] += sum_{i < ni} h[p*ni + i] x[c*ld + i] for one n-contiguous block: the 16-row
// AVX-512 kernel for float blocks of 16..63 positions (7x7 maps), the 8-row AVX2 kernel for
// 9..64, else dot_short row by row.
template <typename T>
C10_ALWAYS_INLINE void z_block(int64_t C, int64_t ni, int64_t P, const T* h, const T* x,
                               int64_t ld, T* z) {
#if ATTNPOOL_MULTI_ISA
  if constexpr (std::is_same_v<T, float>) {
    if (runtime_isa() == Isa::kAvx512 && ni >= 16 && ni < 64) {
      for (int64_t p = 0; p < P; ++p) {
        const float* hp = h + p * ni;
        if (ni < 32) weighted_rows_avx512<1>(C, ni, hp, x, ld, z + p * C);
        else if (ni < 48) weighted_rows_avx512<2>(C, ni, hp, x, ld, z + p * C);
        else weighted_rows_avx512<3>(C, ni, hp, x, ld, z + p * C);
      }
      return;
    }
    if (runtime_isa() == Isa::kAvx2 && ni > 8 && ni <= 64) {
      for (int64_t p = 0; p < P; ++p) {
        const float* hp = h + p * ni;
        float* zp = z + p * C;
        switch ((ni + 7) / 8) {
          case 2: weighted_rows_avx2<2>(C, ni, hp, x, ld, zp); break;
          case 3: weighted_rows_avx2<3>(C, ni, hp, x, ld, zp); break;
          case 4: weighted_rows_avx2<4>(C, ni, hp, x, ld, zp); break;
          case 5: weighted_rows_avx2<5>(C, ni, hp, x, ld, zp); break;
          case 6: weighted_rows_avx2<6>(C, ni, hp, x, ld, zp); break;
          case 7: weighted_rows_avx2<7>(C, ni, hp, x, ld, zp); break;
          default: weighted_rows_avx2<8>(C, ni, hp, x, ld, zp); break;
        }
      }
      return;
    }
  }
#endif
  for (int64_t c = 0; c < C; ++c)
    for (int64_t p = 0; p < P; ++p) z[p * C + c] += dot_short(ni, h + p * ni, x + c * ld);
}

// Tasks [t0, t1): the task's block of h, and its share of z[b] (unscaled; begin_task and
// end_task). h is computed, h = wb x + bb (attentional pooling), or given (the weighted
// pool, w null). x is read from memory once: an n-contiguous block stays in cache from h to z.
template <typename scalar_t>
struct ForwardJob {
  using T = at::opmath_type<scalar_t>;
  Geometry g;
  const scalar_t* x;
  const T* w;             // [P, C]; null when h is given
  const T* bias;          // [P], with w
  const scalar_t* h_in;   // [B, P, n] when given
  scalar_t* h_out;        // [B, P, n] when computed
  T* zpart;               // [B * blocks, P, C], zero-filled (null when blocks == 1)
  scalar_t* zout;         // [B, P, C]

  template <int>
  C10_ALWAYS_INLINE void run(int64_t t0, int64_t t1) const {
    const int64_t C = g.C, n = g.n, P = g.P;
    constexpr bool kConvert = !std::is_same_v<scalar_t, T>;
    // Per-thread scratch: h of a block (or row group) and the opmath copy of x's rows.
    std::vector<T> hb(P * std::max(g.block, kRows));
    std::vector<T> xs(kConvert ? C * (g.channels_last ? kRows : g.block) : 0);
    std::vector<T> local(g.blocks == 1 ? P * C : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.blocks, i0 = (t % g.blocks) * g.block;
      const int64_t ni = std::min(g.block, n - i0);
      const scalar_t* xb = x + b * C * n;
      T* z = begin_task(g, zpart, local, t);
      if (g.channels_last) {
        for (int64_t i = i0; i < i0 + ni; i += kRows) {
          const int64_t nr = std::min(kRows, i0 + ni - i);
          int64_t ld = C;
          const T* xr = as_opmath(xb + i * C, nr, C, ld, xs.data());
          for (int64_t p = 0; p < P; ++p)
            for (int64_t r = 0; r < nr; ++r) {
              const int64_t e = (b * P + p) * n + i + r;
              T hv;
              if (w) {
                hv = bias[p] + dot(C, w + p * C, xr + r * ld);
                h_out[e] = static_cast<scalar_t>(hv);
              } else {
                hv = static_cast<T>(h_in[e]);
              }
              hb[p * kRows + r] = hv;
            }
          gemv_t(C, nr, P, hb.data(), kRows, xr, ld, z, C);
        }
      } else {
        int64_t ld = n;
        const T* xr = as_opmath(xb + i0, C, ni, ld, xs.data());
        if (w) {
          for (int64_t p = 0; p < P; ++p) std::fill_n(hb.data() + p * ni, ni, bias[p]);
          gemv_t(ni, C, P, w, C, xr, ld, hb.data(), ni);  // first read of the block
          for (int64_t p = 0; p < P; ++p)
            convert(ni, hb.data() + p * ni, h_out + (b * P + p) * n + i0);
        } else {
          for (int64_t p = 0; p < P; ++p)
            convert(ni, h_in + (b * P + p) * n + i0, hb.data() + p * ni);
        }
        z_block(C, ni, P, hb.data(), xr, ld, z);  // from cache when h was just computed
      }
      end_task(g, local, zout, t);
    }
  }
};

// ---------------------------------------------------------------- weighted backward

// grad_x below this size is written with streaming stores (outer_block_avx512). glibc serves
// blocks from 32 MiB on (its largest mmap threshold) as fresh mmaps, whose pages the OS zeroes
// in cache on first touch, and streaming stores there must evict those lines; smaller ones
// come back from the heap, where streaming saves the read of every line. Backward at
// [B, T, 1024, 7, 7], 2 threads, Intel Xeon (AVX-512), streaming / plain: B=8, T=8 (12 MiB)
// 1.2 / 1.6 ms; T=20 (31 MiB) 3.3 / 4.3 ms; T=40 (61 MiB) 28.8 / 19.4 ms; [30, 20, 2048, 7, 7]
// (230 MiB) 102 / 66 ms.
constexpr int64_t kStreamBelow = int64_t(32) << 20;

// grad_h = grad_z x / n reads x once; grad_x = grad_z^T h / n needs no x and is written as the
// task goes. Neither sums over tasks, so there are no partials.
template <typename scalar_t>
struct WeightedBackwardJob {
  using T = at::opmath_type<scalar_t>;
  Geometry g;
  const scalar_t* x;
  const scalar_t* h;  // [B, P, n]
  const T* gz;        // [B, P, C], grad_z / n
  scalar_t* grad_x;   // x's layout
  scalar_t* grad_h;   // [B, P, n]
  bool stream;        // grad_x smaller than kStreamBelow

  template <int>
  C10_ALWAYS_INLINE void run(int64_t t0, int64_t t1) const {
    const int64_t C = g.C, n = g.n, P = g.P, PC = P * C;
    constexpr bool kConvert = !std::is_same_v<scalar_t, T>;
    const int64_t rows = g.channels_last ? kRows : g.block;
    std::vector<T> hb(P * rows), dh(P * rows), tmp(std::max(C, g.block));
    std::vector<T> xs(kConvert ? C * rows : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.blocks, i0 = (t % g.blocks) * g.block;
      const int64_t ni = std::min(g.block, n - i0);
      const scalar_t* xb = x + b * C * n;
      const scalar_t* hin = h + b * P * n;
      scalar_t* ghout = grad_h + b * P * n;
      const T* gzb = gz + b * PC;
      scalar_t* gxb = grad_x + b * C * n;
      if (g.channels_last) {
        for (int64_t i = i0; i < i0 + ni; i += kRows) {
          const int64_t nr = std::min(kRows, i0 + ni - i);
          int64_t ld = C;
          const T* xr = as_opmath(xb + i * C, nr, C, ld, xs.data());
          for (int64_t p = 0; p < P; ++p)
            for (int64_t r = 0; r < nr; ++r) {
              ghout[p * n + i + r] = static_cast<scalar_t>(dot(C, gzb + p * C, xr + r * ld));
              hb[p * kRows + r] = static_cast<T>(hin[p * n + i + r]);
            }
          for (int64_t r = 0; r < nr; ++r)
            outer_row(C, P, hb.data() + r, kRows, gzb, C, tmp.data(), gxb + (i + r) * C);
        }
      } else {
        int64_t ld = n;
        const T* xr = as_opmath(xb + i0, C, ni, ld, xs.data());
        for (int64_t p = 0; p < P; ++p) {
          convert(ni, hin + p * n + i0, hb.data() + p * ni);
          std::fill_n(dh.data() + p * ni, ni, T(0));
        }
        gemv_t(ni, C, P, gzb, C, xr, ld, dh.data(), ni);
        for (int64_t p = 0; p < P; ++p) convert(ni, dh.data() + p * ni, ghout + p * n + i0);
#if ATTNPOOL_MULTI_ISA
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (runtime_isa() == Isa::kAvx512 && P == 1 && ni == n && n <= 64) {
            outer_block_avx512(C, n, gzb, hb.data(), gxb, stream);
            continue;
          }
        }
#endif
        for (int64_t c = 0; c < C; ++c)
          outer_row(ni, P, gzb + c, C, hb.data(), ni, tmp.data(), gxb + c * n + i0);
      }
    }
  }
};

// parts [groups, ...] summed over the groups in group order (a fixed order, one pass).
at::Tensor sum_groups(const at::Tensor& parts) {
  at::Tensor out = parts[0].clone();
  const int64_t m = out.numel();
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "attentional_pooling_sum_groups", [&] {
    const scalar_t* p = parts.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t k = 1; k < parts.size(0); ++k)
      for (int64_t j = 0; j < m; ++j) o[j] += p[k * m + j];
  });
  return out;
}

void check_weighted(const at::Tensor& x, const at::Tensor& h) {
  TORCH_CHECK(x.device().is_cpu() && h.device().is_cpu(),
              "weighted_pool cpu: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 3, "weighted_pool cpu: x must be [B, C, n], got ", x.sizes());
  TORCH_CHECK(h.dim() == 3 && h.size(0) == x.size(0) && h.size(2) == x.size(2),
              "weighted_pool cpu: h must be [B=", x.size(0), ", P, n=", x.size(2), "], got ",
              h.sizes());
}

}  // namespace

AttpoolForward attentional_pooling_forward_cpu(const at::Tensor& x_in,
                                                                const at::Tensor& wb,
                                                                const at::Tensor& bb) {
  check_inputs(x_in, wb);
  TORCH_CHECK(bb.numel() == wb.size(0), "attentional_pooling cpu: bb must be [P=", wb.size(0), "]");
  at::Tensor x = x_in;
  const Geometry g = make_geometry(x, wb.size(0));
  const auto opmath = opmath_dtype(x.scalar_type());
  const at::Tensor w = wb.to(opmath).contiguous();
  const at::Tensor bias = bb.to(opmath).contiguous();
  at::Tensor h = at::empty({g.B, g.P, g.n}, x.options());
  at::Tensor z = at::empty({g.B, g.P, g.C}, x.options());
  const at::Tensor zpart = z_partials(g, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "attentional_pooling_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const ForwardJob<scalar_t> job{g, x.const_data_ptr<scalar_t>(), w.const_data_ptr<T>(),
                                   bias.const_data_ptr<T>(), nullptr,
                                   h.mutable_data_ptr<scalar_t>(), data_or_null<T>(zpart),
                                   z.mutable_data_ptr<scalar_t>()};
    parallel_run(g.B * g.blocks, job);
    finish_z<scalar_t>(g, data_or_null<T>(zpart), z.mutable_data_ptr<scalar_t>());
  });
  return {z, h};
}

AttpoolBackward attentional_pooling_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& grad_h, const at::Tensor& x_in,
    const at::Tensor& h_in, const at::Tensor& wb) {
  check_inputs(x_in, wb);
  at::Tensor x = x_in;
  const Geometry g = make_geometry(x, wb.size(0));
  TORCH_CHECK(grad_z.sizes() == at::IntArrayRef({g.B, g.P, g.C}) &&
                  grad_h.sizes() == at::IntArrayRef({g.B, g.P, g.n}) &&
                  h_in.sizes() == at::IntArrayRef({g.B, g.P, g.n}),
              "attentional_pooling cpu: grad_z must be [B, P, C], grad_h and h [B, P, n]");
  const auto dtype = x.scalar_type();
  const auto opmath = opmath_dtype(dtype);
  const at::Tensor w = wb.to(opmath).contiguous();
  const at::Tensor gz = (grad_z.to(opmath) * (1.0 / static_cast<double>(g.n))).contiguous();
  const at::Tensor h = h_in.to(dtype).contiguous();
  const at::Tensor gh = grad_h.to(opmath).contiguous();
  at::Tensor grad_x = at::empty_like(x);  // x is dense in one of the layouts: same strides
  // Task groups with their own weight-gradient partials: a fixed number (not the thread count,
  // which would make the sums' order, hence the result, depend on it).
  const int64_t groups = std::min<int64_t>(kParallelTasks, g.B * g.blocks);
  at::Tensor wb_parts = at::zeros({groups, g.P, g.C}, x.options().dtype(opmath));
  at::Tensor bb_parts = at::zeros({groups, g.P}, x.options().dtype(opmath));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "attentional_pooling_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const BackwardJob<scalar_t> job{g, groups, x.const_data_ptr<scalar_t>(),
                                    h.const_data_ptr<scalar_t>(), gh.const_data_ptr<T>(),
                                    gz.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                    grad_x.mutable_data_ptr<scalar_t>(),
                                    wb_parts.mutable_data_ptr<T>(), bb_parts.mutable_data_ptr<T>()};
    parallel_run(groups, job);
  });
  return {grad_x, sum_groups(wb_parts).to(dtype), sum_groups(bb_parts).to(dtype)};
}


at::Tensor weighted_pool_forward_cpu(const at::Tensor& x_in, const at::Tensor& h_in) {
  check_weighted(x_in, h_in);
  const int64_t B = x_in.size(0), C = x_in.size(1), n = x_in.size(2), P = h_in.size(1);
  if (B == 0 || C == 0 || n == 0 || P == 0)  // the caller handles these; no crash here
    return at::zeros({B, P, C}, x_in.options());
  at::Tensor x = x_in;
  const Geometry g = make_geometry(x, P);
  const auto dtype = x.scalar_type();
  const at::Tensor h = h_in.to(dtype).contiguous();
  at::Tensor z = at::empty({g.B, g.P, g.C}, x.options());
  const at::Tensor zpart = z_partials(g, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "weighted_pool_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const ForwardJob<scalar_t> job{g, x.const_data_ptr<scalar_t>(), nullptr, nullptr,
                                   h.const_data_ptr<scalar_t>(), nullptr, data_or_null<T>(zpart),
                                   z.mutable_data_ptr<scalar_t>()};
    parallel_run(g.B * g.blocks, job);
    finish_z<scalar_t>(g, data_or_null<T>(zpart), z.mutable_data_ptr<scalar_t>());
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor> weighted_pool_backward_cpu(const at::Tensor& grad_z,
                                                              const at::Tensor& x_in,
                                                              const at::Tensor& h_in) {
  check_weighted(x_in, h_in);
  const int64_t B = x_in.size(0), C = x_in.size(1), n = x_in.size(2), P = h_in.size(1);
  TORCH_CHECK(grad_z.sizes() == at::IntArrayRef({B, P, C}),
              "weighted_pool cpu: grad_z must be [B, P, C], got ", grad_z.sizes());
  if (B == 0 || C == 0 || n == 0 || P == 0)
    return {at::zeros_like(x_in), at::zeros({B, P, n}, x_in.options())};
  at::Tensor x = x_in;
  const Geometry g = make_geometry(x, P);
  const auto dtype = x.scalar_type();
  const auto opmath = opmath_dtype(dtype);
  const at::Tensor gz = (grad_z.to(opmath) * (1.0 / static_cast<double>(g.n))).contiguous();
  const at::Tensor h = h_in.to(dtype).contiguous();
  at::Tensor grad_x = at::empty_like(x);  // x is dense in one of the layouts: same strides
  at::Tensor grad_h = at::empty({g.B, g.P, g.n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "weighted_pool_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const WeightedBackwardJob<scalar_t> job{g, x.const_data_ptr<scalar_t>(),
                                            h.const_data_ptr<scalar_t>(), gz.const_data_ptr<T>(),
                                            grad_x.mutable_data_ptr<scalar_t>(),
                                            grad_h.mutable_data_ptr<scalar_t>(),
                                            grad_x.nbytes() < kStreamBelow};
    parallel_run(g.B * g.blocks, job);
  });
  return {grad_x, grad_h};
}

}  // namespace attnpool
