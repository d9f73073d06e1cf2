// Fused CPU kernels of attention clusters (Long et al. 2018): for every sample b and unit n,
//   a = softmax of scores[b, :, n] over the valid frames,   v = sum_l a_l x[b, l, :],
//   out[b, n] = u / (sqrt(N) max(sqrt(||u||^2 + eps_sqrt), eps)) with u = alpha[n] v + beta[n]
//   (v without shift; eps_sqrt = 0 is torch's clamp_min, eps = 0 Paddle's eps inside the root)
// and its backward (contract: attnpool.h).
//
// The [B, N, F] intermediate never reaches memory. Three products per sample carry the work:
//   forward   V = A X          [N, L] x [L, F]       (A: softmax weights, V: rows v)
//   backward  da = DV X^T  [N, F] x [F, L],  grad_x = A^T DV  [L, N] x [N, F], and V = A X
//             recomputed for the given-scores op; with the fc1 scoring layer fused, also
//             scores = X W^T, grad_x += GS W, grad_weight = GS^T X, and no recompute: du
//             follows from the forward's output (BackwardJob::unit_du), and DU stands in
//             for DV (alpha folded into the products)
// They run as register-blocked tiles over one sample's x, which stays in L2 between them.
//
// Forward: a task is (sample, block of units), so a small batch still keeps every core busy.
// Units go in panels of a few: their v rows wait in a small buffer only until their norms are
// known, then out is written once. Long clips (kLongClipBytes) form V of the task's whole
// block of units with one packed gemm first (unit_block).
// Backward: a task is one sample; its DV [N, F] (fc1: DU) lives in a per-thread buffer and
// one thread writes its grad_x (no races). With too few samples to keep the threads busy, the
// task's two halves (units: dv, grad_scores; frames: grad_x) run as two parallel phases over
// blocks.
//
// Opmath (float, or double for double) throughout; half/bfloat16 x is converted once per task.
// Deterministic: no atomics, every sum in a fixed order that depends neither on the number of
// threads nor on the task split (grad_alpha/beta: per-(b, n) partials summed over b in order).
#include "attnpool.h"
#include "cpu/isa.h"
#include "cpu/loops.h"
#include "cpu/tiles.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace attnpool {
namespace {

// gemm_tile whose rows r end as u = al[r] c + be[r]: stored to u, and u*u added to sq[r] while
// still in registers (the forward's norms, without a second pass over u).
template <int kVec, int R, int NV, typename T>
ATTNPOOL_INLINE void affine_tile(int64_t K, const T* a, int64_t aks, const T* b, int64_t ldb,
                                 const T* al, const T* be, T* u, int64_t ldu,
                                 typename Simd<kVec, T>::type* sq) {
  using vec = typename Simd<kVec, T>::type;
  constexpr int V = kVec / sizeof(T);
  vec acc[R][NV];
  tile_products<kVec, R, NV>(K, a, 1, aks, b, ldb, acc);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) {
      const vec ur = al[r] * acc[r][j] + be[r];
      store<kVec, T>(u + r * ldu + j * V, ur);
      sq[r] += ur * ur;
    }
}

// Units and frames are split between tasks in multiples of this (the largest kRows).
constexpr int64_t kRowAlign = 8;

// From this many bytes of a sample's valid frames in opmath (the x the tiles read: float for
// half / bfloat16 inputs) on, the forward's V = A X runs as one gemm per task
// (ForwardJob::unit_block). Forward, AVX2, F = 1024, N = 32, B = 8, against the panel path:
// L = 64 and 100 (256 and 400 KiB) 3-10 % slower, L = 200 (800 KiB) 5 % faster, L = 300 11 %
// faster (AVX-512: 5 %).
constexpr int64_t kLongClipBytes = 512 * 1024;

// ---------------------------------------------------------------- small helpers

// n elements as opmath: the data itself when it already is, else a converted copy in scratch.
template <typename T, typename scalar_t>
ATTNPOOL_INLINE const T* as_opmath(const scalar_t* src, int64_t n, T* scratch) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return src;
  } else {
    for (int64_t k = 0; k < n; ++k) scratch[k] = static_cast<T>(src[k]);
    return scratch;
  }
}

// Asks for the cache lines of [p, p + bytes) ahead of writing them, so that the writes do not
// stall on the reads of write-allocate.
ATTNPOOL_INLINE void prefetch_for_write(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t j = 0; j < bytes; j += 64) __builtin_prefetch(static_cast<const char*>(p) + j, 1);
#endif
}

ATTNPOOL_INLINE void prefetch(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t j = 0; j < bytes; j += 64) __builtin_prefetch(static_cast<const char*>(p) + j, 0);
#endif
}

// e^x for x <= 0 or NaN, in plain arithmetic so that loops over it vectorise (std::exp is a
// call per element): x = k ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial (truncation
// under 0.1 ulp), 2^k through the exponent bits in two halves, so that subnormal results come
// out as with std::exp. Within about an ulp of std::exp; e^-inf = 0, e^NaN = NaN.
template <typename T>
ATTNPOOL_INLINE T exp_nonpositive(T x) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  using I = std::conditional_t<kFloat, int32_t, int64_t>;
  constexpr int kMant = std::numeric_limits<T>::digits - 1;
  constexpr I kBias = std::numeric_limits<T>::max_exponent - 1;
  constexpr int kDegree = kFloat ? 7 : 13;
  constexpr T kInvFactorial[] = {
      T(1), T(1), T(0.5), T(1.6666666666666666e-1), T(4.1666666666666664e-2),
      T(8.3333333333333332e-3), T(1.3888888888888889e-3), T(1.9841269841269841e-4),
      T(2.4801587301587302e-5), T(2.7557319223985893e-6), T(2.7557319223985888e-7),
      T(2.5052108385441720e-8), T(2.0876756987868100e-9), T(1.6059043836821613e-10)};
  constexpr T kMin = kFloat ? T(-104) : T(-746);  // e^x rounds to 0 below
  constexpr T kLog2e = T(1.4426950408889634);
  constexpr T kLn2Hi = T(0.693145751953125), kLn2Lo = T(1.42860682030941723212e-6);
  constexpr T kRound = T(1.5) * T(I(1) << kMant);  // t + kRound rounds t to an integer
  const bool ok = x >= kMin;
  const T xs = ok ? x : T(0);
  const T t = xs * kLog2e + kRound;
  const T k = t - kRound;
  const T r = (xs - k * kLn2Hi) - k * kLn2Lo;
  T poly = kInvFactorial[kDegree];
  for (int i = kDegree - 1; i >= 0; --i) poly = poly * r + kInvFactorial[i];
  // k sits in the low bits of t; 2^k = 2^k1 2^k2 keeps both factors normal.
  I tb, rb;
  std::memcpy(&tb, &t, sizeof(T));
  std::memcpy(&rb, &kRound, sizeof(T));
  const I k1 = (tb - rb) >> 1, k2 = (tb - rb) - k1;
  const I b1 = (k1 + kBias) << kMant, b2 = (k2 + kBias) << kMant;
  T s1, s2;
  std::memcpy(&s1, &b1, sizeof(T));
  std::memcpy(&s2, &b2, sizeof(T));
  return ok ? poly * s1 * s2 : (x < kMin ? T(0) : x);
}

// Valid frames of a sample, clamped so that a bad length can never index out of bounds.
ATTNPOOL_INLINE int64_t valid_length(const int64_t* lengths, int64_t b, int64_t L) {
  return lengths == nullptr ? L : std::min(std::max<int64_t>(lengths[b], 0), L);
}

struct Shape {
  int64_t B, L, F, N;
};

// Splits `items` per sample into blocks so that B * blocks gives every thread about two tasks
// (for load balance) when B alone does not; blocks are whole multiples of `align`.
struct Split {
  int64_t block, blocks;
  Split(int64_t B, int64_t items, int64_t align) {
    const int64_t want = (2 * at::get_num_threads() + B - 1) / B;
    const int64_t units = (items + align - 1) / align;
    const int64_t n = std::max<int64_t>(1, std::min(want, units));
    block = (units + n - 1) / n * align;
    blocks = (items + block - 1) / block;
  }
};

// ---------------------------------------------------------------- forward

template <typename scalar_t>
struct ForwardJob {
  using T = at::opmath_type<scalar_t>;
  Shape s;
  Split units;  // tasks are (b, block of units)
  const scalar_t* x;
  const T* scores;         // [B, L, N] opmath, or nullptr with weight_t
  // fc1: weight^T [F, ldw] (opmath, columns past N zero), scores = x weight^T per task
  const T* weight_t;
  int64_t ldw;
  const int64_t* lengths;  // or nullptr
  const T* alpha;
  const T* beta;
  bool shift;
  T eps;
  T eps_sqrt;
  scalar_t* out;
  T* attn;
  T* norm;

  // Whether `len` valid frames take the long-clip path (kLongClipBytes).
  ATTNPOOL_INLINE bool long_clip(int64_t len) const {
    return len * s.F * int64_t(sizeof(T)) >= kLongClipBytes;
  }

  // Softmax of the units [n0, n0 + nb) over the valid frames, into at[l*nb + r] (frame-major:
  // the units' scores at a frame are contiguous, so the loops run across units in SIMD) and
  // into their attn rows. Each unit's sums run over l in order, whatever the block.
  // Scores of frame l, unit r at sc[l*ld + r].
  template <typename S>
  ATTNPOOL_INLINE void softmax(const S* sc, int64_t ld, int64_t b, int64_t n0, int64_t nb,
                               int64_t len, T* at, T* mx, T* sum) const {
    const int64_t L = s.L, N = s.N;
    for (int64_t r = 0; r < nb; ++r) {
      mx[r] = -std::numeric_limits<T>::infinity();
      sum[r] = 0;
    }
    for (int64_t l = 0; l < len; ++l)
      for (int64_t r = 0; r < nb; ++r) mx[r] = std::max(mx[r], static_cast<T>(sc[l * ld + r]));
    for (int64_t l = 0; l < len; ++l)
      for (int64_t r = 0; r < nb; ++r) {
        const T e = exp_nonpositive(static_cast<T>(sc[l * ld + r]) - mx[r]);
        at[l * nb + r] = e;
        sum[r] += e;
      }
    // Padded frames get 0, or NaN when the valid scores hold a NaN / +Inf (sum is NaN), as
    // torch's softmax over -inf-masked scores does.
    for (int64_t r = 0; r < nb; ++r) sum[r] = T(1) / sum[r];
    for (int64_t l = 0; l < len; ++l)
      for (int64_t r = 0; r < nb; ++r) at[l * nb + r] *= sum[r];
    for (int64_t r = 0; r < nb; ++r) {
      T* row = attn + (b * N + n0 + r) * L;
      for (int64_t l = 0; l < len; ++l) row[l] = at[l * nb + r];
      for (int64_t l = len; l < L; ++l) row[l] = T(0) * sum[r];
    }
  }

  // Units [n, n + R) of sample b, weights a(r, k) = a[r + k*aks] over len frames:
  // u = alpha v + beta into u (rows of F), then norm and out = u / (sqrt(N) max(norm, eps)).
  template <int kVec, int R, int NV>
  ATTNPOOL_INLINE void unit_rows(int64_t b, int64_t n, int64_t len, const T* a, int64_t aks,
                                 const T* xb, T* u) const {
    using vec = typename Simd<kVec, T>::type;
    constexpr int V = kVec / sizeof(T);
    const int64_t F = s.F;
    scalar_t* o = out + (b * s.N + n) * F;
    T al[R], be[R], tail[R];
    vec sq[R] = {};
    for (int r = 0; r < R; ++r) {
      al[r] = shift ? alpha[n + r] : T(1);
      be[r] = shift ? beta[n + r] : T(0);
      tail[r] = 0;
    }
    int64_t w = 0;
    // Each tile after a prefetch of the lines of out it stands for: the writes below would
    // otherwise wait on memory, while the tiles have time to spare.
    for (; w + NV * V <= F; w += NV * V) {
      for (int r = 0; r < R; ++r) prefetch_for_write(o + r * F + w, NV * V * sizeof(scalar_t));
      affine_tile<kVec, R, NV>(len, a, aks, xb + w, F, al, be, u + w, F, sq);
    }
    for (; w + V <= F; w += V) affine_tile<kVec, R, 1>(len, a, aks, xb + w, F, al, be, u + w, F, sq);
    for (; w < F; ++w)
      for (int r = 0; r < R; ++r) {
        T acc = 0;
        for (int64_t k = 0; k < len; ++k) acc += a[r + k * aks] * xb[k * F + w];
        const T ur = al[r] * acc + be[r];
        u[r * F + w] = ur;
        tail[r] += ur * ur;
      }
    for (int r = 0; r < R; ++r) write_unit(b, n + r, fold_vec<kVec, T>(sq[r]) + tail[r], u + r * F);
  }

  // Unit (b, n) from its u (row of F) and ||u||^2: its norm, and out = u / (sqrt(N) max(norm, eps)).
  ATTNPOOL_INLINE void write_unit(int64_t b, int64_t n, T sumsq, const T* u) const {
    const int64_t F = s.F;
    const T nrm = std::sqrt(sumsq + (shift ? eps_sqrt : T(0)));
    norm[b * s.N + n] = nrm;
    // max(nrm, eps) written so that a NaN norm stays NaN, as with torch's clamp_min.
    const T scale =
        shift ? T(1) / (std::sqrt(static_cast<T>(s.N)) * (nrm < eps ? eps : nrm)) : T(1);
    scalar_t* o = out + (b * s.N + n) * F;
    for (int64_t f = 0; f < F; ++f) o[f] = static_cast<scalar_t>(u[f] * scale);
  }

  // Long clips: V of units [n0, n0 + nb) as one gemm into u (nb rows of F), whose packed
  // blocks of x serve every panel from L1; then u = alpha v + beta and out, unit by unit.
  // The panel path (unit_rows) streams all len rows of x, 4 KiB apart at F = 1024, once per
  // panel: from L2, with no prefetch across the pages.
  template <int kVec>
  ATTNPOOL_INLINE void unit_block(int64_t b, int64_t n0, int64_t nb, int64_t len, const T* a,
                                  const T* xb, T* u) const {
    using Tile = Tiling<kVec, T>;
    using vec = typename Simd<kVec, T>::type;
    constexpr int V = kVec / sizeof(T);
    const int64_t F = s.F;
    gemm<kVec, Tile::kRows, Tile::kVecs>(nb, F, len, a, 1, nb, xb, F, u, F);
    for (int64_t r = 0; r < nb; ++r) {
      T* ur = u + r * F;
      const T al = shift ? alpha[n0 + r] : T(1), be = shift ? beta[n0 + r] : T(0);
      vec sq{};
      T tail = 0;
      int64_t f = 0;
      for (; f + V <= F; f += V) {
        const vec uf = al * load<kVec>(ur + f) + be;
        store<kVec, T>(ur + f, uf);
        sq += uf * uf;
      }
      for (; f < F; ++f) {
        ur[f] = al * ur[f] + be;
        tail += ur[f] * ur[f];
      }
      write_unit(b, n0 + r, fold_vec<kVec, T>(sq) + tail, ur);
    }
  }

  // unit_rows with R a runtime value r <= R.
  template <int kVec, int R, int NV>
  ATTNPOOL_INLINE void unit_rows_of(int64_t r, int64_t b, int64_t n, int64_t len, const T* a,
                                    int64_t aks, const T* xb, T* u) const {
    if constexpr (R > 1) {
      if (r < R) return unit_rows_of<kVec, R - 1, NV>(r, b, n, len, a, aks, xb, u);
    }
    unit_rows<kVec, R, NV>(b, n, len, a, aks, xb, u);
  }

  template <int kVec>
  ATTNPOOL_INLINE void run(int64_t t0, int64_t t1) const {
    using Tile = Tiling<kVec, T>;
    constexpr int R = Tile::kRows;
    const int64_t L = s.L, F = s.F, N = s.N;
    // Per-thread scratch: the opmath copy of a sample's x; the block's weights (frame-major)
    // and their per-unit max and sum; u of one panel of units (long clips: of the block).
    std::vector<T> xs(std::is_same_v<scalar_t, T> ? 0 : L * F);
    std::vector<T> a(units.block * L + 2 * units.block);
    std::vector<T> u((long_clip(L) ? units.block : R) * F);
    constexpr int V = kVec / sizeof(T);
    std::vector<T> sc(weight_t != nullptr ? (units.block + V) * L : 0);
    T* mx = a.data() + units.block * L;
    T* sum = mx + units.block;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / units.blocks;
      const int64_t n0 = (t % units.blocks) * units.block;
      const int64_t nb = std::min(N, n0 + units.block) - n0;
      const int64_t len = valid_length(lengths, b, L);
      const T* xb = as_opmath<T>(x + b * L * F, len * F, xs.data());
      if (weight_t != nullptr) {  // fc1: the block's scores [len, nb] = X W^T, x in cache
        // as a gemm over whole registers of W^T's zero-padded columns (N = 8 on AVX-512
        // would run as scalar columns otherwise). Dot products along F instead reached half
        // its speed: each pass of a dot tile streams its rows of x and W from L2.
        const int64_t cols = std::min(ldw - n0, (nb + V - 1) / V * V);
        gemm<kVec, Tile::kRows, Tile::kVecs>(len, cols, F, xb, F, 1, weight_t + n0, ldw,
                                             sc.data(), cols, /*pack_b=*/false);
        softmax(sc.data(), cols, b, n0, nb, len, a.data(), mx, sum);
      } else {
        softmax(scores + b * L * N + n0, N, b, n0, nb, len, a.data(), mx, sum);
      }
      if (long_clip(len)) {
        unit_block<kVec>(b, n0, nb, len, a.data(), xb, u.data());
        continue;
      }
      // Panels of at most R units, of near-equal size (see balanced_part).
      const int64_t panels = (nb + R - 1) / R;
      for (int64_t i = 0, p = 0; i < panels; ++i) {
        const int64_t rows = balanced_part(nb, panels, i);
        unit_rows_of<kVec, R, Tile::kVecs>(rows, b, n0 + p, len, a.data() + p, nb, xb, u.data());
        p += rows;
      }
    }
  }
};

// ---------------------------------------------------------------- backward

// Independent partial sums of the backward's double reductions: two AVX-512 registers, so
// that the sum order (hence the result) is the same whatever the SIMD width.
constexpr int kSumLanes = 16;

// From this many valid frames on, da = DV X^T runs as a gemm over a transposed DV, below as dot
// tiles (the transpose then costs more than it saves; fp32, B=8, F=1024, N=32, one thread:
// AVX2 0.25 against 0.44 ms at L=25, 0.72 against 0.65 at L=64, 3.4 against 1.9 at L=300).
constexpr int64_t kDaGemmFrames = 64;

// One kVec-byte register of doubles from p. The fc1 backward's sums over f run on these:
// written as plain per-lane loops, GCC vectorised o*g but left the sums of o and of g as 32
// scalar chains (a third of the backward's time at B=32, L=25, F=1024, N=32), and a 16-lane
// generic vector spilled on AVX2. Converted through an array: GCC 12 turns this loop into one
// vcvtps2pd from memory, where __builtin_convertvector of a float vector split it in halves.
template <int kVec, typename T, typename scalar_t>
ATTNPOOL_INLINE typename Simd<kVec, double>::type double_lanes(const scalar_t* p) {
  double lanes[kVec / sizeof(double)];
  for (int l = 0; l < kVec / int(sizeof(double)); ++l) lanes[l] = static_cast<T>(p[l]);
  return load<kVec, double>(lanes);
}

// sxy = sum_f x_f y_f and sy = sum_f y_f over f < F in double, in kSumLanes lanes folded by
// fold<kSumLanes> (lane l sums f = l mod kSumLanes in order; the tail's scalar sum is added to
// the fold), so that the result does not depend on the SIMD width. The lanes stay in
// registers: 2 * kSumLanes / W of them (AVX2: 8), where one pass over four sums (16 on AVX2,
// every ymm register) kept them on the stack, a load and a store per add. The loop mostly
// waits on reading its rows from memory: the AVX2 backward at B=32, L=25, F=1024, N=32 went
// 1.55 -> 1.50-1.53 ms. kSame: x and y are the same row (one conversion).
// step(f) runs once per kSumLanes block (prefetches).
template <int kVec, typename T, bool kSame, typename scalar_t, typename Step>
ATTNPOOL_INLINE void lane_sums(int64_t F, const scalar_t* x, const scalar_t* y, double& sxy,
                               double& sy, const Step& step) {
  using dvec = typename Simd<kVec, double>::type;
  constexpr int W = kVec / int(sizeof(double)), J = kSumLanes / W;
  dvec axy[J] = {}, ay[J] = {};
  int64_t f = 0;
  for (; f + kSumLanes <= F; f += kSumLanes) {
    step(f);
    ATTNPOOL_UNROLL
    for (int j = 0; j < J; ++j) {
      const dvec yf = double_lanes<kVec, T>(y + f + j * W);
      const dvec xf = kSame ? yf : double_lanes<kVec, T>(x + f + j * W);
      axy[j] += xf * yf;
      ay[j] += yf;
    }
  }
  double txy = 0, ty = 0;
  for (; f < F; ++f) {
    const double xf = static_cast<T>(x[f]), yf = static_cast<T>(y[f]);
    txy += xf * yf;
    ty += yf;
  }
  double lanes[2][kSumLanes];
  ATTNPOOL_UNROLL
  for (int j = 0; j < J; ++j) {
    store<kVec, double>(lanes[0] + j * W, axy[j]);
    store<kVec, double>(lanes[1] + j * W, ay[j]);
  }
  sxy = txy + fold<kSumLanes>(lanes[0]);
  sy = ty + fold<kSumLanes>(lanes[1]);
}

template <typename scalar_t>
struct BackwardJob {
  using T = at::opmath_type<scalar_t>;
  enum Phase { kSample, kUnits, kFrames };
  Shape s;
  Phase phase;
  Split units, frames;  // task splits of the kUnits and kFrames phases
  const scalar_t* grad_out;
  const scalar_t* x;
  const T* attn;
  const T* norm;
  const T* alpha;
  const T* beta;
  bool shift;
  T eps;
  T eps_sqrt;
  // Rows of DV (fc1: [DU; W]) ldv apart: F rounded up to a cache line, plus one line where that
  // is a multiple of 512 bytes, so that the rows a gemm tile streams (4 KiB apart at
  // F = 1024) do not share an L1 set and grad_x's gemm can run unpacked (packing DV took 8 %
  // of the AVX2 backward at B=32, L=25, F=1024, N=32); it packs from 128 units on
  // (do_frames).
  int64_t ldv;
  T* workspace;  // kUnits -> kFrames: DV of every sample [B, N, ldv] (fc1: [B, 2N, ldv], DU; W)
  scalar_t* grad_x;
  scalar_t* grad_scores;
  double* partials;  // [B, N, 2]: per-sample grad_alpha, grad_beta
  // fc1 (weight != nullptr): du comes from the forward's output (no V = A X recompute), and
  // grad_x = A^T DV + GS W = [A^T diag(alpha) | GS] [DU; W] is one gemm; grad_scores go to
  // gs_op (opmath [B, L, N]) instead of grad_scores.
  const T* weight = nullptr;       // [N, F]
  const scalar_t* out = nullptr;   // [B, N*F], the forward's output (with shift)
  const T* grad_attn = nullptr;  // [B, N, L] or nullptr: added to da before the softmax backward
  T* gs_op = nullptr;
  // [B] or nullptr. Padded frames are never read: NaN or Inf there must not reach a gradient
  // through 0 * NaN (their attention is 0, so they contribute nothing in exact arithmetic).
  const int64_t* lengths = nullptr;

  int64_t dv_rows() const { return weight != nullptr ? 2 * s.N : s.N; }

  // v of unit (b, n) -> dv = d loss / d v in place; writes the unit's alpha/beta partials.
  // With r = sqrt(||u||^2 + eps_sqrt), k = (u.g) / r^2:  du = c/r (g - k u),  dv = alpha du
  // (c = 1/sqrt(N); dr/du = u/r with or without eps_sqrt);
  // clamped norm: du = c/eps g (clamp_min passes no gradient to the norm).
  // The scalars come from double sums: with beta dominating u, u/r is nearly constant and
  // grad_beta = c/r (sum g - k sum u) cancels by orders of magnitude. dv itself is in opmath.
  ATTNPOOL_INLINE void unit_backward(int64_t b, int64_t n, T* vd) const {
    const int64_t F = s.F;
    const scalar_t* g = grad_out + (b * s.N + n) * F;
    double* part = partials + (b * s.N + n) * 2;
    if (!shift) {
      for (int64_t f = 0; f < F; ++f) vd[f] = static_cast<T>(g[f]);
      part[0] = part[1] = 0;
      return;
    }
    const double al = alpha[n], be = beta[n];
    // The next unit's g row is fetched from memory while this one computes.
    const scalar_t* g_next = n + 1 < s.N ? g + F : g;
    // Sums over f of u u, u g, u, g, u v, g v.
    double acc[6][kSumLanes] = {};
    double sums[6] = {};
    int64_t f = 0;
    for (; f + kSumLanes <= F; f += kSumLanes) {
      prefetch(g_next + f, kSumLanes * sizeof(scalar_t));
      for (int l = 0; l < kSumLanes; ++l) {
        const double v = vd[f + l], gf = static_cast<T>(g[f + l]);
        const double u = al * v + be;
        acc[0][l] += u * u;
        acc[1][l] += u * gf;
        acc[2][l] += u;
        acc[3][l] += gf;
        acc[4][l] += u * v;
        acc[5][l] += gf * v;
      }
    }
    for (; f < F; ++f) {
      const double v = vd[f], gf = static_cast<T>(g[f]);
      const double u = al * v + be;
      sums[0] += u * u;
      sums[1] += u * gf;
      sums[2] += u;
      sums[3] += gf;
      sums[4] += u * v;
      sums[5] += gf * v;
    }
    for (int i = 0; i < 6; ++i) sums[i] += fold<kSumLanes>(acc[i]);
    const bool unclamped = !(norm[b * s.N + n] < eps);  // a NaN norm stays NaN this way
    const double r = unclamped ? std::sqrt(sums[0] + static_cast<double>(eps_sqrt))
                               : static_cast<double>(eps);
    const double d1 = 1.0 / (std::sqrt(static_cast<double>(s.N)) * r);
    const double k = unclamped ? sums[1] / r / r : 0.0;
    part[0] = d1 * (sums[5] - k * sums[4]);  // sum_f du v
    part[1] = d1 * (sums[3] - k * sums[2]);  // sum_f du
    const T p = static_cast<T>(al * d1), q = static_cast<T>(al * d1 * k);
    const T alt = alpha[n], bet = beta[n];
    if (k == 0.0) {  // g alone: an Inf in v must not turn dv NaN through 0 * Inf
      for (f = 0; f < F; ++f) vd[f] = p * static_cast<T>(g[f]);
    } else {
      for (f = 0; f < F; ++f) vd[f] = p * static_cast<T>(g[f]) - q * (alt * vd[f] + bet);
    }
  }

  // fc1: du of unit (b, n) into du (opmath) from the forward's output o = u / (sqrt(N) d),
  // d = max(r, eps). o is parallel to u, so k u (unit_backward) = (u.g) u / r^2
  // = c (o.g) o / (o.o) with c = ||u||^2 / r^2 = 1 - eps_sqrt / r^2, and
  // du = (g - k' o) / (sqrt(N) d), k' = c (o.g) / (o.o), unclamped; g / (sqrt(N) eps) clamped.
  // k' takes o.o from the stored o itself rather than its known value 1 / N, so that g - k' o
  // is orthogonal to o as stored (the rounding of out and of the norm would otherwise leak
  // into grad_beta's cancelling sum). Writes the unit's beta partial; its alpha partial,
  // sum_f du v = sum_l a_l (du . x_l), follows from the d attention (do_units).
  // [pf, pf + pf_bytes) is prefetched along the way.
  template <int kVec>
  ATTNPOOL_INLINE void unit_du(int64_t b, int64_t n, T* du, const char* pf,
                               int64_t pf_bytes) const {
    const int64_t F = s.F;
    const scalar_t* g = grad_out + (b * s.N + n) * F;
    double* part = partials + (b * s.N + n) * 2;
    if (!shift) {
      for (int64_t f = 0; f < F; ++f) du[f] = static_cast<T>(g[f]);
      part[1] = 0;
      return;
    }
    const scalar_t* o = out + (b * s.N + n) * F;
    const bool more = n + 1 < s.N;
    // Sums over f of o o, o (pass 1) and of o g, g (pass 2, which prefetches the next unit's
    // rows and the slice of pf).
    double oo, so, og, sg;
    lane_sums<kVec, T, true>(F, o, o, oo, so, [](int64_t) {});
    lane_sums<kVec, T, false>(F, o, g, og, sg, [&](int64_t f) ATTNPOOL_INLINE_LAMBDA {
      if (more) {
        prefetch(g + F + f, kSumLanes * sizeof(scalar_t));
        prefetch(o + F + f, kSumLanes * sizeof(scalar_t));
      }
      const int64_t line = f / kSumLanes * 64;  // a line of pf per step
      if (line < pf_bytes) prefetch(pf + line, 64);
    });
    const double r = norm[b * s.N + n];
    const bool unclamped = !(r < eps);  // a NaN norm stays NaN this way
    const double d1 = 1.0 / (std::sqrt(static_cast<double>(s.N)) * (unclamped ? r : eps));
    // o = 0 (u = 0 with eps in the root): no projection, as k = 0 / r^2 in unit_backward
    const double k = unclamped && oo != 0.0
                         ? og / oo * (1.0 - static_cast<double>(eps_sqrt) / (r * r))
                         : 0.0;
    part[1] = d1 * (sg - k * so);  // sum_f du
    const T p = static_cast<T>(d1), q = static_cast<T>(d1 * k);
    if (k == 0.0) {  // g alone: an Inf in o must not turn du NaN through 0 * Inf
      for (int64_t f = 0; f < F; ++f) du[f] = p * static_cast<T>(g[f]);
    } else {
      for (int64_t f = 0; f < F; ++f) du[f] = p * static_cast<T>(g[f]) - q * static_cast<T>(o[f]);
    }
  }

  // Units [n0, n1) of sample b: their dv rows (fc1: du rows) into dv (row n at dv + n*F),
  // grad_scores columns and alpha/beta partials. da: scratch of (n1 - n0) * L.
  template <int kVec>
  ATTNPOOL_INLINE void do_units(int64_t b, int64_t n0, int64_t n1, const T* xb, T* dv,
                                T* da) const {
    using Tile = Tiling<kVec, T>;
    const int64_t L = s.L, F = s.F, N = s.N, rows = n1 - n0;
    const int64_t len = valid_length(lengths, b, L);
    const T* ab = attn + (b * N + n0) * L;
    T* dvb = dv + n0 * ldv;
    if (weight != nullptr) {
      // Each unit's step streams its rows of g and out (a 4 KiB page each at F = 1024, where
      // the hardware prefetchers stop) and asks for the next unit's, and for a slice of this
      // sample's x, which da reads next: in the interleaved benchmark, where x, g and out come
      // from memory, the backward went 1.95 -> 1.80 ms (AVX-512, B=32, L=25, F=1024, N=32).
      const int64_t xbytes = len * F * int64_t(sizeof(scalar_t));
      const char* xr = reinterpret_cast<const char*>(x + b * L * F);
      const int64_t slice = (xbytes / (n1 - n0) + 63) / 64 * 64;
      for (int64_t n = n0; n < n1; ++n)
        unit_du<kVec>(b, n, dv + n * ldv, xr + (n - n0) * slice,
                      std::min(slice, std::max<int64_t>(0, xbytes - (n - n0) * slice)));
    } else {  // v = A X over the valid frames, then dv in place
      gemm<kVec, Tile::kRows, Tile::kVecs>(rows, F, len, ab, L, 1, xb, F, dvb, ldv);
      for (int64_t n = n0; n < n1; ++n) unit_backward(b, n, dv + n * ldv);
    }
    // da = DV X^T (fc1: alpha DU X^T; 0 on padded frames), then the softmax backward
    // grad_scores_l = a_l (da_l - sum_l' a_l' da_l').
    if (len >= kDaGemmFrames) {
      // as a gemm of x and DV^T (transposed here, columns past rows zero) into da^T: the dot
      // tiles stream every row of x from L2 once per block of units (x alone is 1.2 MB at
      // L = 300), the gemm's panels keep theirs in L1
      constexpr int V = kVec / sizeof(T);
      const int64_t cols = (rows + V - 1) / V * V, ldt = (rows + 15) / 16 * 16;
      thread_local std::vector<T> dvt, dat;
      if (static_cast<int64_t>(dvt.size()) < F * ldt) dvt.resize(F * ldt);
      if (static_cast<int64_t>(dat.size()) < len * cols) dat.resize(len * cols);
      for (int64_t f0 = 0; f0 < F; f0 += 16)  // 16 columns at a time: the rows' lines stay in L1
        for (int64_t r = 0; r < cols; ++r)
          for (int64_t f = f0; f < std::min(F, f0 + 16); ++f)
            dvt[f * ldt + r] = r < rows ? dvb[r * ldv + f] : T(0);
      gemm<kVec, Tile::kRows, Tile::kVecs>(len, cols, F, xb, F, 1, dvt.data(), ldt, dat.data(),
                                           cols, /*pack_b=*/false);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t l = 0; l < len; ++l) da[r * L + l] = dat[l * cols + r];
    } else {
      dots<kVec, Tile::kDotRows, Tile::kDotCols>(rows, len, F, dvb, ldv, xb, F, da, L);
    }
    if (weight != nullptr) {  // da holds DU X^T: the alpha partials, then da itself
      for (int64_t r = 0; r < rows; ++r) {
        T* dr = da + r * L;
        double ga = 0;
        if (shift) {
          for (int64_t l = 0; l < len; ++l) ga += static_cast<double>(ab[r * L + l]) * dr[l];
          const T al = alpha[n0 + r];
          for (int64_t l = 0; l < len; ++l) dr[l] *= al;
        }
        partials[(b * N + n0 + r) * 2] = ga;
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t l = len; l < L; ++l) da[r * L + l] = T(0);
    if (grad_attn != nullptr) {
      const T* ga = grad_attn + (b * N + n0) * L;
      for (int64_t k = 0; k < rows * L; ++k) da[k] += ga[k];
    }
    scalar_t* gs = weight == nullptr ? grad_scores + b * L * N : nullptr;
    T* gso = weight != nullptr ? gs_op + b * L * N : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      const T* ar = ab + r * L;
      const T* dr = da + r * L;
      T ad = 0;
      for (int64_t l = 0; l < L; ++l) ad += ar[l] * dr[l];
      if (weight != nullptr) {
        for (int64_t l = 0; l < L; ++l) gso[l * N + n0 + r] = ar[l] * (dr[l] - ad);
      } else {
        for (int64_t l = 0; l < L; ++l)
          gs[l * N + n0 + r] = static_cast<scalar_t>(ar[l] * (dr[l] - ad));
      }
    }
  }

  // grad_x rows [l0, l1) of sample b: A^T DV.
  // fc1: dv holds [DU; W] (2N rows), and ca, scratch of (l1 - l0) * 2N, [A^T diag(alpha) | GS].
  template <int kVec>
  ATTNPOOL_INLINE void do_frames(int64_t b, int64_t l0, int64_t l1, const T* dv, T* ca) const {
    using Tile = Tiling<kVec, T>;
    const int64_t L = s.L, F = s.F, N = s.N;
    if (weight == nullptr) {
      gemm<kVec, Tile::kWideRows, Tile::kWideVecs>(l1 - l0, F, N, attn + b * N * L + l0, 1, L,
                                                   dv, ldv, grad_x + (b * L + l0) * F, F,
                                                   /*pack_b=*/false);
      return;
    }
    const T* ab = attn + b * N * L;
    const T* gso = gs_op + b * L * N;
    for (int64_t l = l0; l < l1; ++l) {
      T* row = ca + (l - l0) * 2 * N;
      for (int64_t n = 0; n < N; ++n) row[n] = shift ? ab[n * L + l] * alpha[n] : ab[n * L + l];
      for (int64_t n = 0; n < N; ++n) row[N + n] = gso[l * N + n];
    }
    // Packed from 128 units on, over a few panels of frames: a column block of [DU; W] (32 KiB
    // and up) then comes from L1 for every panel, where unpacked each panel streamed all 2N
    // rows, a page apart, from L2 (B=8, L=25, F=1024, N=256, backward: AVX-512 3.3 -> 2.9 ms,
    // AVX2 4.9 -> 3.7; N=128 alike either way; at N=64 packing costs 4-10 %). Over many
    // panels (long clips) the column-major order of the packed gemm scatters the writes of
    // grad_x over as many rows and pages: 15-30 % slower at L=300, N=32.
    gemm<kVec, Tile::kWideRows, Tile::kWideVecs>(l1 - l0, F, 2 * N, ca, 2 * N, 1, dv, ldv,
                                                 grad_x + (b * L + l0) * F, F,
                                                 /*pack_b=*/2 * N >= 256 && l1 - l0 <= 64);
  }

  template <int kVec>
  ATTNPOOL_INLINE void run(int64_t t0, int64_t t1) const {
    const int64_t L = s.L, F = s.F, N = s.N;
    std::vector<T> xs(std::is_same_v<scalar_t, T> || phase == kFrames ? 0 : L * F);
    const int64_t D = dv_rows();
    // Kept by the thread between calls: allocated afresh, its pages came back zeroed from the
    // kernel on most calls (minor faults, ~0.1 ms per backward at B=32, L=25, F=1024, N=32).
    thread_local Scratch<T> dv_scratch;
    T* dv = phase == kSample ? dv_scratch.get(D * ldv) : nullptr;
    if (weight != nullptr && phase == kSample)
      for (int64_t n = 0; n < N; ++n)
        std::memcpy(dv + (N + n) * ldv, weight + n * F, F * sizeof(T));
    std::vector<T> da(phase == kFrames ? 0 : N * L);
    std::vector<T> ca(weight != nullptr && phase != kUnits ? 2 * N * L : 0);
    // One call site each for do_units and do_frames, whatever the phase: GCC compiles every
    // inlined copy on its own (contraction into FMAs and vectorisation may differ between
    // copies), so a copy per phase gave results that changed in the last bits with the
    // thread count, which picks the phases.
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b = t, n0 = 0, n1 = N, l0 = 0, l1 = L;
      T* dvb = dv;
      if (phase == kUnits) {
        b = t / units.blocks;
        n0 = (t % units.blocks) * units.block;
        n1 = std::min(N, n0 + units.block);
      } else if (phase == kFrames) {
        b = t / frames.blocks;
        l0 = (t % frames.blocks) * frames.block;
        l1 = std::min(L, l0 + frames.block);
      }
      if (dvb == nullptr) dvb = workspace + b * D * ldv;
      if (phase != kFrames) {
        const T* xb = as_opmath<T>(x + b * L * F, L * F, xs.data());
        do_units<kVec>(b, n0, n1, xb, dvb, da.data());
      }
      if (phase != kUnits) do_frames<kVec>(b, l0, l1, dvb, ca.data());
    }
  }
};

// fc1 weight gradient: grad_weight[:, f0:f1] = GS^T X over all B*L frames, one in-order sum
// per element (deterministic whatever the threads or the block width); a task is a block of
// columns. x is copied a chunk of frames at a time (zero on padded frames, converted to
// opmath) with rows of the whole block: up to 1 KiB read per 4 KiB row of x, where packing
// one tile's width (64-128 B) per row left the reads bound by latency (the weight gradient
// at B=32, L=25, F=1024, N=32 in the interleaved benchmark: AVX-512 0.35 -> 0.25 ms,
// AVX2 0.56 -> 0.33). Between chunks gw holds the running sum in T, as a register would.
template <typename scalar_t>
struct WeightGradJob {
  using T = at::opmath_type<scalar_t>;
  static constexpr int64_t kChunkBytes = 32 * 1024;
  Shape s;
  int64_t block;  // columns per task (any width: no bit depends on it)
  const scalar_t* x;
  const T* gs;  // [B*L, N]
  T* gw;        // [N, F]
  const int64_t* lengths;  // [B] or nullptr; padded frames are read as 0 (see BackwardJob)

  template <int kVec>
  ATTNPOOL_INLINE void run(int64_t t0, int64_t t1) const {
    using Tile = Tiling<kVec, T>;
    const int64_t K = s.B * s.L, F = s.F, N = s.N;
    const int64_t kc = std::max<int64_t>(1, kChunkBytes / (block * int64_t(sizeof(T))));
    thread_local std::vector<T> xs;
    if (static_cast<int64_t>(xs.size()) < kc * block) xs.resize(kc * block);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t f0 = t * block, fw = std::min(F, f0 + block) - f0;
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t n = std::min(kc, K - k0);
        for (int64_t k = k0; k < k0 + n; ++k) {
          T* dst = xs.data() + (k - k0) * fw;
          const scalar_t* src = x + k * F + f0;
          if (lengths != nullptr && k % s.L >= valid_length(lengths, k / s.L, s.L)) {
            std::fill(dst, dst + fw, T(0));
          } else if constexpr (std::is_same_v<scalar_t, T>) {
            std::memcpy(dst, src, fw * sizeof(T));
          } else {
            for (int64_t f = 0; f < fw; ++f) dst[f] = static_cast<T>(src[f]);
          }
        }
        gemm<kVec, Tile::kRows, Tile::kVecs>(N, fw, n, gs + k0 * N, 1, N, xs.data(), fw, gw + f0,
                                             F, /*pack_b=*/false, /*add=*/k0 > 0);
      }
    }
  }
};

// ---------------------------------------------------------------- checks

void check_tensor(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(),
              "attention_cluster cpu: ", name, " must be a contiguous CPU ", dtype, " tensor, got ",
              t.scalar_type(), " on ", t.device());
}

void check_common(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& beta,
                  int64_t N) {
  TORCH_CHECK(x.dim() == 3, "attention_cluster cpu: x must be [B, L, F], got ", x.sizes());
  check_tensor(x, x.scalar_type(), "x");
  check_tensor(alpha, x.scalar_type(), "alpha");
  check_tensor(beta, x.scalar_type(), "beta");
  TORCH_CHECK(alpha.numel() == N && beta.numel() == N,
              "attention_cluster cpu: alpha and beta must be [N=", N, "]");
}

// scores [B, L, N] given, or (fc1) computed from weight [N, F] in the tasks.
ClusterForward forward_impl(const at::Tensor& x, const at::Tensor* scores,
                            const at::Tensor* weight, const c10::optional<at::Tensor>& lengths,
                            const at::Tensor& alpha, const at::Tensor& beta, bool shift,
                            double eps, double eps_sqrt) {
  TORCH_CHECK(x.dim() == 3, "attention_cluster cpu: x must be [B, L, F], got ", x.sizes());
  int64_t N;
  if (scores != nullptr) {
    TORCH_CHECK(scores->dim() == 3, "attention_cluster cpu: scores must be [B, L, N]");
    N = scores->size(2);
  } else {
    TORCH_CHECK(weight->dim() == 2 && weight->size(1) == x.size(2),
                "attention_cluster cpu: weight must be [N, F] with x's F, got ", weight->sizes());
    N = weight->size(0);
  }
  const Shape s{x.size(0), x.size(1), x.size(2), N};
  check_common(x, alpha, beta, s.N);
  if (scores != nullptr) {
    check_tensor(*scores, opmath_dtype(x.scalar_type()), "scores");
    TORCH_CHECK(scores->size(0) == s.B && scores->size(1) == s.L,
                "attention_cluster cpu: scores must be [B, L, N] with x's B, L, got ", scores->sizes());
  } else {
    check_tensor(*weight, x.scalar_type(), "weight");
  }
  const int64_t* len = nullptr;
  if (lengths.has_value()) {
    check_tensor(*lengths, at::kLong, "lengths");
    TORCH_CHECK(lengths->numel() == s.B, "attention_cluster cpu: lengths must be [B=", s.B, "]");
    len = lengths->const_data_ptr<int64_t>();
  }
  const auto opmath = opmath_dtype(x.scalar_type());
  const at::Tensor al = alpha.to(opmath), be = beta.to(opmath);
  // fc1: weight^T, its columns past N zero for at least a register (16 floats at most), so
  // that every block of units computes whole registers of scores.
  const int64_t ldw = (N + 16 + 15) / 16 * 16;
  at::Tensor wt;
  if (weight != nullptr) wt = at::empty({s.F, ldw}, x.options().dtype(opmath));
  at::Tensor out = at::empty({s.B, s.N * s.F}, x.options());
  at::Tensor attn = at::empty({s.B, s.N, s.L}, x.options().dtype(opmath));
  at::Tensor norm = at::empty({s.B, s.N}, x.options().dtype(opmath));
  if (out.numel() == 0 || attn.numel() == 0) return {out, attn, norm};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "attention_cluster_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    if (weight != nullptr) {  // wt = weight^T, blocks of kRows rows of wt per task
      // (torch's strided copy into a zeroed wt took 0.1 ms per call at F = 1024, N = 128)
      constexpr int64_t kRows = 64;
      const scalar_t* w = weight->const_data_ptr<scalar_t>();
      T* wtp = wt.mutable_data_ptr<T>();
      parallel_run((s.F + kRows - 1) / kRows, Tasks([&](int64_t i) ATTNPOOL_INLINE_LAMBDA {
        const int64_t f0 = i * kRows, f1 = std::min(s.F, f0 + kRows);
        for (int64_t f = f0; f < f1; ++f) std::fill(wtp + f * ldw + N, wtp + (f + 1) * ldw, T(0));
        for (int64_t n = 0; n < N; ++n)
          for (int64_t f = f0; f < f1; ++f) wtp[f * ldw + n] = static_cast<T>(w[n * s.F + f]);
      }));
    }
    const ForwardJob<scalar_t> job{s, Split(s.B, s.N, kRowAlign), x.const_data_ptr<scalar_t>(),
                                   scores ? scores->const_data_ptr<T>() : nullptr,
                                   weight ? wt.const_data_ptr<T>() : nullptr, ldw, len,
                                   al.const_data_ptr<T>(), be.const_data_ptr<T>(), shift,
                                   static_cast<T>(eps), static_cast<T>(eps_sqrt),
                                   out.mutable_data_ptr<scalar_t>(),
                                   attn.mutable_data_ptr<T>(), norm.mutable_data_ptr<T>()};
    parallel_run(s.B * job.units.blocks, job);
  });
  return {out, attn, norm};
}

// With weight (fc1), the second result is grad_weight [N, F] instead of grad_scores.
ClusterBackward backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& attn, const at::Tensor& norm,
                              const at::Tensor& alpha, const at::Tensor& beta, bool shift,
                              double eps, double eps_sqrt, const at::Tensor* weight,
                              const c10::optional<at::Tensor>* out,
                              const c10::optional<at::Tensor>& grad_attn,
                              const c10::optional<at::Tensor>& lengths) {
  TORCH_CHECK(x.dim() == 3, "attention_cluster cpu: x must be [B, L, F], got ", x.sizes());
  TORCH_CHECK(attn.dim() == 3, "attention_cluster cpu: attn must be [B, N, L]");
  const Shape s{x.size(0), x.size(1), x.size(2), attn.size(1)};
  check_common(x, alpha, beta, s.N);
  check_tensor(grad_out, x.scalar_type(), "grad_out");
  const auto opmath = opmath_dtype(x.scalar_type());
  check_tensor(attn, opmath, "attn");
  check_tensor(norm, opmath, "norm");
  TORCH_CHECK(grad_out.numel() == s.B * s.N * s.F && attn.size(0) == s.B &&
                  attn.size(2) == s.L && norm.numel() == s.B * s.N,
              "attention_cluster cpu: grad_out must be [B, N*F], attn [B, N, L], norm [B, N]");
  const at::Tensor al = alpha.to(opmath), be = beta.to(opmath);
  const bool fc1 = weight != nullptr;
  at::Tensor w, gat;
  if (fc1) {
    check_tensor(*weight, x.scalar_type(), "weight");
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == s.N && weight->size(1) == s.F,
                "attention_cluster cpu: weight must be [N, F], got ", weight->sizes());
    w = weight->to(opmath).contiguous();
    if (shift) {
      TORCH_CHECK(out->has_value(), "attention_cluster cpu: the fc1 backward needs out (shift)");
      check_tensor(**out, x.scalar_type(), "out");
      TORCH_CHECK((*out)->numel() == s.B * s.N * s.F,
                  "attention_cluster cpu: out must be [B, N*F]");
    }
    if (grad_attn.has_value()) {
      TORCH_CHECK(grad_attn->numel() == s.B * s.N * s.L,
                  "attention_cluster cpu: grad_attn must be [B, N, L]");
      gat = grad_attn->to(opmath).contiguous();
    }
  }
  const int64_t* len = nullptr;
  if (lengths.has_value()) {
    check_tensor(*lengths, at::kLong, "lengths");
    TORCH_CHECK(lengths->numel() == s.B, "attention_cluster cpu: lengths must be [B=", s.B, "]");
    len = lengths->const_data_ptr<int64_t>();
  }
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_scores = fc1 ? at::empty({s.B, s.L, s.N}, x.options().dtype(opmath))
                               : at::empty({s.B, s.L, s.N}, x.options());
  at::Tensor partials = at::empty({s.B, s.N, 2}, x.options().dtype(at::kDouble));
  if (x.numel() == 0 || attn.numel() == 0)
    return {grad_x.zero_(), fc1 ? at::zeros_like(*weight) : grad_scores.zero_(),
            at::zeros_like(alpha), at::zeros_like(beta)};

  // With fewer than two samples per thread, one task per sample would idle threads: then the
  // units of each sample and, after them, its frames are split over the threads, through a
  // DV workspace of B < 2 * threads samples.
  const bool split = s.B < 2 * at::get_num_threads();
  const int64_t line = 64 / at::elementSize(opmath);  // BackwardJob::ldv
  int64_t ldv = (s.F + line - 1) / line * line;
  if (ldv * at::elementSize(opmath) % 512 == 0) ldv += line;
  at::Tensor workspace;
  if (split) {
    workspace = at::empty({s.B, fc1 ? 2 * s.N : s.N, ldv}, x.options().dtype(opmath));
    if (fc1)
      workspace.narrow(1, s.N, s.N).narrow(2, 0, s.F).copy_(w.unsqueeze(0).expand({s.B, s.N, s.F}));
  }
  at::Tensor grad_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "attention_cluster_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    using Job = BackwardJob<scalar_t>;
    Job job{s, Job::kSample, Split(s.B, s.N, kRowAlign), Split(s.B, s.L, kRowAlign),
            grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            attn.const_data_ptr<T>(), norm.const_data_ptr<T>(), al.const_data_ptr<T>(),
            be.const_data_ptr<T>(), shift, static_cast<T>(eps), static_cast<T>(eps_sqrt), ldv,
            split ? workspace.mutable_data_ptr<T>() : nullptr,
            grad_x.mutable_data_ptr<scalar_t>(),
            fc1 ? nullptr : grad_scores.mutable_data_ptr<scalar_t>(),
            partials.mutable_data_ptr<double>()};
    job.lengths = len;
    if (fc1) {
      job.weight = w.const_data_ptr<T>();
      job.out = out->has_value() ? (*out)->const_data_ptr<scalar_t>() : nullptr;
      job.grad_attn = gat.defined() ? gat.const_data_ptr<T>() : nullptr;
      job.gs_op = grad_scores.mutable_data_ptr<T>();
    }
    if (!split) {
      parallel_run(s.B, job);
    } else {
      job.phase = Job::kUnits;
      parallel_run(s.B * job.units.blocks, job);
      job.phase = Job::kFrames;
      parallel_run(s.B * job.frames.blocks, job);
    }
    if (fc1) {
      using WJob = WeightGradJob<scalar_t>;
      at::Tensor gw = at::empty({s.N, s.F}, x.options().dtype(opmath));
      // about two tasks per thread, in whole AVX-512 tiles, at most 1 KiB of fp32 per row
      const int64_t tasks = 2 * at::get_num_threads();
      const int64_t block =
          std::clamp<int64_t>(((s.F + tasks - 1) / tasks + 31) / 32 * 32, 32, 256);
      const WJob wjob{s, block, x.const_data_ptr<scalar_t>(), grad_scores.const_data_ptr<T>(),
                      gw.mutable_data_ptr<T>(), len};
      parallel_run((s.F + block - 1) / block, wjob);
      grad_weight = gw.to(weight->scalar_type());
    }
  });
  // Per-sample partials summed over b in order.
  at::Tensor grad_alpha = at::zeros({s.N}, x.options().dtype(at::kDouble));
  at::Tensor grad_beta = at::zeros({s.N}, x.options().dtype(at::kDouble));
  double* ga = grad_alpha.mutable_data_ptr<double>();
  double* gb = grad_beta.mutable_data_ptr<double>();
  const double* part = partials.const_data_ptr<double>();
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t n = 0; n < s.N; ++n) {
      ga[n] += part[(b * s.N + n) * 2];
      gb[n] += part[(b * s.N + n) * 2 + 1];
    }
  return {grad_x, fc1 ? grad_weight : grad_scores, grad_alpha.to(x.scalar_type()),
          grad_beta.to(x.scalar_type())};
}

}  // namespace

ClusterForward attention_cluster_forward_cpu(const at::Tensor& x, const at::Tensor& scores,
                                        const c10::optional<at::Tensor>& lengths,
                                        const at::Tensor& alpha, const at::Tensor& beta,
                                        bool shift, double eps, double eps_sqrt) {
  return forward_impl(x, &scores, nullptr, lengths, alpha, beta, shift, eps, eps_sqrt);
}

ClusterBackward attention_cluster_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                          const at::Tensor& attn, const at::Tensor& norm,
                                          const at::Tensor& alpha, const at::Tensor& beta,
                                          const c10::optional<at::Tensor>& lengths, bool shift,
                                          double eps, double eps_sqrt) {
  return backward_impl(grad_out, x, attn, norm, alpha, beta, shift, eps, eps_sqrt, nullptr,
                       nullptr, c10::nullopt, lengths);
}

ClusterForward attention_cluster_fc1_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& lengths,
                                            const at::Tensor& alpha, const at::Tensor& beta,
                                            bool shift, double eps, double eps_sqrt) {
  return forward_impl(x, nullptr, &weight, lengths, alpha, beta, shift, eps, eps_sqrt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cluster_fc1_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_attn, const at::Tensor& x,
    const at::Tensor& weight, const c10::optional<at::Tensor>& out, const at::Tensor& attn,
    const at::Tensor& norm, const at::Tensor& alpha, const at::Tensor& beta,
    const c10::optional<at::Tensor>& lengths, bool shift, double eps, double eps_sqrt) {
  return backward_impl(grad_out, x, attn, norm, alpha, beta, shift, eps, eps_sqrt, &weight, &out,
                       grad_attn, lengths);
}

}  // namespace attnpool
