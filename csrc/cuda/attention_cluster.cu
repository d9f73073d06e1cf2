// Fused attention-cluster kernels (DESIGN 3.1, contract in csrc/attnpool.h).
//
//   forward            one block per unit (b, n): masked softmax over the frames,
//                      v = a·x, shift, L2 norm; out written once, v never stored.
//   backward_unit      one block per unit: coefficients of dv = p*(g - s*û),
//                      per-sample grad_alpha/beta terms, da = x·dv, grad_scores.
//   backward_x         one thread per (b, f) and chunk of frames: grad_x = Σ_n a·dv.
//
// Every sum has a fixed order (sequential loops, fixed-shape shuffle trees, one
// owner per output): bitwise deterministic, no atomics. Sums accumulate in opmath
// (float; double for double), the backward's per-unit scalars in double (UnitCoef).
// Plain CUDA, no torch: see attention_cluster.cuh.
#include "attention_cluster.cuh"

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace attnpool {
namespace cluster_cuda {
namespace {

using namespace cuda_common;  // OpMath, to_acc, store, op_*, warp_reduce, imin, grid_x, ...

constexpr int kThreads = 256;  // block size of every kernel; a multiple of 32 (full warps)
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunkF = kThreads;  // features of dv staged per chunk: one per thread
constexpr int kChunkL = 16;            // frames of grad_x accumulated in registers
// Dynamic shared memory stays under the 48 KiB every device grants without an
// opt-in attribute (static reduction scratch included); beyond, per-unit buffers
// fall back to global memory.
constexpr size_t kMaxDynSmem = 40 * 1024;
constexpr int64_t kMaxGridY = 65535;  // gridDim.y limit

// ------------------------------------------------------------------ reductions
// Reduces K values over the block at once and broadcasts the results to every
// thread. Every thread of the block must call it (it holds __syncthreads).
// red: __shared__ scratch of K * kWarps elements.
template <int K, typename T, typename Op>
__device__ __forceinline__ void block_reduce(T (&v)[K], T* red, Op op, T identity) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_reduce(v[k], op);
  __syncthreads();  // red may still be read by the previous reduction's broadcast
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) red[k * kWarps + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      T t = lane < kWarps ? red[k * kWarps + lane] : identity;
      t = warp_reduce(t, op);
      if (lane == 0) red[k * kWarps] = t;  // only lane 0 reads that slot above
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = red[k * kWarps];
}

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce1(T v, T* red, Op op, T identity) {
  T vs[1] = {v};
  block_reduce<1>(vs, red, op, identity);
  return vs[0];
}

// ------------------------------------------------------------------ shared pieces
// Valid frames of sample b, clamped so that a bad length can never index out of bounds.
__device__ __forceinline__ int64_t valid_length(const int64_t* lengths, int64_t b, int64_t L) {
  if (lengths == nullptr) return L;
  const int64_t len = lengths[b];
  return len < 0 ? 0 : (len > L ? L : len);
}

// v_f = Σ_{l<len} a_l x[l, f]; xcol points at x[b, 0, f]. Frame order fixed, so the
// forward and both backward kernels recompute the same v bit for bit.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pool_frames(const acc_t* a, const scalar_t* xcol, int64_t len,
                                             int64_t F) {
  acc_t v = 0;
  for (int64_t l = 0; l < len; ++l) v += a[l] * to_acc(xcol[l * F]);
  return v;
}

// Shift of unit n: u_f = alpha v_f + beta, in opmath exactly as the forward computes
// it for the norm, so that |u| / r below is exactly 1 when F = 1.
template <typename acc_t>
__device__ __forceinline__ acc_t unit_u(acc_t alpha, acc_t beta, acc_t v) {
  return alpha * v + beta;
}

// Backward of a unit, in double whatever the dtype (it costs a few double operations
// per feature against L opmath ones for v). With r = sqrt(||u||^2 + eps_sqrt) (norm >= eps;
// dr/du = u / r with or without eps_sqrt), û = u / r:
//   du = d1 (g - s û), d1 = c / r, s = û·g,   dv = alpha du = p (g - s û), p = alpha d1.
// Clamped norm: d1 = c / eps, s = 0 (torch's clamp_min passes no gradient to the norm).
// No shift: p = 1, s = 0. Double because the scalars are ill-conditioned in float:
// when beta dominates u, û is nearly constant and grad_beta = Σ_f du_f cancels ~100x,
// so a float r (1 ulp) alone costs ~1e-5 relative error at F ~ 500. Also, for F = 1
// (and eps_sqrt = 0), û = ±1 exactly and g - s û = 0 exactly: the true gradient of u / ||u||,
// bit for bit.
struct UnitCoef {
  double p;  // alpha * d1 (1 without shift)
  double s;  // û·g (0 when clamped or without shift)
  double r;  // sqrt(||u||^2 + eps_sqrt) (eps when clamped, 1 without shift)
};

// g_f - s û_f. s == 0: independent of v, as in the reference (no 0 * Inf from v).
__device__ __forceinline__ double unit_resid(const UnitCoef& k, double g, double u) {
  return k.s == 0.0 ? g : g - k.s * (u / k.r);
}

// ------------------------------------------------------------------ forward
// Block per unit = b*N + n. Dynamic smem: a[L] (opmath) when attn_in_smem, else the
// softmax weights live in this unit's row of attn (global) and are read from there.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
cluster_forward_kernel(const scalar_t* __restrict__ x,
                       const typename OpMath<scalar_t>::type* __restrict__ scores,
                       const int64_t* __restrict__ lengths, const scalar_t* __restrict__ alpha,
                       const scalar_t* __restrict__ beta, scalar_t* __restrict__ out,
                       typename OpMath<scalar_t>::type* __restrict__ attn,
                       typename OpMath<scalar_t>::type* __restrict__ norm, int64_t B, int64_t L,
                       int64_t F, int64_t N, bool shift, typename OpMath<scalar_t>::type eps,
                       typename OpMath<scalar_t>::type eps_sqrt, bool attn_in_smem) {
  using acc_t = typename OpMath<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t red[kWarps];
  const int tid = threadIdx.x;
  const acc_t sqrt_n = op_sqrt(static_cast<acc_t>(N));

  for (int64_t unit = blockIdx.x; unit < B * N; unit += gridDim.x) {
    const int64_t b = unit / N;
    const int64_t n = unit - b * N;
    const int64_t len = valid_length(lengths, b, L);
    acc_t* attn_row = attn + unit * L;
    acc_t* a = attn_in_smem ? reinterpret_cast<acc_t*>(smem_raw) : attn_row;
    const acc_t* s = scores + b * L * N + n;  // scores[b, l, n] = s[l * N]

    // Softmax over the valid frames. Each thread touches the same frames l in
    // the three loops below, so a[l] needs no barrier until the pooling.
    acc_t mx = -static_cast<acc_t>(INFINITY);
    for (int64_t l = tid; l < len; l += kThreads) mx = MaxOp()(mx, to_acc(s[l * N]));
    mx = block_reduce1(mx, red, MaxOp(), -static_cast<acc_t>(INFINITY));
    acc_t sum = 0;
    for (int64_t l = tid; l < len; l += kThreads) {
      const acc_t e = op_exp(to_acc(s[l * N]) - mx);
      a[l] = e;
      sum += e;
    }
    sum = block_reduce1(sum, red, SumOp(), acc_t(0));
    for (int64_t l = tid; l < L; l += kThreads) {
      // Padded frames: exactly 0, or NaN when the valid scores hold a NaN / +Inf
      // (sum is NaN), as torch's softmax over -inf-masked scores gives.
      const acc_t al = l < len ? a[l] / sum : acc_t(0) / sum;
      if (l < len) a[l] = al;
      attn_row[l] = al;
    }
    __syncthreads();  // every thread reads all of a[] below

    const acc_t al_n = shift ? to_acc(alpha[n]) : acc_t(1);
    const acc_t be_n = shift ? to_acc(beta[n]) : acc_t(0);
    const scalar_t* xb = x + b * L * F;
    // Pass 1: ||u||^2. Padded frames are skipped: their weight is 0.
    acc_t ss = 0;
    for (int64_t f = tid; f < F; f += kThreads) {
      const acc_t v = pool_frames(a, xb + f, len, F);
      const acc_t u = shift ? unit_u(al_n, be_n, v) : v;
      ss += u * u;
    }
    const acc_t nrm =
        op_sqrt(block_reduce1(ss, red, SumOp(), acc_t(0)) + (shift ? eps_sqrt : acc_t(0)));
    // clamp_min(eps) written so that a NaN norm stays NaN, as in torch.
    const acc_t denom = sqrt_n * (nrm < eps ? eps : nrm);
    // Pass 2: recompute v (cheaper than an [F] buffer for any F) and write out once.
    scalar_t* o = out + unit * F;
    for (int64_t f = tid; f < F; f += kThreads) {
      const acc_t v = pool_frames(a, xb + f, len, F);
      store(o + f, shift ? unit_u(al_n, be_n, v) / denom : v);
    }
    if (tid == 0) norm[unit] = nrm;
    __syncthreads();  // the next unit rewrites a[]
  }
}

// ------------------------------------------------------------------ backward, per unit
// Block per unit. Dynamic smem: dv chunk [kChunkF], then, when staged, a[L] and da[L];
// otherwise a is read from attn and da lives in workspace[unit * L ...]. Writes the
// unit's UnitCoef to coef for backward_x; its per-unit sums accumulate in double.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
cluster_backward_unit_kernel(const scalar_t* __restrict__ grad_out,
                             const scalar_t* __restrict__ x,
                             const int64_t* __restrict__ lengths,
                             const typename OpMath<scalar_t>::type* __restrict__ attn,
                             const typename OpMath<scalar_t>::type* __restrict__ norm,
                             const scalar_t* __restrict__ alpha, const scalar_t* __restrict__ beta,
                             scalar_t* __restrict__ grad_scores,
                             typename OpMath<scalar_t>::type* __restrict__ grad_alpha_partial,
                             typename OpMath<scalar_t>::type* __restrict__ grad_beta_partial,
                             double* __restrict__ coef,
                             typename OpMath<scalar_t>::type* __restrict__ workspace, int64_t B,
                             int64_t L, int64_t F, int64_t N, bool shift,
                             typename OpMath<scalar_t>::type eps,
                             typename OpMath<scalar_t>::type eps_sqrt, bool staged) {
  using acc_t = typename OpMath<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double red[3 * kWarps];
  acc_t* dv_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* a_s = dv_s + kChunkF;  // only dereferenced when staged
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const double c = 1.0 / sqrt(static_cast<double>(N));

  for (int64_t unit = blockIdx.x; unit < B * N; unit += gridDim.x) {
    const int64_t b = unit / N;
    const int64_t n = unit - b * N;
    const acc_t* attn_row = attn + unit * L;
    const acc_t* a = staged ? a_s : attn_row;
    acc_t* da = staged ? a_s + L : workspace + unit * L;
    for (int64_t l = tid; l < L; l += kThreads) {
      if (staged) a_s[l] = attn_row[l];
      da[l] = 0;
    }
    __syncthreads();  // a[] and da[] are read and written across threads below

    // Padded frames (a = 0) are never read: a NaN there must not reach a gradient as 0 * NaN.
    const int64_t len = valid_length(lengths, b, L);
    const scalar_t* xb = x + b * L * F;
    const scalar_t* g = grad_out + unit * F;
    const acc_t al_n = shift ? to_acc(alpha[n]) : acc_t(1);
    const acc_t be_n = shift ? to_acc(beta[n]) : acc_t(0);
    // The forward's norm picks the branch, so that it matches the forward's output.
    const bool unclamped = shift && !(norm[unit] < eps);  // a NaN norm stays NaN this way

    // Pass 1 (shift, norm >= eps): u·u and u·g. The reduction runs unconditionally.
    double uu_ug[2] = {0, 0};
    if (unclamped) {
      for (int64_t f = tid; f < F; f += kThreads) {
        const double u = unit_u(al_n, be_n, pool_frames(a, xb + f, len, F));
        uu_ug[0] += u * u;
        uu_ug[1] += u * static_cast<double>(to_acc(g[f]));
      }
    }
    block_reduce<2>(uu_ug, red, SumOp(), 0.0);
    UnitCoef k{1.0, 0.0, 1.0};
    double d1 = 0;
    if (shift) {
      k.r = unclamped ? sqrt(uu_ug[0] + static_cast<double>(eps_sqrt))
                      : static_cast<double>(eps);
      k.s = unclamped ? uu_ug[1] / k.r : 0.0;
      d1 = c / k.r;
      k.p = static_cast<double>(al_n) * d1;
    }

    // Pass 2 by chunks of F: dv chunk into smem (and du·v, Σdu on the way), then
    // da_l += x[l, chunk]·dv[chunk] with warp w owning frames l ≡ w (mod kWarps):
    // one writer per da_l, chunks in order, so no atomics and a fixed sum order.
    double part[3] = {0, 0, 0};  // Σ_l a_l da_l, Σ_f du_f v_f, Σ_f du_f
    for (int64_t f0 = 0; f0 < F; f0 += kChunkF) {
      const int64_t cf = imin(kChunkF, F - f0);
      for (int64_t j = tid; j < cf; j += kThreads) {
        double resid = to_acc(g[f0 + j]);
        if (shift) {
          const acc_t v = pool_frames(a, xb + f0 + j, len, F);
          resid = unit_resid(k, resid, unit_u(al_n, be_n, v));
          const double du = d1 * resid;
          part[1] += du * v;
          part[2] += du;
        }
        dv_s[j] = static_cast<acc_t>(k.p * resid);
      }
      __syncthreads();  // dv chunk complete
      for (int64_t l = warp; l < len; l += kWarps) {  // warp-uniform: full-warp shuffles
        const scalar_t* xr = xb + l * F + f0;
        acc_t dot = 0;
        for (int64_t j = lane; j < cf; j += 32) dot += to_acc(xr[j]) * dv_s[j];
        dot = warp_reduce(dot, SumOp());
        if (lane == 0) da[l] += dot;
      }
      __syncthreads();  // dv_s is rewritten by the next chunk; da[] final after the last
    }

    // Softmax backward: grad_scores_l = a_l (da_l - Σ_l' a_l' da_l').
    for (int64_t l = tid; l < L; l += kThreads) part[0] += static_cast<double>(a[l]) * da[l];
    block_reduce<3>(part, red, SumOp(), 0.0);
    const acc_t a_da = static_cast<acc_t>(part[0]);
    for (int64_t l = tid; l < L; l += kThreads)
      store(grad_scores + (b * L + l) * N + n, a[l] * (da[l] - a_da));
    if (tid == 0) {
      coef[unit * 3 + 0] = k.p;
      coef[unit * 3 + 1] = k.s;
      coef[unit * 3 + 2] = k.r;
      grad_alpha_partial[unit] = static_cast<acc_t>(part[1]);
      grad_beta_partial[unit] = static_cast<acc_t>(part[2]);
    }
    __syncthreads();  // the next unit rewrites a_s / da
  }
}

// ------------------------------------------------------------------ backward, grad_x
// grad_x[b, l, f] = Σ_n a[b, n, l] dv_n[f]. Thread per (b, f) (blockIdx.x over B and
// blocks of F, coalesced along f); blockIdx.y over chunks of kChunkL frames held in
// registers. dv_n[f] is rebuilt per chunk from coef exactly as backward_unit built it
// (v recomputed only where s != 0); units summed in order n = 0..N-1. No shared
// memory and no barriers.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
cluster_backward_x_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                          const int64_t* __restrict__ lengths,
                          const typename OpMath<scalar_t>::type* __restrict__ attn,
                          const double* __restrict__ coef, const scalar_t* __restrict__ alpha,
                          const scalar_t* __restrict__ beta, scalar_t* __restrict__ grad_x,
                          int64_t B, int64_t L, int64_t F, int64_t N) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t f_blocks = (F + kThreads - 1) / kThreads;
  const int64_t l_chunks = (L + kChunkL - 1) / kChunkL;

  for (int64_t bx = blockIdx.x; bx < B * f_blocks; bx += gridDim.x) {
    const int64_t b = bx / f_blocks;
    const int64_t f = (bx - b * f_blocks) * kThreads + threadIdx.x;
    if (f >= F) continue;
    const scalar_t* xcol = x + b * L * F + f;
    const int64_t len = valid_length(lengths, b, L);  // padded frames: a = 0, x never read
    for (int64_t chunk = blockIdx.y; chunk < l_chunks; chunk += gridDim.y) {
      const int64_t l0 = chunk * kChunkL;
      const int64_t nl = imin(kChunkL, L - l0);
      acc_t acc[kChunkL];
#pragma unroll
      for (int j = 0; j < kChunkL; ++j) acc[j] = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t unit = b * N + n;
        const UnitCoef k{coef[unit * 3 + 0], coef[unit * 3 + 1], coef[unit * 3 + 2]};
        const acc_t* arow = attn + unit * L;
        double resid = to_acc(grad_out[unit * F + f]);
        if (!(k.s == 0.0)) {  // shift with norm >= eps: alpha/beta meaningful only then
          const acc_t v = pool_frames(arow, xcol, len, F);
          resid = unit_resid(k, resid, unit_u(to_acc(alpha[n]), to_acc(beta[n]), v));
        }
        const acc_t dv = static_cast<acc_t>(k.p * resid);
#pragma unroll
        for (int j = 0; j < kChunkL; ++j)
          if (j < nl) acc[j] += arow[l0 + j] * dv;
      }
#pragma unroll
      for (int j = 0; j < kChunkL; ++j)
        if (j < nl) store(grad_x + (b * L + l0 + j) * F + f, acc[j]);
    }
  }
}

// ------------------------------------------------------------------ launchers
bool forward_in_smem(size_t acc_bytes, int64_t L) {
  return static_cast<size_t>(L) * acc_bytes <= kMaxDynSmem;
}

bool backward_staged(size_t acc_bytes, int64_t L) {
  return static_cast<size_t>(kChunkF + 2 * L) * acc_bytes <= kMaxDynSmem;
}

template <typename scalar_t>
cudaError_t forward_impl(const void* x, const void* scores, const int64_t* lengths,
                         const void* alpha, const void* beta, void* out, void* attn, void* norm,
                         int64_t B, int64_t L, int64_t F, int64_t N, bool shift, double eps,
                         double eps_sqrt, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const bool in_smem = forward_in_smem(sizeof(acc_t), L);
  const size_t smem = in_smem ? static_cast<size_t>(L) * sizeof(acc_t) : 0;
  cluster_forward_kernel<scalar_t><<<grid_x(B * N), kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(x), static_cast<const acc_t*>(scores), lengths,
      static_cast<const scalar_t*>(alpha), static_cast<const scalar_t*>(beta),
      static_cast<scalar_t*>(out), static_cast<acc_t*>(attn), static_cast<acc_t*>(norm), B, L, F,
      N, shift, static_cast<acc_t>(eps), static_cast<acc_t>(eps_sqrt), in_smem);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_impl(const void* grad_out, const void* x, const int64_t* lengths,
                          const void* attn, const void* norm,
                          const void* alpha, const void* beta, void* grad_x, void* grad_scores,
                          void* grad_alpha_partial, void* grad_beta_partial, void* coef,
                          void* workspace, int64_t B, int64_t L, int64_t F, int64_t N, bool shift,
                          double eps, double eps_sqrt, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const bool staged = backward_staged(sizeof(acc_t), L);
  if (!staged && workspace == nullptr) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(kChunkF + (staged ? 2 * L : 0)) * sizeof(acc_t);
  cluster_backward_unit_kernel<scalar_t><<<grid_x(B * N), kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(x), lengths,
      static_cast<const acc_t*>(attn), static_cast<const acc_t*>(norm),
      static_cast<const scalar_t*>(alpha), static_cast<const scalar_t*>(beta),
      static_cast<scalar_t*>(grad_scores), static_cast<acc_t*>(grad_alpha_partial),
      static_cast<acc_t*>(grad_beta_partial), static_cast<double*>(coef),
      static_cast<acc_t*>(workspace), B, L, F, N, shift, static_cast<acc_t>(eps),
      static_cast<acc_t>(eps_sqrt), staged);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int64_t f_blocks = (F + kThreads - 1) / kThreads;
  const int64_t l_chunks = (L + kChunkL - 1) / kChunkL;
  const dim3 grid(grid_x(B * f_blocks), static_cast<unsigned int>(imin(l_chunks, kMaxGridY)));
  cluster_backward_x_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(x), lengths,
      static_cast<const acc_t*>(attn), static_cast<const double*>(coef),
      static_cast<const scalar_t*>(alpha), static_cast<const scalar_t*>(beta),
      static_cast<scalar_t*>(grad_x), B, L, F, N);
  return cudaGetLastError();
}

bool valid_sizes(int64_t B, int64_t L, int64_t F, int64_t N) {
  return B >= 1 && L >= 1 && F >= 1 && N >= 1;
}

}  // namespace

cudaError_t cluster_pool_forward_launch(DType dtype, const void* x, const void* scores,
                                        const int64_t* lengths, const void* alpha,
                                        const void* beta, void* out, void* attn, void* norm,
                                        int64_t B, int64_t L, int64_t F, int64_t N, bool shift,
                                        double eps, double eps_sqrt, cudaStream_t stream) {
  if (!valid_sizes(B, L, F, N)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return forward_impl<typename decltype(tag)::type>(x, scores, lengths, alpha, beta, out, attn,
                                                      norm, B, L, F, N, shift, eps, eps_sqrt,
                                                      stream);
  });
}

int64_t cluster_pool_backward_workspace_elems(DType dtype, int64_t B, int64_t L, int64_t N) {
  return backward_staged(opmath_bytes(dtype), L) ? 0 : B * N * L;
}

cudaError_t cluster_pool_backward_launch(DType dtype, const void* grad_out, const void* x,
                                         const int64_t* lengths, const void* attn, const void* norm, const void* alpha,
                                         const void* beta, void* grad_x, void* grad_scores,
                                         void* grad_alpha_partial, void* grad_beta_partial,
                                         void* coef, void* workspace, int64_t B, int64_t L,
                                         int64_t F, int64_t N, bool shift, double eps,
                                         double eps_sqrt, cudaStream_t stream) {
  if (!valid_sizes(B, L, F, N)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return backward_impl<typename decltype(tag)::type>(
        grad_out, x, lengths, attn, norm, alpha, beta, grad_x, grad_scores, grad_alpha_partial,
        grad_beta_partial, coef, workspace, B, L, F, N, shift, eps, eps_sqrt, stream);
  });
}

}  // namespace cluster_cuda
}  // namespace attnpool
