// Fused spatio-temporal regulariser kernels (docs/design.md "Spatio-temporal attention"; spec:
// st_regularizer.cuh).
//
// Forward, one kernel for the three terms: every thread walks the mask elements e (grid
// stride, kUnroll elements in flight per step, their loads issued before the arithmetic)
// and adds, in opmath, |M[i+1,j] - M[i,j]| (i < H-1) and |M[i,j+1] - M[i,j]| (j < W-1) to
// its TV sum and 0.5*M*[M<0.5] - 0.5*M*[M>0.5] to its contrast sum; then the unimodality
// terms r_t (grid stride over the B*(T-2) terms) to its U sum. The three sums are reduced
// over the block (warp butterflies, then the warps in order). One block (inputs up to
// kSingleBlockElems elements, the benchmark's 30 x 20 x 7 x 7 included): it weights,
// divides and writes total itself, one launch in all. More blocks: per-block partials
// [grid][3], summed in block order by a one-block finishing kernel (no atomics).
//
// Backward, one kernel: thread per mask element, grad_mask from the signs of its up to four
// differences and its contrast indicator; then thread per w element, grad_w from the up to
// three terms r_{t-1}, r_t, r_{t+1} it enters. Elementwise: no reductions at all.
//
// The grid depends on the sizes only, so every sum's order is fixed: bitwise deterministic.
// NaN (and inf) propagate as in the reference and its autograd: |NaN| = relu(NaN) = NaN in
// the forward; in the backward sign(NaN) = 0 (torch's), relu passes the gradient at NaN,
// and the products by 0 are never skipped.
#include "st_regularizer.cuh"

#include <cstdint>

#include "common.cuh"

namespace attnpool {
namespace st_regularizer_cuda {
namespace {

using namespace cuda_common;  // OpMath, to_acc, store, op_*, warp_sum, imin, imax, divup, ...

constexpr int kFwdThreads = 1024;  // one block covers a benchmark-sized input on its own
constexpr int kFwdWarps = kFwdThreads / 32;
constexpr int kUnroll = 4;         // mask elements whose loads are in flight together
constexpr int64_t kSingleBlockElems = 32768;  // work (max(B*T*H*W, B*T)) of one block
constexpr int64_t kMaxFwdBlocks = 1024;       // the finishing kernel sums <= 1024 partials
constexpr int kBwdThreads = 256;
constexpr int64_t kMaxBwdBlocks = 65536;      // grid-strided past it
// 32-bit unsigned indexing (cheaper divisions) while every index, plus a grid stride times
// kUnroll, stays below 2^32.
constexpr int64_t kMax32 = int64_t{1} << 30;

// ------------------------------------------------------------------ opmath
// Products rounded on their own (no FMA contraction), as the reference computes q_t.
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// torch.sign, (0 < d) - (d < 0): -1, 0 or 1; 0 for NaN (as abs's gradient in torch).
template <typename T> __device__ __forceinline__ T sign_of(T d) {
  return T(d > T(0) ? 1 : 0) - T(d < T(0) ? 1 : 0);
}

// 0.5*M*[M<0.5] - 0.5*M*[M>0.5], literally (NaN and inf give NaN as in the reference).
template <typename T> __device__ __forceinline__ T contrast_of(T m) {
  const T half = T(0.5);
  return half * m * T(m < half ? 1 : 0) - half * m * T(m > half ? 1 : 0);
}

// q = w[t-1] w[t+1] - w[t]^2 of the unimodality term t, formed in double: the products of
// float / half / bfloat16 weights are exact there, so q is rounded once, as the float64
// reference has it (q cancels near relu's threshold, and sqrt's slope 1 / (2 sqrt(q)) magnifies
// any error of q); equal neighbours give exactly 0.
template <typename T> __device__ __forceinline__ double uni_q(T wm, T w0, T wp) {
  const double a = static_cast<double>(to_acc(wm));
  const double b = static_cast<double>(to_acc(w0));
  const double c = static_cast<double>(to_acc(wp));
  return mul_rn(a, c) - mul_rn(b, b);
}

// Weights and divisors of the three terms, and the sqrt flag, as the kernels take them.
struct Coefs {
  double tv_weight, contrast_weight, unimodal_weight;
  double tv_div, contrast_div, unimodal_div;  // max(B*T, 1) or 1; B; max(B*(T-2), 1) or 1
  bool sqrt;
};

template <typename acc_t>
__device__ __forceinline__ acc_t combine(acc_t tv, acc_t con, acc_t u, const Coefs& k) {
  return acc_t(k.tv_weight) * (tv / acc_t(k.tv_div)) +
         acc_t(k.contrast_weight) * (con / acc_t(k.contrast_div)) +
         acc_t(k.unimodal_weight) * (u / acc_t(k.unimodal_div));
}

// Sums v[0..2] over the block (every thread must call it); the result is valid in thread 0.
// Fixed order: warp butterflies, then the warps in order. Ends with no pending smem reads
// that a later call could clobber (one call per kernel).
template <typename acc_t> __device__ __forceinline__ void block_sum3(acc_t (&v)[3]) {
  __shared__ acc_t red[3][kFwdWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < 3; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < 3; ++k) red[k][warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      acc_t s = red[k][0];
      for (int w = 1; w < kFwdWarps; ++w) s += red[k][w];
      v[k] = s;
    }
  }
}

// ------------------------------------------------------------------ forward
// N = B*T*H*W mask elements, NU = B*(T-2) unimodality terms (0 when T < 3), T2 = T-2.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kFwdThreads)
st_regularizer_forward_kernel(const scalar_t* __restrict__ mask, const scalar_t* __restrict__ w,
                  scalar_t* __restrict__ total,
                  typename OpMath<scalar_t>::type* __restrict__ partial, index_t N, index_t H,
                  index_t W, index_t T, index_t NU, index_t T2, Coefs k) {
  using acc_t = typename OpMath<scalar_t>::type;
  const index_t stride = static_cast<index_t>(gridDim.x) * kFwdThreads;
  const index_t first = static_cast<index_t>(blockIdx.x) * kFwdThreads + threadIdx.x;
  acc_t tv = 0, con = 0, u = 0;

  for (index_t base = first; base < N; base += kUnroll * stride) {
    acc_t m[kUnroll], dn[kUnroll], rt[kUnroll];
    bool ok[kUnroll], has_dn[kUnroll], has_rt[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const index_t e = base + r * stride;
      ok[r] = e < N;
      const index_t q = ok[r] ? e / W : index_t(0);
      const index_t j = e - q * W;
      const index_t i = q % H;
      has_dn[r] = ok[r] && i + 1 < H;
      has_rt[r] = ok[r] && j + 1 < W;
      m[r] = ok[r] ? to_acc(mask[e]) : acc_t(0);
      dn[r] = has_dn[r] ? to_acc(mask[e + W]) : acc_t(0);
      rt[r] = has_rt[r] ? to_acc(mask[e + 1]) : acc_t(0);
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      if (!ok[r]) continue;
      if (has_dn[r]) tv += op_abs(dn[r] - m[r]);
      if (has_rt[r]) tv += op_abs(rt[r] - m[r]);
      con += contrast_of(m[r]);
    }
  }
  for (index_t e = first; e < NU; e += stride) {
    const index_t b = e / T2;
    const scalar_t* wt = w + b * T + (e - b * T2) + 1;  // w[b, t], t = 1 + (e mod (T-2))
    const double q = uni_q(wt[-1], wt[0], wt[1]);
    const double r = q <= 0.0 ? 0.0 : q;  // relu; NaN stays NaN
    u += static_cast<acc_t>(k.sqrt ? sqrt(r) : r);
  }

  acc_t v[3] = {tv, con, u};
  block_sum3(v);
  if (threadIdx.x == 0) {
    if (gridDim.x == 1) {
      store(total, combine(v[0], v[1], v[2], k));
    } else {
#pragma unroll
      for (int c = 0; c < 3; ++c) partial[blockIdx.x * 3 + c] = v[c];
    }
  }
}

// One block: total from the partials [blocks][3], summed in block order per thread, then
// over the block in a fixed order.
template <typename scalar_t>
__global__ void __launch_bounds__(kFwdThreads)
st_regularizer_finish_kernel(const typename OpMath<scalar_t>::type* __restrict__ partial,
                 scalar_t* __restrict__ total, int blocks, Coefs k) {
  using acc_t = typename OpMath<scalar_t>::type;
  acc_t v[3] = {0, 0, 0};
  for (int p = threadIdx.x; p < blocks; p += kFwdThreads) {
#pragma unroll
    for (int c = 0; c < 3; ++c) v[c] += partial[p * 3 + c];
  }
  block_sum3(v);
  if (threadIdx.x == 0) store(total, combine(v[0], v[1], v[2], k));
}

// ------------------------------------------------------------------ backward
// N = B*T*H*W, BT = B*T.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBwdThreads)
st_regularizer_backward_kernel(const scalar_t* __restrict__ grad_total, const scalar_t* __restrict__ mask,
                   const scalar_t* __restrict__ w, scalar_t* __restrict__ grad_mask,
                   scalar_t* __restrict__ grad_w, index_t N, index_t H, index_t W, index_t BT,
                   index_t T, Coefs k) {
  using acc_t = typename OpMath<scalar_t>::type;
  const index_t stride = static_cast<index_t>(gridDim.x) * kBwdThreads;
  const index_t first = static_cast<index_t>(blockIdx.x) * kBwdThreads + threadIdx.x;
  const acc_t g = to_acc(*grad_total);
  // As autograd: the upstream gradient times the weight, then divided by the mean's divisor.
  const acc_t tv_s = g * acc_t(k.tv_weight) / acc_t(k.tv_div);
  const acc_t con_s = g * acc_t(k.contrast_weight) / acc_t(k.contrast_div);
  const acc_t uni_s = g * acc_t(k.unimodal_weight) / acc_t(k.unimodal_div);

  for (index_t e = first; e < N; e += stride) {
    const index_t q = e / W;
    const index_t j = e - q * W;
    const index_t i = q % H;
    const acc_t m = to_acc(mask[e]);
    // d|D|/dM over the up to four differences D that M enters (+ as the minuend).
    acc_t s = 0;
    if (i > 0) s += sign_of(m - to_acc(mask[e - W]));
    if (i + 1 < H) s -= sign_of(to_acc(mask[e + W]) - m);
    if (j > 0) s += sign_of(m - to_acc(mask[e - 1]));
    if (j + 1 < W) s -= sign_of(to_acc(mask[e + 1]) - m);
    const acc_t half = acc_t(0.5);
    const acc_t dcon = half * acc_t(m < half ? 1 : 0) - half * acc_t(m > half ? 1 : 0);
    store(grad_mask + e, tv_s * s + con_s * dcon);
  }

  // d(term t)/dq_t: 0 where q_t <= 0 (relu), else uni_s (/ (2 sqrt(q_t)) with sqrt). In
  // double, as q: q of small float32 weights (w ~ 1e-19) would be a float32 denormal.
  const double uni_d = static_cast<double>(uni_s);
  auto dterm = [&](const scalar_t* wt) -> double {  // wt points at w[b, t]
    const double q = uni_q(wt[-1], wt[0], wt[1]);
    if (q <= 0.0) return 0.0;
    return k.sqrt ? uni_d / (2.0 * sqrt(q)) : uni_d;
  };
  auto wd = [](scalar_t v) { return static_cast<double>(to_acc(v)); };
  for (index_t e = first; e < BT; e += stride) {
    const index_t b = e / T;
    const index_t t = e - b * T;
    const scalar_t* wb = w + b * T;
    double gw = 0;
    // Terms 1 <= s <= T-2 that w[t] enters: s = t+1 (as w[s-1]), s = t, s = t-1 (as w[s+1]).
    if (t + 3 <= T) gw += dterm(wb + t + 1) * wd(wb[t + 2]);
    if (t >= 1 && t + 2 <= T) gw -= 2.0 * dterm(wb + t) * wd(wb[t]);
    if (t >= 2) gw += dterm(wb + t - 1) * wd(wb[t - 2]);
    store(grad_w + e, static_cast<acc_t>(gw));
  }
}

// ------------------------------------------------------------------ launchers
bool valid_sizes(int64_t B, int64_t T, int64_t H, int64_t W) {
  return B >= 0 && T >= 0 && H >= 0 && W >= 0;
}

int64_t fwd_blocks(int64_t B, int64_t T, int64_t H, int64_t W) {
  const int64_t work = imax(B * T * H * W, B * T);
  return imax(1, imin(divup(work, kSingleBlockElems), kMaxFwdBlocks));
}

Coefs make_coefs(int64_t B, int64_t T, const StParams& p) {
  const int64_t nu = B * imax(T - 2, 0);
  return Coefs{p.tv_weight,
               p.contrast_weight,
               p.unimodal_weight,
               p.tv_mean ? static_cast<double>(imax(B * T, 1)) : 1.0,
               static_cast<double>(B),
               p.unimodal_mean ? static_cast<double>(imax(nu, 1)) : 1.0,
               p.sqrt};
}

template <typename scalar_t, typename index_t>
void launch_fwd(const void* mask, const void* w, void* total, void* partial, int64_t blocks,
                int64_t B, int64_t T, int64_t H, int64_t W, const Coefs& k, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t T2 = imax(T - 2, 0);
  st_regularizer_forward_kernel<scalar_t, index_t><<<static_cast<unsigned int>(blocks), kFwdThreads, 0,
                                          stream>>>(
      static_cast<const scalar_t*>(mask), static_cast<const scalar_t*>(w),
      static_cast<scalar_t*>(total), static_cast<acc_t*>(partial),
      static_cast<index_t>(B * T * H * W), static_cast<index_t>(H), static_cast<index_t>(W),
      static_cast<index_t>(T), static_cast<index_t>(B * T2), static_cast<index_t>(T2), k);
}

template <typename scalar_t>
cudaError_t forward_impl(const void* mask, const void* w, void* total, void* workspace,
                         int64_t B, int64_t T, int64_t H, int64_t W, const StParams& p,
                         cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t blocks = fwd_blocks(B, T, H, W);
  if (blocks > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  const Coefs k = make_coefs(B, T, p);
  if (imax(B * T * H * W, B * T) <= kMax32) {
    launch_fwd<scalar_t, uint32_t>(mask, w, total, workspace, blocks, B, T, H, W, k, stream);
  } else {
    launch_fwd<scalar_t, int64_t>(mask, w, total, workspace, blocks, B, T, H, W, k, stream);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || blocks == 1) return err;
  st_regularizer_finish_kernel<scalar_t><<<1, kFwdThreads, 0, stream>>>(
      static_cast<const acc_t*>(workspace), static_cast<scalar_t*>(total),
      static_cast<int>(blocks), k);
  return cudaGetLastError();
}

template <typename scalar_t, typename index_t>
void launch_bwd(const void* grad_total, const void* mask, const void* w, void* grad_mask,
                void* grad_w, int64_t B, int64_t T, int64_t H, int64_t W, const Coefs& k,
                cudaStream_t stream) {
  const int64_t work = imax(B * T * H * W, B * T);
  const int64_t blocks = imax(1, imin(divup(work, kBwdThreads), kMaxBwdBlocks));
  st_regularizer_backward_kernel<scalar_t, index_t><<<static_cast<unsigned int>(blocks), kBwdThreads, 0,
                                           stream>>>(
      static_cast<const scalar_t*>(grad_total), static_cast<const scalar_t*>(mask),
      static_cast<const scalar_t*>(w), static_cast<scalar_t*>(grad_mask),
      static_cast<scalar_t*>(grad_w), static_cast<index_t>(B * T * H * W),
      static_cast<index_t>(H), static_cast<index_t>(W), static_cast<index_t>(B * T),
      static_cast<index_t>(T), k);
}

template <typename scalar_t>
cudaError_t backward_impl(const void* grad_total, const void* mask, const void* w,
                          void* grad_mask, void* grad_w, int64_t B, int64_t T, int64_t H,
                          int64_t W, const StParams& p, cudaStream_t stream) {
  const Coefs k = make_coefs(B, T, p);
  if (imax(B * T * H * W, B * T) <= kMax32) {
    launch_bwd<scalar_t, uint32_t>(grad_total, mask, w, grad_mask, grad_w, B, T, H, W, k,
                                   stream);
  } else {
    launch_bwd<scalar_t, int64_t>(grad_total, mask, w, grad_mask, grad_w, B, T, H, W, k,
                                  stream);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t st_regularizer_forward_workspace_elems(DType, int64_t B, int64_t T, int64_t H, int64_t W) {
  if (!valid_sizes(B, T, H, W)) return 0;
  const int64_t blocks = fwd_blocks(B, T, H, W);
  return blocks > 1 ? 3 * blocks : 0;
}

cudaError_t st_regularizer_forward_launch(DType dtype, const void* mask, const void* w, void* total,
                              void* workspace, int64_t B, int64_t T, int64_t H, int64_t W,
                              const StParams& params, cudaStream_t stream) {
  if (!valid_sizes(B, T, H, W)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return forward_impl<typename decltype(tag)::type>(mask, w, total, workspace, B, T, H, W,
                                                      params, stream);
  });
}

cudaError_t st_regularizer_backward_launch(DType dtype, const void* grad_total, const void* mask,
                               const void* w, void* grad_mask, void* grad_w, int64_t B,
                               int64_t T, int64_t H, int64_t W, const StParams& params,
                               cudaStream_t stream) {
  if (!valid_sizes(B, T, H, W)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return backward_impl<typename decltype(tag)::type>(grad_total, mask, w, grad_mask, grad_w, B,
                                                       T, H, W, params, stream);
  });
}

}  // namespace st_regularizer_cuda
}  // namespace attnpool
