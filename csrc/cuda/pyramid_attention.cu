// Fused interaction-aware pyramid attention kernels (docs/design.md "Pyramid attention"; spec:
// pyramid_attention.cuh).
//
// Forward
//   pool (one launch per level): pooled[b, off_s + c, t*Ho*Wo + cell] = R(X_s). A block owns
//     (frame b*T + t, chunk of channels): it stages whole planes (several when they fit) or,
//     for planes larger than the shared-memory tile, groups of output rows' input strips,
//     with contiguous (coalesced) loads, then one thread per output cell sums its window from
//     shared memory. A level where one output row's strip is too large for the tile uses
//     pool_direct instead (one warp per output cell, lanes along the window).
//   head (one block per sample): y_s = w_s P_s + bias_s (lanes along i, warps across the
//     channels, warp partials summed in warp order), softmax a, norms, yh_s, sig_s, G; then
//     one warp per channel: out, mu, u and the per-level sum of u^2; the per-sample loss.
//   finish (one block): loss = mean of the per-sample losses, in sample order.
// Backward
//   head (one block per sample): a, yh, sig, G again from y; per channel mu and kappa u
//     (kept for unpool); ga = gz.(P - mu) (one pass over all Ctot channels), ge; per level
//     gyh = (kappa u).(P - mu) + ..., gy, the per-sample grad_bias term in closed form; per
//     channel the per-sample grad_w term (P - mu) gy + mu gb; finally yh_s - sig_s/n (kept
//     for unpool). Sums over P are centred on the channel means mu (forward u as well), the
//     forms of the Triton backend: no fp32 cancellation when the means dominate the maps.
//   reduce (threads over Ctot + S): grad_w / grad_bias = sum over the samples, in order.
//   unpool (one launch per level): grad_xs[s] = R^T dP with dP in its rank-3 form, so a
//     pixel's value is gz[c] A + w[c] Gy + ku[c] Yc, where A, Gy, Yc (sums of a, gy and
//     yh - sig/n over the cells whose window holds the pixel, each / window size) do not
//     depend on c: a thread computes them once per pixel and writes that pixel for a chunk
//     of channels (consecutive threads on consecutive elements: coalesced stores). Every
//     element written exactly once, no zero fill.
//
// Every sum has a fixed order (sequential loops, fixed-shape shuffle trees, one owner per
// output): bitwise deterministic, no atomics. Sums accumulate in opmath (float; double for
// double). Plain CUDA, no torch: see pyramid_attention.cuh.
#include "pyramid_attention.cuh"

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace attnpool {
namespace pyramid_attention_cuda {
namespace {

using namespace cuda_common;  // OpMath, to_acc, store, op_*, warp_reduce, imin, grid_x, ...

constexpr int kThreads = 256;  // pool / unpool / reduce kernels; a multiple of 32
constexpr int kWarps = kThreads / 32;
constexpr int kHeadThreads = 512;  // head kernels: one block per sample, so a large one
constexpr int kHeadWarps = kHeadThreads / 32;
constexpr int kUnrollC = 4;  // channel rows whose loads are in flight together (head)
// The pooling tile stays under the 48 KiB every device grants without an opt-in attribute.
constexpr size_t kPoolSmemBytes = 32 * 1024;
constexpr int64_t kUnpoolChannels = 16;  // channels per thread and unpool task

// ------------------------------------------------------------------ adaptive windows
// torch's adaptive pooling: output cell o of `out` over `in` inputs covers
// [floor(o*in/out), ceil((o+1)*in/out)). I: int (the launchers check that (in+1)*out and
// (out+1)*in fit) or int64_t.
template <typename I> __host__ __device__ __forceinline__ I win_start(I o, I in, I out) {
  return (o * in) / out;
}
template <typename I> __host__ __device__ __forceinline__ I win_end(I o, I in, I out) {
  return ((o + 1) * in + out - 1) / out;
}
// The cells whose window holds input x: [floor(x*out/in), ceil((x+1)*out/in) - 1]
// (start(o) <= x  <=>  o*in < (x+1)*out;  end(o) > x  <=>  (o+1)*in > x*out).
template <typename I> __device__ __forceinline__ I cell_first(I x, I in, I out) {
  return (x * out) / in;
}
template <typename I> __device__ __forceinline__ I cell_last(I x, I in, I out) {
  const I last = ((x + 1) * out - 1) / in;
  return last < out - 1 ? last : out - 1;
}

// ------------------------------------------------------------------ level arguments
// Per-level sizes and pointers, passed to the kernels by value.
struct Levels {
  int S;
  int64_t C[kMaxLevels];
  int64_t off[kMaxLevels];  // first channel of level s in [0, Ctot)
  const void* w[kMaxLevels];  // weights[s] [C_s], scalar
  void* gw[kMaxLevels];       // grad_weights[s] [C_s], scalar (backward reduce)
};

// One level's geometry for pool / unpool.
struct LevelGeom {
  int64_t B, T, C, H, W, Ho, Wo, n, Ctot, off;
};

// ------------------------------------------------------------------ block reductions
// Reduces v over a block of kBlockWarps warps and returns the result to every thread; fixed
// order (warp butterflies, then the warps in order, the same in every thread). Every thread
// must call it. red: __shared__ scratch of kBlockWarps elements used only by this function.
template <int kBlockWarps, typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* red, Op op) {
  v = warp_reduce(v, op);
  __syncthreads();  // red may still be read by the previous call's broadcast
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  T s = red[0];
#pragma unroll
  for (int w = 1; w < kBlockWarps; ++w) s = op(s, red[w]);
  return s;
}

template <typename T> __device__ __forceinline__ T head_sum(T v, T* red) {
  return block_reduce<kHeadWarps>(v, red, SumOp{});
}

// fin(i, sum_c coef[c] * (rows[c*n + i] - mu[c])) once for every i < n (opmath sums over
// c < C; mu == nullptr: no centring). Lanes along i (coalesced row reads), warp w takes the
// channels c = w (mod kHeadWarps) in order, the kHeadWarps partials are summed in warp order
// by the first warp, which calls fin. coef: scalar or opmath (any type to_acc takes); mu:
// opmath [C], read by every thread. red: __shared__ [kHeadWarps * 32]. Every thread of the
// block must call it; it ends with a barrier (fin's writes are visible).
template <typename acc_t, typename coef_t, typename Fin>
__device__ __forceinline__ void col_dot(const acc_t* __restrict__ rows, const coef_t* coef,
                                        const acc_t* mu, int64_t C, int64_t n, acc_t* red,
                                        Fin fin) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t i0 = 0; i0 < n; i0 += 32) {
    const int64_t i = i0 + lane;
    const bool valid = i < n;
    acc_t acc = 0;
    int64_t c = warp;
    for (; c + (kUnrollC - 1) * kHeadWarps < C; c += kUnrollC * kHeadWarps) {
      acc_t xv[kUnrollC];
#pragma unroll
      for (int k = 0; k < kUnrollC; ++k)
        xv[k] = valid ? rows[(c + k * kHeadWarps) * n + i] : acc_t(0);
      if (mu != nullptr && valid) {
#pragma unroll
        for (int k = 0; k < kUnrollC; ++k) xv[k] -= mu[c + k * kHeadWarps];
      }
#pragma unroll
      for (int k = 0; k < kUnrollC; ++k) acc += to_acc(coef[c + k * kHeadWarps]) * xv[k];
    }
    for (; c < C; c += kHeadWarps) {
      const acc_t xv = valid ? rows[c * n + i] - (mu != nullptr ? mu[c] : acc_t(0)) : acc_t(0);
      acc += to_acc(coef[c]) * xv;
    }
    red[warp * 32 + lane] = acc;
    __syncthreads();
    if (warp == 0) {
      acc_t s = red[lane];
#pragma unroll
      for (int w = 1; w < kHeadWarps; ++w) s += red[w * 32 + lane];
      if (valid) fin(i, s);
    }
    __syncthreads();  // red is rewritten by the next chunk; fin's writes are read next
  }
}

// Per-sample state shared by both head kernels: a = softmax(sum_s y_s) into ab[n],
// yh_s = y_s / max(r_s, eps) into yhb[S*n], and r, sig, G (every thread gets them).
// y is only read here. Every thread must call it; ends with a barrier.
template <typename acc_t>
__device__ __forceinline__ void attention_state(const acc_t* yb, acc_t* ab, acc_t* yhb, int S,
                                                int64_t n, acc_t eps, acc_t* red, acc_t* r,
                                                acc_t* sig, acc_t* G) {
  // softmax over i of z_i = sum_s y_s[i]
  acc_t m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) {
    acc_t z = yb[i];
    for (int s = 1; s < S; ++s) z += yb[s * n + i];
    ab[i] = z;
    m = z > m ? z : m;
  }
  m = block_reduce<kHeadWarps>(m, red, MaxOp{});
  acc_t l = 0;
  for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) {
    const acc_t e = op_exp(ab[i] - m);
    ab[i] = e;  // the same thread divides it below
    l += e;
  }
  l = head_sum(l, red);
  for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) ab[i] = ab[i] / l;

  // norms, unit scores and their sums
  for (int s = 0; s < S; ++s) {
    const acc_t* ys = yb + s * n;
    acc_t q = 0;
    for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) q += ys[i] * ys[i];
    r[s] = op_sqrt(head_sum(q, red));
    const acc_t d = r[s] < eps ? eps : r[s];  // F.normalize's clamp_min(eps); NaN stays NaN
    acc_t t = 0;
    for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) {
      const acc_t v = ys[i] / d;
      yhb[s * n + i] = v;
      t += v;
    }
    sig[s] = head_sum(t, red);
  }
  // Gram matrix of the unit scores (each thread reads back only what it wrote above)
  for (int s = 0; s < S; ++s) {
    G[s * kMaxLevels + s] = 1;  // unused (diagonal)
    for (int t = s + 1; t < S; ++t) {
      acc_t g = 0;
      for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) g += yhb[s * n + i] * yhb[t * n + i];
      g = head_sum(g, red);
      G[s * kMaxLevels + t] = g;
      G[t * kMaxLevels + s] = g;
    }
  }
  __syncthreads();  // ab and yhb are read across threads from here on
}

// ------------------------------------------------------------------ forward: pool
// Block task = (frame bt, chunk of kc channels). Either kc whole planes fit the tile (one
// row group), or kc == 1 and the plane is staged in groups of output rows whose input strip
// [start(oh0), end(oh1 - 1)) fits (the launcher checked one output row always does). Either
// way the staged elements are contiguous in x. I: in-frame index arithmetic (see win_start).
template <typename scalar_t, typename I>
__global__ void __launch_bounds__(kThreads)
pyramid_attention_pool_kernel(const scalar_t* __restrict__ x, typename OpMath<scalar_t>::type* __restrict__ pooled,
                LevelGeom g, int64_t kc, int64_t cap) {
  using acc_t = typename OpMath<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  const I H = static_cast<I>(g.H), W = static_cast<I>(g.W);
  const I Ho = static_cast<I>(g.Ho), Wo = static_cast<I>(g.Wo);
  const int64_t chunks = divup(g.C, kc);
  const int64_t tasks = g.B * g.T * chunks;
  const int64_t plane = g.H * g.W;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t bt = task / chunks;
    const int64_t c0 = (task - bt * chunks) * kc;
    const I nc = static_cast<I>(imin(kc, g.C - c0));
    const int64_t b = bt / g.T;
    const int64_t t = bt - b * g.T;
    const scalar_t* xf = x + (bt * g.C + c0) * plane;
    acc_t* dst = pooled + (b * g.Ctot + g.off + c0) * g.n + t * g.Ho * g.Wo;
    for (I oh0 = 0; oh0 < Ho;) {
      const I r0 = win_start(oh0, H, Ho);
      I oh1 = oh0 + 1;
      while (oh1 < Ho && static_cast<int64_t>(nc) * (win_end(oh1, H, Ho) - r0) * W <= cap) ++oh1;
      const I span = (win_end(oh1 - 1, H, Ho) - r0) * W;  // rows [r0, r1) of a plane
      // nc > 1 only with whole planes (span == plane): one contiguous run either way.
      const scalar_t* src = xf + static_cast<int64_t>(r0) * W;
      for (I e = threadIdx.x; e < nc * span; e += kThreads) tile[e] = to_acc(src[e]);
      __syncthreads();
      const I cells = (oh1 - oh0) * Wo;
      for (I e = threadIdx.x; e < nc * cells; e += kThreads) {
        const I cl = e / cells;
        const I k = e - cl * cells;
        const I q = k / Wo;
        const I oh = oh0 + q, ow = k - q * Wo;
        const I hs = win_start(oh, H, Ho), he = win_end(oh, H, Ho);
        const I ws = win_start(ow, W, Wo), we = win_end(ow, W, Wo);
        const acc_t* p = tile + cl * span + (hs - r0) * W;
        acc_t sum = 0;
        for (I h = hs; h < he; ++h, p += W)
          for (I w = ws; w < we; ++w) sum += p[w];
        dst[cl * g.n + oh * Wo + ow] = sum / acc_t((he - hs) * (we - ws));
      }
      __syncthreads();  // the tile is rewritten next
      oh0 = oh1;
    }
  }
}

// Output rows whose input strip exceeds the tile: one warp per output cell (lanes along the
// window's columns, then rows), warp butterfly at the end.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
pyramid_attention_pool_direct_kernel(const scalar_t* __restrict__ x,
                       typename OpMath<scalar_t>::type* __restrict__ pooled, LevelGeom g) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t cells_frame = g.Ho * g.Wo;
  const int64_t total = g.B * g.T * g.C * cells_frame;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); q < total;
       q += stride) {
    const int64_t pl = q / cells_frame;  // plane (bt, c)
    const int64_t cell = q - pl * cells_frame;
    const int64_t oh = cell / g.Wo, ow = cell - (cell / g.Wo) * g.Wo;
    const int64_t hs = win_start(oh, g.H, g.Ho), he = win_end(oh, g.H, g.Ho);
    const int64_t ws = win_start(ow, g.W, g.Wo), we = win_end(ow, g.W, g.Wo);
    const int64_t kw = we - ws;
    const scalar_t* p = x + pl * g.H * g.W + hs * g.W + ws;
    acc_t sum = 0;
    for (int64_t k = lane; k < (he - hs) * kw; k += 32) {
      const int64_t h = k / kw;
      sum += to_acc(p[h * g.W + (k - h * kw)]);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      const int64_t bt = pl / g.C, c = pl - (pl / g.C) * g.C;
      const int64_t b = bt / g.T, t = bt - (bt / g.T) * g.T;
      pooled[(b * g.Ctot + g.off + c) * g.n + t * cells_frame + cell] =
          sum / acc_t((he - hs) * kw);
    }
  }
}

// ------------------------------------------------------------------ forward: head
// One block per sample b. ab [B, n], yhb [B, S, n]: opmath workspace; loss_part [B].
template <typename scalar_t>
__global__ void __launch_bounds__(kHeadThreads)
pyramid_attention_forward_head_kernel(const typename OpMath<scalar_t>::type* __restrict__ pooled,
                        const scalar_t* __restrict__ bias, Levels lv, scalar_t* __restrict__ out,
                        typename OpMath<scalar_t>::type* y, typename OpMath<scalar_t>::type* a_ws,
                        typename OpMath<scalar_t>::type* yh_ws,
                        typename OpMath<scalar_t>::type* __restrict__ loss_part, int64_t B,
                        int64_t n, int64_t Ctot, double eps, double lam) {
  using acc_t = typename OpMath<scalar_t>::type;
  __shared__ acc_t red_col[kHeadWarps * 32];
  __shared__ acc_t red[kHeadWarps];
  const int S = lv.S;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const acc_t* P = pooled + b * Ctot * n;
    acc_t* yb = y + b * S * n;
    acc_t* ab = a_ws + b * n;
    acc_t* yhb = yh_ws + b * S * n;

    // y_s = w_s . P_s + bias_s
    for (int s = 0; s < S; ++s) {
      const acc_t bs = to_acc(bias[s]);
      acc_t* ys = yb + s * n;
      col_dot(P + lv.off[s] * n, static_cast<const scalar_t*>(lv.w[s]),
              static_cast<const acc_t*>(nullptr), lv.C[s], n, red_col,
              [&](int64_t i, acc_t v) { ys[i] = v + bs; });
    }
    acc_t r[kMaxLevels], sig[kMaxLevels], G[kMaxLevels * kMaxLevels];
    attention_state(yb, ab, yhb, S, n, acc_t(eps), red, r, sig, G);

    // One warp per channel: out = P a, mu = mean P, then u = sum_i (P - mu) yh (the centred
    // form of P yh - mu sig: no cancellation when the channel's mean dominates); sum_c u^2
    // per level.
    acc_t loss = 0;
    for (int s = 0; s < S; ++s) {
      const acc_t* yhs = yhb + s * n;
      acc_t usq = 0;  // lane 0's sum of u^2 over this warp's channels, in order
      for (int64_t c = warp; c < lv.C[s]; c += kHeadWarps) {
        const acc_t* row = P + (lv.off[s] + c) * n;
        acc_t sp = 0, sa = 0;
        for (int64_t i = lane; i < n; i += 32) {
          const acc_t p = row[i];
          sp += p;
          sa += p * ab[i];
        }
        sp = warp_sum(sp);  // butterflies: every lane holds the same sums
        sa = warp_sum(sa);
        const acc_t mu = sp / acc_t(n);
        acc_t u = 0;
        for (int64_t i = lane; i < n; i += 32) u += (row[i] - mu) * yhs[i];
        u = warp_sum(u);
        if (lane == 0) {
          store(out + b * Ctot + lv.off[s] + c, sa);
          usq += u * u;
        }
      }
      const acc_t v = head_sum(usq, red);
      loss -= v / acc_t(lv.C[s]) / acc_t(S);
    }
    acc_t div = 0;  // sum over s != t of G_st^2
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < S; ++t)
        if (t != s) div += G[s * kMaxLevels + t] * G[s * kMaxLevels + t];
    if (threadIdx.x == 0) loss_part[b] = loss + acc_t(lam) * div;
    __syncthreads();  // workspace and shared scratch are reused by the next sample
  }
}

// One block: loss = mean over the samples (in order per thread, then the block in a fixed
// order); NaN when B = 0, as torch's mean over nothing.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
pyramid_attention_loss_mean_kernel(const typename OpMath<scalar_t>::type* __restrict__ loss_part,
                     scalar_t* __restrict__ loss, int64_t B) {
  using acc_t = typename OpMath<scalar_t>::type;
  __shared__ acc_t red[kWarps];
  acc_t s = 0;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) s += loss_part[b];
  s = block_reduce<kWarps>(s, red, SumOp{});
  if (threadIdx.x == 0) store(loss, s / acc_t(B));
}

// ------------------------------------------------------------------ backward: head
// One block per sample b. Workspace (opmath): ab, geb [B, n]; yhb (-> yh - sig/n), gyb
// [B, S, n]; kub [B, Ctot] (kappa_s u_s); gw_part [B, Ctot] (holds mu until the grad_w
// pass); gb_part [B, S].
template <typename scalar_t>
__global__ void __launch_bounds__(kHeadThreads)
pyramid_attention_backward_head_kernel(const scalar_t* __restrict__ grad_out,
                         const scalar_t* __restrict__ grad_loss,
                         const typename OpMath<scalar_t>::type* __restrict__ pooled,
                         const typename OpMath<scalar_t>::type* __restrict__ y, Levels lv,
                         typename OpMath<scalar_t>::type* a_ws, typename OpMath<scalar_t>::type* ge_ws,
                         typename OpMath<scalar_t>::type* yh_ws, typename OpMath<scalar_t>::type* gy_ws,
                         typename OpMath<scalar_t>::type* ku_ws,
                         typename OpMath<scalar_t>::type* __restrict__ gw_part,
                         typename OpMath<scalar_t>::type* __restrict__ gb_part, int64_t B,
                         int64_t n, int64_t Ctot, double eps, double lam) {
  using acc_t = typename OpMath<scalar_t>::type;
  __shared__ acc_t red_col[kHeadWarps * 32];
  __shared__ acc_t red[kHeadWarps];
  const int S = lv.S;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const acc_t gl = to_acc(*grad_loss) / acc_t(B);
  const acc_t eps_a = acc_t(eps);
  const acc_t lam4 = acc_t(4) * acc_t(lam) * gl;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const acc_t* P = pooled + b * Ctot * n;
    const scalar_t* gz = grad_out + b * Ctot;
    acc_t* ab = a_ws + b * n;
    acc_t* geb = ge_ws + b * n;
    acc_t* yhb = yh_ws + b * S * n;
    acc_t* gyb = gy_ws + b * S * n;
    acc_t* kub = ku_ws + b * Ctot;

    acc_t r[kMaxLevels], sig[kMaxLevels], G[kMaxLevels * kMaxLevels];
    attention_state(y + b * S * n, ab, yhb, S, n, eps_a, red, r, sig, G);

    // One warp per channel: mu_s[c] = mean P, then kappa_s u_s[c] with u_s[c] = sum_i (P - mu)
    // yh_s (centred). kappa u goes to kub (kept for unpool); mu is parked in this sample's
    // gw_part row until the grad_w pass below overwrites it (the same warp owns channel c in
    // both passes, and reads mu before lane 0 writes).
    acc_t* mub = gw_part + b * Ctot;
    for (int s = 0; s < S; ++s) {
      const acc_t kappa = acc_t(-2) * gl / acc_t(S * lv.C[s]);
      const acc_t* yhs = yhb + s * n;
      for (int64_t c = warp; c < lv.C[s]; c += kHeadWarps) {
        const acc_t* row = P + (lv.off[s] + c) * n;
        acc_t sp = 0;
        for (int64_t i = lane; i < n; i += 32) sp += row[i];
        const acc_t mu = warp_sum(sp) / acc_t(n);
        acc_t u = 0;
        for (int64_t i = lane; i < n; i += 32) u += (row[i] - mu) * yhs[i];
        u = warp_sum(u);
        if (lane == 0) {
          kub[lv.off[s] + c] = kappa * u;
          mub[lv.off[s] + c] = mu;
        }
      }
    }
    __syncthreads();  // kub and mub are read across warps below

    // ga = sum over all Ctot channels of gz[c] (P[c, :] - mu[c]); softmax backward
    // ge = a (ga - a.ga). Centring shifts ga by a constant, which ge does not see (sum a = 1),
    // and avoids the cancellation of ga - a.ga when the channels' means dominate.
    col_dot(P, gz, static_cast<const acc_t*>(mub), Ctot, n, red_col,
            [&](int64_t i, acc_t v) { geb[i] = v; });
    acc_t d = 0;
    for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) d += ab[i] * geb[i];
    d = head_sum(d, red);
    for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) geb[i] = ab[i] * (geb[i] - d);

    // Per level: gyh = sum_c (kappa u)[c] (P[c, :] - mu[c]) + 4 lam gl sum_{t != s} G_st yh_t,
    // then gy (through the normalisation) and the per-sample grad_bias term in closed form:
    // sum_i ge_i = 0 and the kappa part of sum_i gyh_s[i] is 0, so sum_i gy_s[i] =
    // (4 lam gl sum_{t != s} G_st sig_t - sig_s proj_s) / d_s (proj_s = yh_s.gyh_s when
    // r_s >= eps, else 0; d_s = max(r_s, eps)); summing gy instead leaves only the rounding
    // noise of those zeros, which swamps small gradients. 0 * sum_i gy_s[i] is added so
    // that a non-finite gy (e.g. from grad_out) still reaches grad_bias.
    acc_t gb[kMaxLevels];
    for (int s = 0; s < S; ++s) {
      acc_t* gys = gyb + s * n;
      const acc_t* yhs = yhb + s * n;
      col_dot(P + lv.off[s] * n, kub + lv.off[s], static_cast<const acc_t*>(mub + lv.off[s]),
              lv.C[s], n, red_col, [&](int64_t i, acc_t v) {
                acc_t div = 0;
                for (int t = 0; t < S; ++t)
                  if (t != s) div += G[s * kMaxLevels + t] * yhb[t * n + i];
                gys[i] = v + lam4 * div;
              });
      acc_t dot = 0;
      for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) dot += yhs[i] * gys[i];
      dot = head_sum(dot, red);
      const bool big = r[s] >= eps_a;  // clamp_min passes the gradient at r == eps
      acc_t gsum = 0;
      for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) {
        const acc_t gyh = gys[i];
        const acc_t v = (big ? (gyh - yhs[i] * dot) / r[s] : gyh / eps_a) + geb[i];
        gys[i] = v;
        gsum += v;
      }
      gsum = head_sum(gsum, red);
      acc_t inter = 0;  // sum_{t != s} G_st sig_t
      for (int t = 0; t < S; ++t)
        if (t != s) inter += G[s * kMaxLevels + t] * sig[t];
      const acc_t closed = big ? (lam4 * inter - sig[s] * dot) / r[s] : lam4 * inter / eps_a;
      gb[s] = closed + acc_t(0) * gsum;
      if (threadIdx.x == 0) gb_part[b * S + s] = gb[s];
    }
    __syncthreads();  // gy is read across threads below

    // One warp per channel: the per-sample grad_w term P_s[c, :] . gy_s, summed as
    // sum_i gy_s[i] (P_s[c, i] - mu_s[c]) + mu_s[c] gb_s (the gy sum's rounding noise would
    // otherwise come back multiplied by the channel's mean).
    for (int s = 0; s < S; ++s) {
      const acc_t* gys = gyb + s * n;
      for (int64_t c = warp; c < lv.C[s]; c += kHeadWarps) {
        const acc_t* row = P + (lv.off[s] + c) * n;
        const acc_t mu = mub[lv.off[s] + c];
        acc_t sg = 0;
        for (int64_t i = lane; i < n; i += 32) sg += (row[i] - mu) * gys[i];
        sg = warp_sum(sg);
        if (lane == 0) gw_part[b * Ctot + lv.off[s] + c] = sg + mu * gb[s];
      }
    }
    // yh_s - sig_s / n for unpool's dP (each thread rewrites only what it wrote; the gyh
    // pass that read yh across threads ended in barriers).
    for (int s = 0; s < S; ++s) {
      const acc_t sn = sig[s] / acc_t(n);
      for (int64_t i = threadIdx.x; i < n; i += kHeadThreads) yhb[s * n + i] -= sn;
    }
    __syncthreads();  // workspace and shared scratch are reused by the next sample
  }
}

// grad_w[s][c] = sum_b gw_part[b, off_s + c], grad_bias[s] = sum_b gb_part[b, s], in sample
// order; one thread per entry (e < Ctot: a weight, else a bias).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
pyramid_attention_param_grad_kernel(const typename OpMath<scalar_t>::type* __restrict__ gw_part,
                      const typename OpMath<scalar_t>::type* __restrict__ gb_part, Levels lv,
                      scalar_t* __restrict__ grad_bias, int64_t B, int64_t Ctot) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t total = Ctot + lv.S;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (e < Ctot) {
      int s = 0;
      while (s + 1 < lv.S && e >= lv.off[s + 1]) ++s;
      acc_t v = 0;
      for (int64_t b = 0; b < B; ++b) v += gw_part[b * Ctot + e];
      store(static_cast<scalar_t*>(lv.gw[s]) + (e - lv.off[s]), v);
    } else {
      const int64_t s = e - Ctot;
      acc_t v = 0;
      for (int64_t b = 0; b < B; ++b) v += gb_part[b * lv.S + s];
      store(grad_bias + s, v);
    }
  }
}

// ------------------------------------------------------------------ backward: unpool
// grad_x[b, t, c, h, w] = sum over the cells (oh, ow) whose window holds (h, w) of
// dP[c, i] / (window size), dP = gz[c] a[i] + w[c] gy[i] + ku[c] yc[i], i = t*Ho*Wo + cell;
// factored as gz[c] A + w[c] Gy + ku[c] Yc with the per-pixel sums A, Gy, Yc of a, gy, yc
// over those cells (independent of c: computed once per pixel and reused for the chunk's
// channels). Block task = (frame bt, chunk of kcu channels, tile of pixels): a thread owns
// pixel p of the tile and the channels cg, cg + G, ... of the chunk, where G = kThreads /
// ptile thread groups share the block when a frame has fewer pixels than threads.
// Consecutive threads write consecutive elements (planes of a chunk are contiguous).
// ab [B, n]; gys, ycs: level s of [B, S, n] (sample stride S*n); kub [B, Ctot].
template <typename scalar_t, typename I>
__global__ void __launch_bounds__(kThreads)
pyramid_attention_unpool_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ wt,
                  const typename OpMath<scalar_t>::type* __restrict__ ab,
                  const typename OpMath<scalar_t>::type* __restrict__ gys,
                  const typename OpMath<scalar_t>::type* __restrict__ ycs,
                  const typename OpMath<scalar_t>::type* __restrict__ kub,
                  scalar_t* __restrict__ grad_x, LevelGeom g, int64_t S, int64_t kcu) {
  using acc_t = typename OpMath<scalar_t>::type;
  const I H = static_cast<I>(g.H), W = static_cast<I>(g.W);
  const I Ho = static_cast<I>(g.Ho), Wo = static_cast<I>(g.Wo);
  const I HW = H * W;
  const I ptile = HW < kThreads ? HW : I(kThreads);  // pixels per tile
  const I G = kThreads / ptile;                       // thread groups (channel strides)
  const I cg = static_cast<I>(threadIdx.x) / ptile;
  const I pl = static_cast<I>(threadIdx.x) - cg * ptile;
  const int64_t tiles = divup(g.H * g.W, static_cast<int64_t>(ptile));
  const int64_t chunks = divup(g.C, kcu);
  const int64_t tasks = g.B * g.T * chunks * tiles;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t rest = task / tiles;
    const int64_t tile = task - rest * tiles;
    const int64_t bt = rest / chunks;
    const int64_t c0 = (rest - bt * chunks) * kcu;
    const int64_t nc = imin(kcu, g.C - c0);
    const I p = static_cast<I>(tile) * ptile + pl;
    if (cg >= G || p >= HW) continue;  // no barriers in this kernel
    const int64_t b = bt / g.T;
    const int64_t t = bt - b * g.T;
    const I h = p / W, w = p - (p / W) * W;
    const acc_t* af = ab + b * g.n + t * g.Ho * g.Wo;
    const acc_t* gf = gys + b * S * g.n + t * g.Ho * g.Wo;
    const acc_t* yf = ycs + b * S * g.n + t * g.Ho * g.Wo;
    acc_t A = 0, Gy = 0, Yc = 0;
    const I oh_hi = cell_last(h, H, Ho), ow_lo = cell_first(w, W, Wo), ow_hi = cell_last(w, W, Wo);
    for (I oh = cell_first(h, H, Ho); oh <= oh_hi; ++oh) {
      const I kh = win_end(oh, H, Ho) - win_start(oh, H, Ho);
      for (I ow = ow_lo; ow <= ow_hi; ++ow) {
        const acc_t inv = acc_t(1) / acc_t(kh * (win_end(ow, W, Wo) - win_start(ow, W, Wo)));
        const I i = oh * Wo + ow;
        A += af[i] * inv;
        Gy += gf[i] * inv;
        Yc += yf[i] * inv;
      }
    }
    const int64_t ch = b * g.Ctot + g.off + c0;  // channel c0 in grad_out / kub
    scalar_t* dst = grad_x + (bt * g.C + c0) * (g.H * g.W) + p;
    for (int64_t c = cg; c < nc; c += G)
      store(dst + c * HW, to_acc(grad_out[ch + c]) * A + to_acc(wt[c0 + c]) * Gy + kub[ch + c] * Yc);
  }
}

// ------------------------------------------------------------------ launchers
struct Derived {
  int64_t Ho, Wo, n, Ctot;
  int64_t off[kMaxLevels];
};

bool valid_shape(const PyramidShape& p) {
  if (p.S < 1 || p.S > kMaxLevels || p.B < 0 || p.T < 1) return false;
  for (int s = 0; s < p.S; ++s)
    if (p.C[s] < 1 || p.H[s] < 1 || p.W[s] < 1) return false;
  return true;
}

Derived derive(const PyramidShape& p) {
  Derived d{};
  d.Ho = p.H[p.S - 1];
  d.Wo = p.W[p.S - 1];
  d.n = p.T * d.Ho * d.Wo;
  d.Ctot = 0;
  for (int s = 0; s < p.S; ++s) {
    d.off[s] = d.Ctot;
    d.Ctot += p.C[s];
  }
  return d;
}

Levels make_levels(const PyramidShape& p, const Derived& d, const void* const* weights,
                   void* const* grad_weights) {
  Levels lv{};
  lv.S = p.S;
  for (int s = 0; s < p.S; ++s) {
    lv.C[s] = p.C[s];
    lv.off[s] = d.off[s];
    lv.w[s] = weights != nullptr ? weights[s] : nullptr;
    lv.gw[s] = grad_weights != nullptr ? grad_weights[s] : nullptr;
  }
  return lv;
}

LevelGeom level_geom(const PyramidShape& p, const Derived& d, int s) {
  return LevelGeom{p.B, p.T, p.C[s], p.H[s], p.W[s], d.Ho, d.Wo, d.n, d.Ctot, d.off[s]};
}

// In-frame index arithmetic of one level fits int: every product the window helpers form
// ((in+1)*out + out in both directions) and the frame's pixel count.
bool frame_fits_int(const LevelGeom& g) {
  constexpr int64_t kMaxInt = 2147483647;
  return g.Ho * (g.H + 2) <= kMaxInt && g.Wo * (g.W + 2) <= kMaxInt && g.H * g.W <= kMaxInt;
}

// Calls f(I{}) with I = int when the level's frame arithmetic fits, else int64_t.
template <typename F> void dispatch_index(const LevelGeom& g, F&& f) {
  if (frame_fits_int(g)) {
    f(int{});
  } else {
    f(int64_t{});
  }
}

// R of one level into pooled: the tiled kernel when one output row's input strip fits the
// tile (several whole planes per block when they fit), else the direct one.
template <typename scalar_t>
void launch_pool(const void* x, void* pooled, const LevelGeom& g, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t cap = static_cast<int64_t>(kPoolSmemBytes / sizeof(acc_t));
  const int64_t plane = g.H * g.W;
  int64_t kc = 0;  // channels per block; 0: direct kernel
  if (plane <= cap) {
    kc = imin(g.C, cap / plane);
  } else {
    int64_t rows = 0;  // tallest window
    for (int64_t oh = 0; oh < g.Ho; ++oh)
      rows = imax(rows, win_end(oh, g.H, g.Ho) - win_start(oh, g.H, g.Ho));
    if (rows * g.W <= cap) kc = 1;
  }
  if (kc > 0) {
    const size_t smem = static_cast<size_t>(imin(kc * plane, cap)) * sizeof(acc_t);
    const unsigned int grid = grid_x(g.B * g.T * divup(g.C, kc));
    dispatch_index(g, [&](auto idx) {
      using I = decltype(idx);
      pyramid_attention_pool_kernel<scalar_t, I><<<grid, kThreads, smem, stream>>>(
          static_cast<const scalar_t*>(x), static_cast<acc_t*>(pooled), g, kc, cap);
    });
  } else {
    const int64_t warps = g.B * g.T * g.C * g.Ho * g.Wo;
    pyramid_attention_pool_direct_kernel<scalar_t><<<grid_x(divup(warps, kWarps)), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<acc_t*>(pooled), g);
  }
}

template <typename scalar_t>
cudaError_t forward_impl(const PyramidShape& p, const void* const* xs, const void* const* weights,
                         const void* bias, double eps, double lam, void* out, void* loss,
                         void* pooled, void* y, void* workspace, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const Derived d = derive(p);
  acc_t* ws = static_cast<acc_t*>(workspace);
  if (p.B > 0) {
    if (ws == nullptr) return cudaErrorInvalidValue;
    for (int s = 0; s < p.S; ++s) {
      launch_pool<scalar_t>(xs[s], pooled, level_geom(p, d, s), stream);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    acc_t* a_ws = ws;
    acc_t* yh_ws = a_ws + p.B * d.n;
    acc_t* loss_part = yh_ws + p.B * p.S * d.n;
    pyramid_attention_forward_head_kernel<scalar_t><<<grid_x(p.B), kHeadThreads, 0, stream>>>(
        static_cast<const acc_t*>(pooled), static_cast<const scalar_t*>(bias),
        make_levels(p, d, weights, nullptr), static_cast<scalar_t*>(out),
        static_cast<acc_t*>(y), a_ws, yh_ws, loss_part, p.B, d.n, d.Ctot, eps, lam);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const acc_t* loss_part = p.B > 0 ? ws + p.B * (p.S + 1) * d.n : nullptr;
  pyramid_attention_loss_mean_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
      loss_part, static_cast<scalar_t*>(loss), p.B);
  return cudaGetLastError();
}

// Channels per unpool task: kUnpoolChannels per thread group (the per-pixel sums are
// computed once per task), and enough tasks to fill the device.
template <typename scalar_t>
void launch_unpool(const void* grad_out, const void* wt, const void* ab, const void* gys,
                   const void* ycs, const void* kub, void* grad_x, const LevelGeom& g, int64_t S,
                   cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t ptile = imin(g.H * g.W, kThreads);
  const int64_t kcu = imin(g.C, (kThreads / ptile) * kUnpoolChannels);
  const int64_t tasks = g.B * g.T * divup(g.C, kcu) * divup(g.H * g.W, ptile);
  dispatch_index(g, [&](auto idx) {
    using I = decltype(idx);
    pyramid_attention_unpool_kernel<scalar_t, I><<<grid_x(tasks), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(wt),
        static_cast<const acc_t*>(ab), static_cast<const acc_t*>(gys),
        static_cast<const acc_t*>(ycs), static_cast<const acc_t*>(kub),
        static_cast<scalar_t*>(grad_x), g, S, kcu);
  });
}

template <typename scalar_t>
cudaError_t backward_impl(const PyramidShape& p, const void* grad_out, const void* grad_loss,
                          const void* pooled, const void* y, const void* const* weights,
                          double eps, double lam, void* const* grad_xs,
                          void* const* grad_weights, void* grad_bias, void* workspace,
                          cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const Derived d = derive(p);
  const int64_t B = p.B, n = d.n, S = p.S;
  acc_t* ws = static_cast<acc_t*>(workspace);
  if (B > 0 && ws == nullptr) return cudaErrorInvalidValue;
  // Workspace layout (see pyramid_attention_backward_workspace_elems); empty when B = 0.
  acc_t* a_ws = ws;
  acc_t* ge_ws = B > 0 ? a_ws + B * n : nullptr;
  acc_t* yh_ws = B > 0 ? ge_ws + B * n : nullptr;
  acc_t* gy_ws = B > 0 ? yh_ws + B * S * n : nullptr;
  acc_t* ku_ws = B > 0 ? gy_ws + B * S * n : nullptr;
  acc_t* gw_part = B > 0 ? ku_ws + B * d.Ctot : nullptr;
  acc_t* gb_part = B > 0 ? gw_part + B * d.Ctot : nullptr;
  const Levels lv = make_levels(p, d, weights, grad_weights);
  if (B > 0) {
    pyramid_attention_backward_head_kernel<scalar_t><<<grid_x(B), kHeadThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(grad_loss),
        static_cast<const acc_t*>(pooled), static_cast<const acc_t*>(y), lv, a_ws, ge_ws, yh_ws,
        gy_ws, ku_ws, gw_part, gb_part, B, n, d.Ctot, eps, lam);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  pyramid_attention_param_grad_kernel<scalar_t><<<grid_x(divup(d.Ctot + S, kThreads)), kThreads, 0, stream>>>(
      gw_part, gb_part, lv, static_cast<scalar_t*>(grad_bias), B, d.Ctot);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || B == 0) return err;
  for (int s = 0; s < p.S; ++s) {
    const LevelGeom g = level_geom(p, d, s);
    const acc_t* gys = gy_ws + s * n;
    const acc_t* ycs = yh_ws + s * n;
    launch_unpool<scalar_t>(grad_out, weights[s], a_ws, gys, ycs, ku_ws, grad_xs[s], g, S,
                            stream);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int64_t pyramid_attention_forward_workspace_elems(DType, const PyramidShape& shape) {
  if (!valid_shape(shape)) return 0;
  const Derived d = derive(shape);
  return shape.B * ((shape.S + 1) * d.n + 1);
}

int64_t pyramid_attention_backward_workspace_elems(DType, const PyramidShape& shape) {
  if (!valid_shape(shape)) return 0;
  const Derived d = derive(shape);
  return shape.B * ((2 * shape.S + 2) * d.n + 2 * d.Ctot + shape.S);
}

cudaError_t pyramid_attention_forward_launch(DType dtype, const PyramidShape& shape,
                                   const void* const* xs, const void* const* weights,
                                   const void* bias, double eps, double lam, void* out,
                                   void* loss, void* pooled, void* y, void* workspace,
                                   cudaStream_t stream) {
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return forward_impl<typename decltype(tag)::type>(shape, xs, weights, bias, eps, lam, out,
                                                      loss, pooled, y, workspace, stream);
  });
}

cudaError_t pyramid_attention_backward_launch(DType dtype, const PyramidShape& shape, const void* grad_out,
                                    const void* grad_loss, const void* pooled, const void* y,
                                    const void* const* weights, double eps, double lam,
                                    void* const* grad_xs, void* const* grad_weights,
                                    void* grad_bias, void* workspace, cudaStream_t stream) {
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return backward_impl<typename decltype(tag)::type>(shape, grad_out, grad_loss, pooled, y,
                                                       weights, eps, lam, grad_xs, grad_weights,
                                                       grad_bias, workspace, stream);
  });
}

}  // namespace pyramid_attention_cuda
}  // namespace attnpool
