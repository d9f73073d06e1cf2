// Fused CPU kernels of the spatio-temporal regulariser (Meng et al., ICLR 2019; docs/design.md
// "Spatio-temporal attention",
// contract in attnpool.h): total variation and contrast of the masks [B, T, H, W] and
// unimodality of the temporal weights [B, T], weighted and summed, in ONE parallel pass over
// the B*T maps for the forward and ONE for the backward.
//
// Map (b, t) also owns the unimodality term r_t of its sample (forward) and grad_w[b, t]
// (backward), so every pass is a single at::parallel_for over maps. Everything is computed in
// opmath (float, or double for double). Deterministic: the forward sums each map in a fixed
// order into the partial of its chunk (a fixed number of maps, set by the shape alone) and the
// chunk partials in chunk order, so the result does not even depend on the thread count; the
// backward has no sums across maps.
#include "attnpool.h"
#include "cpu/isa.h"
#include "cpu/loops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

namespace attnpool {
namespace {

constexpr int64_t kChunkElems = 4096;      // mask elements per forward partial (about)
constexpr int64_t kThreadElems = 1 << 15;  // fewer elements than this per thread: not worth one

// The element functions below are selects, not products with static_cast<T>(bool): GCC
// vectorises those for AVX-512 (mask registers) but left them as scalar branches for AVX2,
// where the regulariser's forward then ran 7x slower.

// sign as torch: 0 for 0 and for NaN.
template <typename T>
C10_ALWAYS_INLINE T sign(T d) {
  return (d > T(0) ? T(1) : T(0)) - (d < T(0) ? T(1) : T(0));
}

// 0.5*M*[M<0.5] - 0.5*M*[M>0.5], as the reference: the unselected side is 0.5*M*0, so a NaN
// or inf M stays NaN.
template <typename T>
C10_ALWAYS_INLINE T contrast(T v) {
  const T half(0.5), a = half * v, z = a * T(0);
  return (v < half ? a : z) - (v > half ? a : z);
}

// d contrast / d M: 0.5 below 0.5, -0.5 above, 0 at 0.5 and for NaN.
template <typename T>
C10_ALWAYS_INLINE T contrast_slope(T v) {
  const T half(0.5);
  return (v < half ? half : T(0)) - (v > half ? half : T(0));
}

// A product rounded on its own, as the reference's: the volatile store keeps the compiler from
// fusing it into an FMA with the subtraction that follows (which would leave the rounding error
// of w[t]^2 where equal neighbours must give exactly 0). CUDA's __dmul_rn does the same.
C10_ALWAYS_INLINE double mul_rn(double a, double b) {
  volatile double p = a * b;
  return p;
}

// q_t = w[t-1] w[t+1] - w[t]^2 of one sample's weights, 1 <= t <= T-2, formed in double: the
// products of float / half / bfloat16 weights are exact there, so q is rounded once, as the
// float64 reference has it (q cancels near relu's threshold, and sqrt's slope 1 / (2 sqrt(q))
// magnifies any error of q far beyond float32 precision). q, the term and its slope stay in
// double: q of small float32 weights (w ~ 1e-19) would be a float32 denormal.
template <typename scalar_t>
C10_ALWAYS_INLINE double unimodal_q(const scalar_t* w, int64_t t) {
  const double wl = static_cast<double>(w[t - 1]);
  const double wc = static_cast<double>(w[t]);
  const double wr = static_cast<double>(w[t + 1]);
  return mul_rn(wl, wr) - mul_rn(wc, wc);
}

// relu(q), or its square root: a NaN passes, as torch's relu.
C10_ALWAYS_INLINE double unimodal_term(double q, bool sqrt) {
  const double r = q <= 0.0 ? 0.0 : q;
  return sqrt ? std::sqrt(r) : r;
}

// d term / d q (times `scale`), as torch's autograd: 0 where relu's input is <= 0 (NaN passes).
C10_ALWAYS_INLINE double unimodal_slope(double q, bool sqrt, double scale) {
  if (q <= 0.0) return 0.0;
  return sqrt ? scale / (2.0 * std::sqrt(q)) : scale;
}

struct Shape {
  int64_t B, T, H, W;
};

void check_inputs(const at::Tensor& mask, const at::Tensor& w) {
  TORCH_CHECK(mask.device().is_cpu() && w.device().is_cpu(),
              "st_regularizer cpu: tensors must be on the CPU");
  TORCH_CHECK(mask.dim() == 4, "st_regularizer cpu: mask must be [B, T, H, W], got ",
              mask.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == mask.size(0) && w.size(1) == mask.size(1),
              "st_regularizer cpu: w must be [B, T] = [", mask.size(0), ", ", mask.size(1),
              "], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == mask.scalar_type(),
              "st_regularizer cpu: w must have mask's dtype ", mask.scalar_type());
}

// Forward of maps [m0, m1) (one chunk): sums of |differences|, of contrast and of the
// unimodality terms owned by these maps, into part[0..2]. The chunk's maps are contiguous, so
// each sum is one long vectorised loop over them all; keep_v[k] / keep_h[k] are 1 at flat
// positions k that start a vertical / horizontal pair and 0 in a map's last row / column.
// (A pair across maps is multiplied by 0, which turns an inf difference into NaN; the
// contrast of that inf is NaN already, and so is every weighted total.)
template <typename scalar_t>
C10_ALWAYS_INLINE void forward_chunk(const Shape& s, const scalar_t* mask, const scalar_t* w,
                                     bool sqrt, int64_t m0, int64_t m1,
                                     const at::opmath_type<scalar_t>* keep_v,
                                     const at::opmath_type<scalar_t>* keep_h,
                                     at::opmath_type<scalar_t>* part) {
  using T = at::opmath_type<scalar_t>;
  const int64_t W = s.W, HW = s.H * W, L = (m1 - m0) * HW;
  const scalar_t* M = mask + m0 * HW;
  T tv = 0, tvh = 0, con = 0, uni = 0;
  // omp simd reassociates these sums: a fixed order per instruction set
#pragma omp simd reduction(+ : tv)
  for (int64_t k = 0; k < L - W; ++k)
    tv += keep_v[k] * std::abs(static_cast<T>(M[k + W]) - static_cast<T>(M[k]));
#pragma omp simd reduction(+ : tvh)
  for (int64_t k = 0; k < L - 1; ++k)
    tvh += keep_h[k] * std::abs(static_cast<T>(M[k + 1]) - static_cast<T>(M[k]));
#pragma omp simd reduction(+ : con)
  for (int64_t k = 0; k < L; ++k) con += contrast(static_cast<T>(M[k]));
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t b = m / s.T, t = m % s.T;
    if (t >= 1 && t + 1 < s.T) {
      uni += static_cast<T>(unimodal_term(unimodal_q(w + b * s.T, t), sqrt));
    }
  }
  part[0] = tv + tvh;
  part[1] = con;
  part[2] = uni;
}

// Backward of maps [m0, m1) (one chunk, flat as in the forward): grad_mask and grad_w[b, t]
// of each map (b, t). d TV / d M is a sum of signs, a small integer, so it is exact in any
// order: each pair's sign (times keep, 0 across maps) goes to both its ends, in whole-chunk
// loops without branches (they vectorise), then it is scaled.
template <typename scalar_t>
C10_ALWAYS_INLINE void backward_maps(const Shape& s, const scalar_t* mask, const scalar_t* w,
                                     bool sqrt, at::opmath_type<scalar_t> tv_s,
                                     at::opmath_type<scalar_t> con_s,
                                     at::opmath_type<scalar_t> uni_s, int64_t m0, int64_t m1,
                                     const at::opmath_type<scalar_t>* keep_v,
                                     const at::opmath_type<scalar_t>* keep_h,
                                     scalar_t* grad_mask, scalar_t* grad_w) {
  using T = at::opmath_type<scalar_t>;
  const int64_t W = s.W, HW = s.H * W, TT = s.T, L = (m1 - m0) * HW;
  std::vector<T> mv(std::is_same_v<scalar_t, T> ? 0 : L), gv(L, T(0)), dv(L);
  const T* v;
  if constexpr (std::is_same_v<scalar_t, T>) {
    v = mask + m0 * HW;
  } else {
    for (int64_t k = 0; k < L; ++k) mv[k] = static_cast<T>(mask[m0 * HW + k]);
    v = mv.data();
  }
  T* g = gv.data();
  T* d = dv.data();
  for (int64_t k = 0; k < L - W; ++k) d[k] = keep_v[k] * sign(v[k + W] - v[k]);
  for (int64_t k = 0; k < L - W; ++k) g[k] -= d[k];
  for (int64_t k = W; k < L; ++k) g[k] += d[k - W];
  for (int64_t k = 0; k < L - 1; ++k) d[k] = keep_h[k] * sign(v[k + 1] - v[k]);
  for (int64_t k = 0; k < L - 1; ++k) g[k] -= d[k];
  for (int64_t k = 1; k < L; ++k) g[k] += d[k - 1];
  scalar_t* out = grad_mask + m0 * HW;
  for (int64_t k = 0; k < L; ++k) {
    out[k] = static_cast<scalar_t>(tv_s * g[k] + con_s * contrast_slope(v[k]));
  }
  for (int64_t m = m0; m < m1; ++m) {
    // grad_w[b, t]: t is the left neighbour of term t+1, the centre of term t and the right
    // neighbour of term t-1 (terms 1..T-2).
    const int64_t b = m / TT, t = m % TT;
    const scalar_t* wb = w + b * TT;
    double gw = 0;
    const auto wd = [&](int64_t k) { return static_cast<double>(wb[k]); };
    if (t + 1 >= 1 && t + 1 <= TT - 2)
      gw += unimodal_slope(unimodal_q(wb, t + 1), sqrt, uni_s) * wd(t + 2);
    if (t >= 1 && t <= TT - 2)
      gw += unimodal_slope(unimodal_q(wb, t), sqrt, uni_s) * (-2.0 * wd(t));
    if (t - 1 >= 1 && t - 1 <= TT - 2)
      gw += unimodal_slope(unimodal_q(wb, t - 1), sqrt, uni_s) * wd(t - 2);
    grad_w[m] = static_cast<scalar_t>(gw);
  }
}

// keep_v, keep_h of `chunk` maps (see forward_chunk).
template <typename T>
std::pair<std::vector<T>, std::vector<T>> pair_masks(const Shape& s, int64_t chunk) {
  const int64_t HW = s.H * s.W;
  std::vector<T> keep_v(chunk * HW, T(1)), keep_h(chunk * HW, T(1));
  for (int64_t m = 0; m < chunk; ++m) {
    for (int64_t j = 0; j < s.W; ++j) keep_v[m * HW + HW - s.W + j] = 0;
    for (int64_t i = 0; i < s.H; ++i) keep_h[m * HW + i * s.W + s.W - 1] = 0;
  }
  return {keep_v, keep_h};
}

// Maps per chunk: about kChunkElems elements.
int64_t chunk_maps(int64_t HW) { return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(HW, 1)); }

// Maps per parallel_for grain: at least kThreadElems elements per thread.
int64_t grain_maps(int64_t map_elems) { return std::max<int64_t>(1, kThreadElems / map_elems); }

}  // namespace

at::Tensor st_regularizer_forward_cpu(const at::Tensor& mask_in, const at::Tensor& w_in,
                                      double tv_weight, double contrast_weight,
                                      double unimodal_weight, bool sqrt, bool tv_mean,
                                      bool unimodal_mean) {
  check_inputs(mask_in, w_in);
  const Shape s{mask_in.size(0), mask_in.size(1), mask_in.size(2), mask_in.size(3)};
  const int64_t maps = s.B * s.T, HW = s.H * s.W;
  if (maps == 0) return at::zeros({}, mask_in.options());  // the caller's case
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  at::Tensor total = at::empty({}, mask.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(),
                                  "st_regularizer_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const int64_t chunk = chunk_maps(HW);  // maps per partial
    const int64_t chunks = divup(maps, chunk);
    std::vector<T> parts(3 * chunks);
    const auto keep = pair_masks<T>(s, chunk);
    const T* sv = keep.first.data();
    const T* sh = keep.second.data();
    const scalar_t* M = mask.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    T* pp = parts.data();
    parallel_run(chunks, divup(grain_maps(std::max<int64_t>(HW, 1)), chunk),
                 Tasks([&](int64_t c) ATTNPOOL_INLINE_LAMBDA {
      forward_chunk<scalar_t>(s, M, wp, sqrt, c * chunk, std::min(maps, (c + 1) * chunk),
                              sv, sh, pp + 3 * c);
    }));
    T tv = parts[0], con = parts[1], uni = parts[2];
    for (int64_t c = 1; c < chunks; ++c) {  // chunk order
      tv += parts[3 * c];
      con += parts[3 * c + 1];
      uni += parts[3 * c + 2];
    }
    const double terms = static_cast<double>(s.B * std::max<int64_t>(s.T - 2, 0));
    const double tv_div = tv_mean ? static_cast<double>(maps) : 1.0;
    const double uni_div = unimodal_mean ? std::max(terms, 1.0) : 1.0;
    const double result = tv_weight * (static_cast<double>(tv) / tv_div) +
                          contrast_weight * (static_cast<double>(con) / static_cast<double>(s.B)) +
                          unimodal_weight * (static_cast<double>(uni) / uni_div);
    *total.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(result);
  });
  return total;
}

std::tuple<at::Tensor, at::Tensor> st_regularizer_backward_cpu(
    const at::Tensor& grad_total, const at::Tensor& mask_in, const at::Tensor& w_in,
    double tv_weight, double contrast_weight, double unimodal_weight, bool sqrt, bool tv_mean,
    bool unimodal_mean) {
  check_inputs(mask_in, w_in);
  TORCH_CHECK(grad_total.numel() == 1, "st_regularizer cpu: grad_total must be 0-dim, got ",
              grad_total.sizes());
  const Shape s{mask_in.size(0), mask_in.size(1), mask_in.size(2), mask_in.size(3)};
  const int64_t maps = s.B * s.T, HW = s.H * s.W;
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  at::Tensor grad_mask = at::empty(mask.sizes(), mask.options());
  at::Tensor grad_w = at::empty(w.sizes(), w.options());
  if (maps == 0) return {grad_mask, grad_w};  // the caller's case
  const double g = grad_total.item<double>();
  const double terms = static_cast<double>(s.B * std::max<int64_t>(s.T - 2, 0));
  const double tv_s = g * tv_weight / (tv_mean ? static_cast<double>(maps) : 1.0);
  const double con_s = g * contrast_weight / static_cast<double>(s.B);
  const double uni_s = g * unimodal_weight / (unimodal_mean ? std::max(terms, 1.0) : 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(),
                                  "st_regularizer_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* M = mask.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gm = grad_mask.mutable_data_ptr<scalar_t>();
    scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
    const int64_t chunk = chunk_maps(HW);
    const auto keep = pair_masks<T>(s, chunk);
    const T* sv = keep.first.data();
    const T* sh = keep.second.data();
    parallel_run(divup(maps, chunk), divup(grain_maps(std::max<int64_t>(HW, 1)), chunk),
                 Tasks([&](int64_t c) ATTNPOOL_INLINE_LAMBDA {
      backward_maps<scalar_t>(s, M, wp, sqrt, static_cast<T>(tv_s), static_cast<T>(con_s),
                              static_cast<T>(uni_s), c * chunk, std::min(maps, (c + 1) * chunk),
                              sv, sh, gm, gw);
    }));
  });
  return {grad_mask, grad_w};
}

}  // namespace attnpool
