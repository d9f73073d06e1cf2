// Fused attentional-pooling kernels (factored core, docs/design.md "Attentional pooling"; spec:
// attentional_pooling.cuh).
//
// Unit of work: one block per (sample b, tile of at most kTile = 32 positions); the n
// positions of a sample are split into balanced tiles (n = 196: 7 tiles of 28).
//
//   forward   phase 1: h[p, tile] = wb x_tile + bb, a full reduction over C (first read of
//                      the tile; P in chunks of KP <= 4 ranks, one read per chunk); h is
//                      stored and kept in opmath in shared memory.
//             phase 2: z partial [P, C] = h x_tile^T over the tile's positions (second read
//                      of the tile, in reverse channel order so that it starts with what
//                      phase 1 read last, still in L2). One tile: z = partial / n directly;
//                      else per-tile partials (opmath) summed in tile order by finish_z.
//   backward  phase 1: dh[p, tile] = grad_h + (grad_z x_tile) / n (as forward phase 1).
//             phase 2: grad_wb partial [P, C] = dh x_tile^T and grad_bb partial = sum_i dh,
//                      per (sample, tile), summed over the first dimension by the caller;
//                      grad_x tile = (grad_z / n)^T h + wb^T dh (needs no x) written once.
//
// weighted_pool (h given): the forward kernel with kGivenH (the h tile is loaded instead of
// phase 1; same phase 2 and finish_z), and weighted_pool_backward_kernel: phase 1 with grad_z gives
// grad_h = (grad_z x_tile) / n, stored directly; grad_x tile = (grad_z / n)^T h as above.
//
// Layouts (thread mapping chosen so that every load of x and store of grad_x is coalesced
// along x's contiguous dimension):
//   n-contiguous (NC): lane <-> position. Phase 1: warps split the channels, partial sums
//     reduced over the warps in shared memory. Phase 2: a warp loads 32 channel rows into
//     registers and reduces them over the lanes with a reduce-scatter butterfly (31 shuffles
//     for 32 rows; lane l ends with row l). grad_x: one channel row per warp iteration.
//   C-contiguous (CL): phase 1: warp <-> 4 positions, lanes along C, warp butterfly at the
//     end. Phase 2: thread <-> channel, looping over the tile's positions in registers.
//
// Every sum has a fixed order (sequential loops, fixed-shape shuffle trees, one writer per
// output): bitwise deterministic, no atomics. Sums accumulate in opmath (float; double for
// double). Plain CUDA, no torch: see attentional_pooling.cuh.
#include "attentional_pooling.cuh"

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace attnpool {
namespace attentional_pooling_cuda {
namespace {

using namespace cuda_common;  // OpMath, to_acc, store, warp_sum, imin, divup, grid_x, ...

constexpr int kThreads = 256;  // block size of every kernel; a multiple of 32 (full warps)
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;  // positions per tile: one per lane in the NC paths
constexpr int kPosPerWarp = kTile / kWarps;  // CL phase 1: positions per warp (4)
static_assert(kPosPerWarp * kWarps == kTile, "CL phase 1 covers the tile exactly");
constexpr int kUnrollC = 8;  // NC phase 1: channel rows loaded ahead per thread
// h (and dh) tiles live in dynamic shared memory up to this size, else in the workspace.
// With the static reduction scratch (<= 8 KiB) it stays under the 48 KiB every device
// grants without an opt-in attribute.
constexpr size_t kMaxDynSmem = 32 * 1024;

// Balanced tiles: ceil(n / ceil(n / kTile)) positions each (<= kTile), the last one shorter.
__host__ __device__ __forceinline__ int64_t tile_len_of(int64_t n) {
  return divup(n, divup(n, kTile));
}

// ------------------------------------------------------------------ warp reductions
// Reduce-scatter of 32 rows over the 32 lanes: returns in lane l the sum over all lanes of
// row l (v[l]). Step `off` pairs the lanes differing in that bit: of the 2*off rows still
// held, the lane with the bit clear keeps rows r < off, the other rows r + off, and each
// adds its partner's copy of the rows it keeps. After the steps 16..off, v[r] holds row
// r + (lane & ~(off - 1) & 31), so at the end v[0] is row `lane`, summed over all lanes.
// 31 shuffles for 32 rows, fixed order; every lane must call it.
template <int kOff, typename T> __device__ __forceinline__ void reduce_scatter_step(T (&v)[32],
                                                                                 int lane) {
  if constexpr (kOff > 0) {
    const bool upper = (lane & kOff) != 0;
#pragma unroll
    for (int r = 0; r < kOff; ++r) {
      const T send = upper ? v[r] : v[r + kOff];
      const T keep = upper ? v[r + kOff] : v[r];
      v[r] = keep + __shfl_xor_sync(0xffffffffu, send, kOff);
    }
    reduce_scatter_step<kOff / 2>(v, lane);
  }
}

// (Compile-time offsets, so that v stays in registers.)
template <typename T> __device__ __forceinline__ T reduce_scatter32(T (&v)[32]) {
  reduce_scatter_step<16>(v, static_cast<int>(threadIdx.x & 31));
  return v[0];
}

// ------------------------------------------------------------------ phase 1
// S[p, j] = sum_c coef[p, c] x[c, i0 + j] for the ranks p in [p0, min(p0 + KP, P)) and every
// j < kTile (x taken as 0 for j >= ni), then fin(p, j, S[p, j]) once per (p < P, j < kTile).
// coef: [P, C] scalar (wb, or grad_z of the sample); xb: x of the sample.
// Every thread of the block must call these.

// NC: thread (warp, lane) sums channels c = warp (mod kWarps) at position lane; the kWarps
// partials are summed in warp order through red [kWarps][KP][32]. Ends with a barrier.
template <int KP, typename scalar_t, typename acc_t, typename Fin>
__device__ __forceinline__ void phase1_nc(const scalar_t* __restrict__ xb,
                                          const scalar_t* __restrict__ coef, int64_t p0,
                                          int64_t P, int64_t C, int64_t n, int64_t i0, int ni,
                                          acc_t* red, Fin fin) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const bool valid = lane < ni;
  acc_t acc[KP];
#pragma unroll
  for (int k = 0; k < KP; ++k) acc[k] = 0;
  int64_t c = warp;
  // kUnrollC rows per step: their loads are all in flight before the FMAs.
  for (; c + (kUnrollC - 1) * kWarps < C; c += kUnrollC * kWarps) {
    acc_t xv[kUnrollC];
#pragma unroll
    for (int u = 0; u < kUnrollC; ++u)
      xv[u] = valid ? to_acc(xb[(c + u * kWarps) * n + i0 + lane]) : acc_t(0);
#pragma unroll
    for (int u = 0; u < kUnrollC; ++u) {
#pragma unroll
      for (int k = 0; k < KP; ++k)
        if (p0 + k < P) acc[k] += to_acc(coef[(p0 + k) * C + c + u * kWarps]) * xv[u];
    }
  }
  for (; c < C; c += kWarps) {
    const acc_t xv = valid ? to_acc(xb[c * n + i0 + lane]) : acc_t(0);
#pragma unroll
    for (int k = 0; k < KP; ++k)
      if (p0 + k < P) acc[k] += to_acc(coef[(p0 + k) * C + c]) * xv;
  }
#pragma unroll
  for (int k = 0; k < KP; ++k) red[(warp * KP + k) * 32 + lane] = acc[k];
  __syncthreads();
  if (threadIdx.x < KP * 32) {
    const int k = threadIdx.x >> 5;
    const int j = threadIdx.x & 31;
    if (p0 + k < P) {
      acc_t s = red[k * 32 + j];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) s += red[(w * KP + k) * 32 + j];
      fin(p0 + k, j, s);
    }
  }
  __syncthreads();  // red is rewritten by the next chunk
}

// CL: warp w owns positions j = w * kPosPerWarp + r, lanes sum channels c = lane (mod 32);
// one warp butterfly per (p, j) at the end. No barrier.
template <int KP, typename scalar_t, typename Fin>
__device__ __forceinline__ void phase1_cl(const scalar_t* __restrict__ xb,
                                          const scalar_t* __restrict__ coef, int64_t p0,
                                          int64_t P, int64_t C, int64_t i0, int ni, Fin fin) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int j0 = warp * kPosPerWarp;
  acc_t acc[KP][kPosPerWarp];
#pragma unroll
  for (int k = 0; k < KP; ++k) {
#pragma unroll
    for (int r = 0; r < kPosPerWarp; ++r) acc[k][r] = 0;
  }
#pragma unroll 2
  for (int64_t c = lane; c < C; c += 32) {
    acc_t xv[kPosPerWarp];
#pragma unroll
    for (int r = 0; r < kPosPerWarp; ++r)
      xv[r] = j0 + r < ni ? to_acc(xb[(i0 + j0 + r) * C + c]) : acc_t(0);
#pragma unroll
    for (int k = 0; k < KP; ++k) {
      const acc_t w = p0 + k < P ? to_acc(coef[(p0 + k) * C + c]) : acc_t(0);
#pragma unroll
      for (int r = 0; r < kPosPerWarp; ++r) acc[k][r] += w * xv[r];
    }
  }
#pragma unroll
  for (int k = 0; k < KP; ++k) {
#pragma unroll
    for (int r = 0; r < kPosPerWarp; ++r) {
      const acc_t s = warp_sum(acc[k][r]);
      if (lane == k * kPosPerWarp + r && p0 + k < P) fin(p0 + k, j0 + r, s);
    }
  }
}

template <int KP, bool kCL, typename scalar_t, typename acc_t, typename Fin>
__device__ __forceinline__ void phase1(const scalar_t* __restrict__ xb,
                                       const scalar_t* __restrict__ coef, int64_t P, int64_t C,
                                       int64_t n, int64_t i0, int ni, acc_t* red, Fin fin) {
  for (int64_t p0 = 0; p0 < P; p0 += KP) {
    if constexpr (kCL) {
      phase1_cl<KP>(xb, coef, p0, P, C, i0, ni, fin);
    } else {
      phase1_nc<KP>(xb, coef, p0, P, C, n, i0, ni, red, fin);
    }
  }
  __syncthreads();  // the tile written by fin is read by every thread from here on
}

// ------------------------------------------------------------------ phase 2 (x^T products)
// NC: out(p, c, sum_j wt[p, j] x[c, i0 + j]) for every p < P, c < C. wt: [P][kTile] opmath,
// 0 at j >= ni. Warp w takes groups of 32 channel rows g = G-1-w, G-1-w-kWarps, ... (reverse
// order: phase 1 read the high channels last). Every thread of the block must call it.
template <typename scalar_t, typename acc_t, typename Out>
__device__ __forceinline__ void phase2_nc(const scalar_t* __restrict__ xb, const acc_t* wt,
                                          int64_t P, int64_t C, int64_t n, int64_t i0, int ni,
                                          Out out) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const bool valid = lane < ni;
  for (int64_t g = divup(C, 32) - 1 - warp; g >= 0; g -= kWarps) {  // warp-uniform
    const int64_t c0 = g * 32;
    acc_t xr[32];
#pragma unroll
    for (int r = 0; r < 32; ++r)
      xr[r] = valid && c0 + r < C ? to_acc(xb[(c0 + r) * n + i0 + lane]) : acc_t(0);
    for (int64_t p = 0; p < P; ++p) {
      const acc_t wl = wt[p * kTile + lane];
      acc_t v[32];
#pragma unroll
      for (int r = 0; r < 32; ++r) v[r] = wl * xr[r];
      const acc_t s = reduce_scatter32(v);  // row c0 + lane
      if (c0 + lane < C) out(p, c0 + lane, s);
    }
  }
}

// ------------------------------------------------------------------ forward
// Grid-strided over units = b * tiles + t. Dynamic smem: h tile [P][kTile] opmath when
// staged, else the unit's slice of hbuf. zpart [B * tiles, P, C] when tiles > 1.
// kGivenH (weighted_pool): no phase 1; the h tile is read from h_in (x's dtype, [B, P, n]),
// and wb, bb, h are unused (pass nullptr).
template <typename scalar_t, int KP, bool kCL, bool kGivenH = false>
__global__ void __launch_bounds__(kThreads)
attentional_pooling_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ wb,
                       const scalar_t* __restrict__ bb, scalar_t* __restrict__ z,
                       scalar_t* __restrict__ h, typename OpMath<scalar_t>::type* __restrict__ zpart,
                       typename OpMath<scalar_t>::type* hbuf, int64_t B, int64_t C, int64_t n,
                       int64_t P, int64_t tile_len, int64_t tiles, bool staged,
                       const scalar_t* __restrict__ h_in = nullptr) {
  using acc_t = typename OpMath<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t red[kCL || kGivenH ? 1 : kWarps * KP * 32];
  const acc_t nf = static_cast<acc_t>(n);

  for (int64_t unit = blockIdx.x; unit < B * tiles; unit += gridDim.x) {
    const int64_t b = unit / tiles;
    const int64_t i0 = (unit - b * tiles) * tile_len;
    const int ni = static_cast<int>(imin(tile_len, n - i0));
    acc_t* ht = staged ? reinterpret_cast<acc_t*>(smem_raw) : hbuf + unit * P * kTile;
    const scalar_t* xb = x + b * C * n;

    if constexpr (kGivenH) {
      // The given h tile in opmath, 0 past the tile (it meets x's zeros).
      for (int64_t e = threadIdx.x; e < P * kTile; e += kThreads) {
        const int64_t p = e / kTile;
        const int j = static_cast<int>(e - p * kTile);
        ht[e] = j < ni ? to_acc(h_in[(b * P + p) * n + i0 + j]) : acc_t(0);
      }
      __syncthreads();
      (void)red;
    } else {
      // Phase 1: h = wb x + bb. Positions past the tile are 0 in ht (they meet x's zeros).
      auto fin = [&](int64_t p, int j, acc_t s) {
        const acc_t hv = s + to_acc(bb[p]);
        ht[p * kTile + j] = j < ni ? hv : acc_t(0);
        if (j < ni) store(h + (b * P + p) * n + i0 + j, hv);
      };
      phase1<KP, kCL>(xb, wb, P, C, n, i0, ni, red, fin);
    }

    // Phase 2: z (partial) = h x^T over the tile, with the opmath h.
    auto out = [&](int64_t p, int64_t c, acc_t s) {
      if (tiles == 1) {
        store(z + (b * P + p) * C + c, s / nf);
      } else {
        zpart[(unit * P + p) * C + c] = s;
      }
    };
    if constexpr (kCL) {
      for (int64_t m = divup(C, kThreads) - 1; m >= 0; --m) {  // reverse channel order
        const int64_t c = m * kThreads + threadIdx.x;
        if (c >= C) continue;
        acc_t xr[kTile];
#pragma unroll
        for (int j = 0; j < kTile; ++j)
          xr[j] = j < ni ? to_acc(xb[(i0 + j) * C + c]) : acc_t(0);
        for (int64_t p = 0; p < P; ++p) {
          const acc_t* hp = ht + p * kTile;
          acc_t s = 0;
#pragma unroll
          for (int j = 0; j < kTile; ++j) s += hp[j] * xr[j];
          out(p, c, s);
        }
      }
    } else {
      phase2_nc(xb, static_cast<const acc_t*>(ht), P, C, n, i0, ni, out);
    }
    __syncthreads();  // the next unit rewrites ht
  }
}

// z[b, p, c] = (sum over the tiles of zpart[b, t, p, c], in tile order) / n.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
attentional_pooling_finish_z_kernel(const typename OpMath<scalar_t>::type* __restrict__ zpart,
                        scalar_t* __restrict__ z, int64_t B, int64_t PC, int64_t tiles,
                        int64_t n) {
  using acc_t = typename OpMath<scalar_t>::type;
  const acc_t nf = static_cast<acc_t>(n);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < B * PC;
       e += stride) {
    const int64_t b = e / PC;
    const acc_t* src = zpart + b * tiles * PC + (e - b * PC);
    acc_t s = src[0];
    for (int64_t t = 1; t < tiles; ++t) s += src[t * PC];
    store(z + e, s / nf);
  }
}

// ------------------------------------------------------------------ backward
// Grid-strided over units = b * tiles + t. Dynamic smem: h tile and dh tile [P][kTile]
// opmath each when staged, else the unit's slice of tbuf (2 * P * kTile).
template <typename scalar_t, int KP, bool kCL>
__global__ void __launch_bounds__(kThreads)
attentional_pooling_backward_kernel(const scalar_t* __restrict__ grad_z,
                        const typename OpMath<scalar_t>::type* __restrict__ grad_h,
                        const scalar_t* __restrict__ x, const scalar_t* __restrict__ h,
                        const scalar_t* __restrict__ wb, scalar_t* __restrict__ grad_x,
                        typename OpMath<scalar_t>::type* __restrict__ wb_part,
                        typename OpMath<scalar_t>::type* __restrict__ bb_part,
                        typename OpMath<scalar_t>::type* tbuf, int64_t B, int64_t C, int64_t n,
                        int64_t P, int64_t tile_len, int64_t tiles, bool staged) {
  using acc_t = typename OpMath<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t red[kCL ? 1 : kWarps * KP * 32];
  const acc_t nf = static_cast<acc_t>(n);
  const int tid = threadIdx.x;

  for (int64_t unit = blockIdx.x; unit < B * tiles; unit += gridDim.x) {
    const int64_t b = unit / tiles;
    const int64_t i0 = (unit - b * tiles) * tile_len;
    const int ni = static_cast<int>(imin(tile_len, n - i0));
    acc_t* ht = staged ? reinterpret_cast<acc_t*>(smem_raw) : tbuf + unit * 2 * P * kTile;
    acc_t* dht = ht + P * kTile;
    const scalar_t* xb = x + b * C * n;
    const scalar_t* gzb = grad_z + b * P * C;

    // The stored h tile (x's dtype, as autograd of the reference uses it), 0 past the tile.
    for (int64_t e = tid; e < P * kTile; e += kThreads) {
      const int64_t p = e / kTile;
      const int j = static_cast<int>(e - p * kTile);
      ht[e] = j < ni ? to_acc(h[(b * P + p) * n + i0 + j]) : acc_t(0);
    }
    // Phase 1: dh = grad_h + (grad_z x) / n, 0 past the tile. (phase1 ends with a barrier.)
    auto fin = [&](int64_t p, int j, acc_t s) {
      dht[p * kTile + j] = j < ni ? to_acc(grad_h[(b * P + p) * n + i0 + j]) + s / nf : acc_t(0);
    };
    phase1<KP, kCL>(xb, gzb, P, C, n, i0, ni, red, fin);

    // grad_bb partial of the unit: sum over the tile's positions, in order.
    for (int64_t p = tid; p < P; p += kThreads) {
      const acc_t* dp = dht + p * kTile;
      acc_t s = 0;
      for (int j = 0; j < ni; ++j) s += dp[j];
      bb_part[unit * P + p] = s;
    }

    acc_t* wbp = wb_part + unit * P * C;
    scalar_t* gxb = grad_x + b * C * n;
    if constexpr (kCL) {
      // Phase 2, thread per channel: grad_wb partial = dh x^T, and the channel's grad_x
      // column over the tile, grad_x = sum_p (grad_z / n) h + wb dh.
      for (int64_t m = divup(C, kThreads) - 1; m >= 0; --m) {  // reverse channel order
        const int64_t c = m * kThreads + tid;
        if (c >= C) continue;
        acc_t xr[kTile];
        acc_t gx[kTile];
#pragma unroll
        for (int j = 0; j < kTile; ++j) {
          xr[j] = j < ni ? to_acc(xb[(i0 + j) * C + c]) : acc_t(0);
          gx[j] = 0;
        }
        for (int64_t p = 0; p < P; ++p) {
          const acc_t* hp = ht + p * kTile;
          const acc_t* dp = dht + p * kTile;
          const acc_t a = to_acc(gzb[p * C + c]) / nf;
          const acc_t w = to_acc(wb[p * C + c]);
          acc_t s = 0;
#pragma unroll
          for (int j = 0; j < kTile; ++j) {
            s += dp[j] * xr[j];
            gx[j] += a * hp[j] + w * dp[j];
          }
          wbp[p * C + c] = s;
        }
#pragma unroll
        for (int j = 0; j < kTile; ++j)
          if (j < ni) store(gxb + (i0 + j) * C + c, gx[j]);
      }
    } else {
      // Phase 2: grad_wb partial = dh x^T.
      auto out = [&](int64_t p, int64_t c, acc_t s) { wbp[p * C + c] = s; };
      phase2_nc(xb, static_cast<const acc_t*>(dht), P, C, n, i0, ni, out);
      // Phase 3 (no x): grad_x rows, one channel per warp iteration, lane <-> position.
      const int lane = tid & 31;
      if (lane < ni) {
        for (int64_t c = tid >> 5; c < C; c += kWarps) {
          acc_t s = 0;
          for (int64_t p = 0; p < P; ++p)
            s += (to_acc(gzb[p * C + c]) / nf) * ht[p * kTile + lane] +
                 to_acc(wb[p * C + c]) * dht[p * kTile + lane];
          store(gxb + c * n + i0 + lane, s);
        }
      }
    }
    __syncthreads();  // the next unit rewrites ht / dht
  }
}

// ------------------------------------------------------------------ weighted_pool backward
// The attentional-pool backward without wb: per unit (b, tile),
//   phase 1: grad_h[p, tile] = (grad_z x_tile) / n, stored straight to grad_h (x's dtype);
//   grad_x tile = (grad_z / n)^T h (needs no x), written once.
// Grid-strided over units = b * tiles + t. Dynamic smem: the h tile [P][kTile] opmath when
// staged, else the unit's slice of tbuf (P * kTile).
template <typename scalar_t, int KP, bool kCL>
__global__ void __launch_bounds__(kThreads)
weighted_pool_backward_kernel(const scalar_t* __restrict__ grad_z, const scalar_t* __restrict__ x,
                      const scalar_t* __restrict__ h, scalar_t* __restrict__ grad_x,
                      scalar_t* __restrict__ grad_h, typename OpMath<scalar_t>::type* tbuf,
                      int64_t B, int64_t C, int64_t n, int64_t P, int64_t tile_len,
                      int64_t tiles, bool staged) {
  using acc_t = typename OpMath<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t red[kCL ? 1 : kWarps * KP * 32];
  const acc_t nf = static_cast<acc_t>(n);
  const int tid = threadIdx.x;

  for (int64_t unit = blockIdx.x; unit < B * tiles; unit += gridDim.x) {
    const int64_t b = unit / tiles;
    const int64_t i0 = (unit - b * tiles) * tile_len;
    const int ni = static_cast<int>(imin(tile_len, n - i0));
    acc_t* ht = staged ? reinterpret_cast<acc_t*>(smem_raw) : tbuf + unit * P * kTile;
    const scalar_t* xb = x + b * C * n;
    const scalar_t* gzb = grad_z + b * P * C;

    // The h tile in opmath, 0 past the tile. (Made visible by phase 1's barriers.)
    for (int64_t e = tid; e < P * kTile; e += kThreads) {
      const int64_t p = e / kTile;
      const int j = static_cast<int>(e - p * kTile);
      ht[e] = j < ni ? to_acc(h[(b * P + p) * n + i0 + j]) : acc_t(0);
    }
    // Phase 1: grad_h = (grad_z x) / n over the tile's positions. (phase1 ends with a barrier.)
    auto fin = [&](int64_t p, int j, acc_t s) {
      if (j < ni) store(grad_h + (b * P + p) * n + i0 + j, s / nf);
    };
    phase1<KP, kCL>(xb, gzb, P, C, n, i0, ni, red, fin);

    scalar_t* gxb = grad_x + b * C * n;
    if constexpr (kCL) {
      // Thread per channel: the channel's grad_x column over the tile, stores along C.
      for (int64_t m = divup(C, kThreads) - 1; m >= 0; --m) {
        const int64_t c = m * kThreads + tid;
        if (c >= C) continue;
        acc_t gx[kTile];
#pragma unroll
        for (int j = 0; j < kTile; ++j) gx[j] = 0;
        for (int64_t p = 0; p < P; ++p) {
          const acc_t* hp = ht + p * kTile;
          const acc_t a = to_acc(gzb[p * C + c]) / nf;
#pragma unroll
          for (int j = 0; j < kTile; ++j) gx[j] += a * hp[j];
        }
#pragma unroll
        for (int j = 0; j < kTile; ++j)
          if (j < ni) store(gxb + (i0 + j) * C + c, gx[j]);
      }
    } else {
      // grad_x rows, one channel per warp iteration, lane <-> position.
      const int lane = tid & 31;
      if (lane < ni) {
        for (int64_t c = tid >> 5; c < C; c += kWarps) {
          acc_t s = 0;
          for (int64_t p = 0; p < P; ++p)
            s += (to_acc(gzb[p * C + c]) / nf) * ht[p * kTile + lane];
          store(gxb + c * n + i0 + lane, s);
        }
      }
    }
    __syncthreads();  // the next unit rewrites ht
  }
}

// ------------------------------------------------------------------ launchers
// Bytes of the per-unit tiles: h (forward) or h and dh (backward).
size_t tile_bytes(size_t acc_bytes, int64_t P, int tiles_per_unit) {
  return static_cast<size_t>(P) * kTile * tiles_per_unit * acc_bytes;
}

bool staged_in_smem(size_t acc_bytes, int64_t P, int tiles_per_unit) {
  return P <= static_cast<int64_t>(kMaxDynSmem) &&  // (no size_t overflow below)
         tile_bytes(acc_bytes, P, tiles_per_unit) <= kMaxDynSmem;
}

int64_t num_tiles(int64_t n) { return n < 1 ? 0 : divup(n, tile_len_of(n)); }

int64_t forward_zpart_elems(int64_t B, int64_t C, int64_t n, int64_t P) {
  const int64_t tiles = num_tiles(n);
  return tiles > 1 ? B * tiles * P * C : 0;
}

int64_t forward_ws_elems(size_t acc_bytes, int64_t B, int64_t C, int64_t n, int64_t P) {
  return forward_zpart_elems(B, C, n, P) +
         (staged_in_smem(acc_bytes, P, 1) ? 0 : B * num_tiles(n) * P * kTile);
}

int64_t backward_ws_elems(size_t acc_bytes, int64_t B, int64_t n, int64_t P) {
  return staged_in_smem(acc_bytes, P, 2) ? 0 : B * num_tiles(n) * 2 * P * kTile;
}

bool valid_sizes(int64_t B, int64_t C, int64_t n, int64_t P) {
  return B >= 1 && C >= 1 && n >= 1 && P >= 1;
}

// Ranks per phase-1 pass: P itself up to 2, else chunks of 4.
int ranks_per_pass(int64_t P) { return P <= 1 ? 1 : (P <= 2 ? 2 : 4); }

// f(cl) with channels_last as a compile-time bool (std::true_type / std::false_type).
template <typename F> void dispatch_cl(bool channels_last, F&& f) {
  if (channels_last) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// f(kp, cl) with KP = ranks_per_pass(P) (1, 2 or 4) and channels_last as compile-time
// constants (std::integral_constant): the kernel instantiations every launcher picks from.
template <typename F> void dispatch_kp_cl(int64_t P, bool channels_last, F&& f) {
  const int kp = ranks_per_pass(P);
  dispatch_cl(channels_last, [&](auto cl) {
    if (kp == 1) f(std::integral_constant<int, 1>{}, cl);
    else if (kp == 2) f(std::integral_constant<int, 2>{}, cl);
    else f(std::integral_constant<int, 4>{}, cl);
  });
}

// Forward of the attentional pool and of weighted_pool: checks the workspace, splits it into
// the z partials and the h staging (nullptr when staged in shared memory), enqueues the
// per-tile kernel with launch_tiles(zpart, hbuf, tiles, staged), then, when n spans several
// tiles, finish_z over the partials.
template <typename scalar_t, typename LaunchTiles>
cudaError_t run_forward(void* z, void* workspace, int64_t B, int64_t C, int64_t n, int64_t P,
                        cudaStream_t stream, LaunchTiles&& launch_tiles) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t tiles = num_tiles(n);
  const bool staged = staged_in_smem(sizeof(acc_t), P, 1);
  if (forward_ws_elems(sizeof(acc_t), B, C, n, P) > 0 && workspace == nullptr)
    return cudaErrorInvalidValue;
  acc_t* zpart = static_cast<acc_t*>(workspace);
  acc_t* hbuf = staged ? nullptr : zpart + forward_zpart_elems(B, C, n, P);
  launch_tiles(zpart, hbuf, tiles, staged);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || tiles == 1) return err;
  const int64_t total = B * P * C;
  attentional_pooling_finish_z_kernel<scalar_t><<<grid_x(divup(total, kThreads)), kThreads, 0, stream>>>(
      zpart, static_cast<scalar_t*>(z), B, P * C, tiles, n);
  return cudaGetLastError();
}

template <typename scalar_t, int KP, bool kCL>
void launch_forward(const void* x, const void* wb, const void* bb, void* z, void* h, void* zpart,
                    void* hbuf, int64_t B, int64_t C, int64_t n, int64_t P, int64_t tiles,
                    bool staged, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const size_t smem = staged ? tile_bytes(sizeof(acc_t), P, 1) : 0;
  attentional_pooling_forward_kernel<scalar_t, KP, kCL><<<grid_x(B * tiles), kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(wb),
      static_cast<const scalar_t*>(bb), static_cast<scalar_t*>(z), static_cast<scalar_t*>(h),
      static_cast<acc_t*>(zpart), static_cast<acc_t*>(hbuf), B, C, n, P, tile_len_of(n), tiles,
      staged);
}

template <typename scalar_t>
cudaError_t forward_impl(const void* x, bool channels_last, const void* wb, const void* bb,
                         void* z, void* h, void* workspace, int64_t B, int64_t C, int64_t n,
                         int64_t P, cudaStream_t stream) {
  return run_forward<scalar_t>(
      z, workspace, B, C, n, P, stream, [&](void* zpart, void* hbuf, int64_t tiles, bool staged) {
        dispatch_kp_cl(P, channels_last, [&](auto kp, auto cl) {
          launch_forward<scalar_t, decltype(kp)::value, decltype(cl)::value>(
              x, wb, bb, z, h, zpart, hbuf, B, C, n, P, tiles, staged, stream);
        });
      });
}

template <typename scalar_t, int KP, bool kCL>
void launch_backward(const void* grad_z, const void* grad_h, const void* x, const void* h,
                     const void* wb, void* grad_x, void* wb_part, void* bb_part, void* tbuf,
                     int64_t B, int64_t C, int64_t n, int64_t P, int64_t tiles, bool staged,
                     cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const size_t smem = staged ? tile_bytes(sizeof(acc_t), P, 2) : 0;
  attentional_pooling_backward_kernel<scalar_t, KP, kCL><<<grid_x(B * tiles), kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(grad_z), static_cast<const acc_t*>(grad_h),
      static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(h),
      static_cast<const scalar_t*>(wb), static_cast<scalar_t*>(grad_x),
      static_cast<acc_t*>(wb_part), static_cast<acc_t*>(bb_part), static_cast<acc_t*>(tbuf), B,
      C, n, P, tile_len_of(n), tiles, staged);
}

template <typename scalar_t>
cudaError_t backward_impl(const void* grad_z, const void* grad_h, const void* x,
                          bool channels_last, const void* h, const void* wb, void* grad_x,
                          void* wb_part, void* bb_part, void* workspace, int64_t B, int64_t C,
                          int64_t n, int64_t P, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t tiles = num_tiles(n);
  const bool staged = staged_in_smem(sizeof(acc_t), P, 2);
  if (!staged && workspace == nullptr) return cudaErrorInvalidValue;
  dispatch_kp_cl(P, channels_last, [&](auto kp, auto cl) {
    launch_backward<scalar_t, decltype(kp)::value, decltype(cl)::value>(
        grad_z, grad_h, x, h, wb, grad_x, wb_part, bb_part, workspace, B, C, n, P, tiles, staged,
        stream);
  });
  return cudaGetLastError();
}

// weighted_pool: the forward kernel with the h tile given (KP unused: no phase 1).
template <typename scalar_t, bool kCL>
void launch_weighted_pool_forward(const void* x, const void* h, void* z, void* zpart, void* hbuf,
                          int64_t B, int64_t C, int64_t n, int64_t P, int64_t tiles, bool staged,
                          cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const size_t smem = staged ? tile_bytes(sizeof(acc_t), P, 1) : 0;
  attentional_pooling_forward_kernel<scalar_t, 1, kCL, true><<<grid_x(B * tiles), kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(x), nullptr, nullptr, static_cast<scalar_t*>(z), nullptr,
      static_cast<acc_t*>(zpart), static_cast<acc_t*>(hbuf), B, C, n, P, tile_len_of(n), tiles,
      staged, static_cast<const scalar_t*>(h));
}

template <typename scalar_t>
cudaError_t weighted_pool_forward_impl(const void* x, bool channels_last, const void* h, void* z,
                               void* workspace, int64_t B, int64_t C, int64_t n, int64_t P,
                               cudaStream_t stream) {
  return run_forward<scalar_t>(
      z, workspace, B, C, n, P, stream, [&](void* zpart, void* hbuf, int64_t tiles, bool staged) {
        dispatch_cl(channels_last, [&](auto cl) {
          launch_weighted_pool_forward<scalar_t, decltype(cl)::value>(x, h, z, zpart, hbuf, B, C, n, P,
                                                              tiles, staged, stream);
        });
      });
}

int64_t weighted_pool_backward_ws_elems(size_t acc_bytes, int64_t B, int64_t n, int64_t P) {
  return staged_in_smem(acc_bytes, P, 1) ? 0 : B * num_tiles(n) * P * kTile;
}

template <typename scalar_t, int KP, bool kCL>
void launch_weighted_pool_backward(const void* grad_z, const void* x, const void* h, void* grad_x,
                           void* grad_h, void* tbuf, int64_t B, int64_t C, int64_t n, int64_t P,
                           int64_t tiles, bool staged, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const size_t smem = staged ? tile_bytes(sizeof(acc_t), P, 1) : 0;
  weighted_pool_backward_kernel<scalar_t, KP, kCL><<<grid_x(B * tiles), kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(grad_z), static_cast<const scalar_t*>(x),
      static_cast<const scalar_t*>(h), static_cast<scalar_t*>(grad_x),
      static_cast<scalar_t*>(grad_h), static_cast<acc_t*>(tbuf), B, C, n, P, tile_len_of(n),
      tiles, staged);
}

template <typename scalar_t>
cudaError_t weighted_pool_backward_impl(const void* grad_z, const void* x, bool channels_last,
                                const void* h, void* grad_x, void* grad_h, void* workspace,
                                int64_t B, int64_t C, int64_t n, int64_t P, cudaStream_t stream) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t tiles = num_tiles(n);
  const bool staged = staged_in_smem(sizeof(acc_t), P, 1);
  if (!staged && workspace == nullptr) return cudaErrorInvalidValue;
  dispatch_kp_cl(P, channels_last, [&](auto kp, auto cl) {
    launch_weighted_pool_backward<scalar_t, decltype(kp)::value, decltype(cl)::value>(
        grad_z, x, h, grad_x, grad_h, workspace, B, C, n, P, tiles, staged, stream);
  });
  return cudaGetLastError();
}

}  // namespace

int64_t attentional_pooling_num_tiles(int64_t n) { return num_tiles(n); }

int64_t attentional_pooling_forward_workspace_elems(DType dtype, int64_t B, int64_t C, int64_t n, int64_t P) {
  if (!valid_sizes(B, C, n, P)) return 0;
  return forward_ws_elems(opmath_bytes(dtype), B, C, n, P);
}

int64_t attentional_pooling_backward_workspace_elems(DType dtype, int64_t B, int64_t C, int64_t n, int64_t P) {
  if (!valid_sizes(B, C, n, P)) return 0;
  return backward_ws_elems(opmath_bytes(dtype), B, n, P);
}

cudaError_t attentional_pooling_forward_launch(DType dtype, const void* x, bool channels_last, const void* wb,
                                   const void* bb, void* z, void* h, void* workspace, int64_t B,
                                   int64_t C, int64_t n, int64_t P, cudaStream_t stream) {
  if (!valid_sizes(B, C, n, P)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return forward_impl<typename decltype(tag)::type>(x, channels_last, wb, bb, z, h, workspace,
                                                      B, C, n, P, stream);
  });
}

cudaError_t attentional_pooling_backward_launch(DType dtype, const void* grad_z, const void* grad_h,
                                    const void* x, bool channels_last, const void* h,
                                    const void* wb, void* grad_x, void* grad_wb_partial,
                                    void* grad_bb_partial, void* workspace, int64_t B, int64_t C,
                                    int64_t n, int64_t P, cudaStream_t stream) {
  if (!valid_sizes(B, C, n, P)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return backward_impl<typename decltype(tag)::type>(grad_z, grad_h, x, channels_last, h, wb,
                                                       grad_x, grad_wb_partial, grad_bb_partial,
                                                       workspace, B, C, n, P, stream);
  });
}

int64_t weighted_pool_forward_workspace_elems(DType dtype, int64_t B, int64_t C, int64_t n, int64_t P) {
  // Same workspace as the attentional pool's forward.
  return attentional_pooling_forward_workspace_elems(dtype, B, C, n, P);
}

int64_t weighted_pool_backward_workspace_elems(DType dtype, int64_t B, int64_t C, int64_t n, int64_t P) {
  if (!valid_sizes(B, C, n, P)) return 0;
  return weighted_pool_backward_ws_elems(opmath_bytes(dtype), B, n, P);
}

cudaError_t weighted_pool_forward_launch(DType dtype, const void* x, bool channels_last, const void* h,
                                 void* z, void* workspace, int64_t B, int64_t C, int64_t n,
                                 int64_t P, cudaStream_t stream) {
  if (!valid_sizes(B, C, n, P)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return weighted_pool_forward_impl<typename decltype(tag)::type>(x, channels_last, h, z, workspace, B,
                                                            C, n, P, stream);
  });
}

cudaError_t weighted_pool_backward_launch(DType dtype, const void* grad_z, const void* x,
                                  bool channels_last, const void* h, void* grad_x, void* grad_h,
                                  void* workspace, int64_t B, int64_t C, int64_t n, int64_t P,
                                  cudaStream_t stream) {
  if (!valid_sizes(B, C, n, P)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    return weighted_pool_backward_impl<typename decltype(tag)::type>(grad_z, x, channels_last, h, grad_x,
                                                             grad_h, workspace, B, C, n, P,
                                                             stream);
  });
}

}  // namespace attentional_pooling_cuda
}  // namespace attnpool
