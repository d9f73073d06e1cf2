// Fused CPU kernels of interaction-aware pyramid attention (our formulation of Du et al.,
// ECCV 2018; docs/design.md "Pyramid attention", spec: attnpool.reference.pyramid_attention;
// contract in attnpool.h).
//
// Forward, two parallel passes:
//   pool   every frame plane of every level averaged to the common Ho x Wo grid (torch's
//          adaptive windows), read once, rows summed first so the inner loop runs over
//          contiguous W -> pooled [B, Ctot, n] (opmath). The only pass over the inputs.
//   head   over the pooled maps only: scores y_s, the fused softmax a, out, the unit maps
//          yh_s, the PCA term u_s and the level Gram matrix -> loss_b; in phases over runs
//          of channels (head_chunks), so that B=1 uses every thread.
// Backward, two passes:
//   head   the gradient gy_s of every level's scores, per-sample partials of grad_weights /
//          grad_bias, and the three rank-1 factors of dP_s = gz (x) a + w (x) gy_s +
//          kappa_s u_s (x) (yh_s - sig_s/n); in phases like the forward's.
//   unpool grad_x = R^T dP, dP formed on the fly per plane: each input row is written once.
// Work is split into tasks of about kTaskElems input elements (a run of channel planes of
// one level and frame), so levels of very different sizes still balance across threads.
// Everything accumulates in opmath (float, or double for double); every sum has a fixed
// order set by the shapes alone, so results are bitwise reproducible.
#include "attnpool.h"
#include "cpu/isa.h"
#include "cpu/loops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace attnpool {
namespace {

constexpr int64_t kTaskElems = 1 << 15;
constexpr int64_t kCols = 16;  // columns of a pooling step

// torch's adaptive pooling window of output o of `out` over `in`: [start, end).
int64_t win_start(int64_t o, int64_t in, int64_t out) { return (o * in) / out; }
int64_t win_end(int64_t o, int64_t in, int64_t out) { return ((o + 1) * in + out - 1) / out; }

struct Level {
  int64_t C, H, W, off;  // channels, input plane, channel offset in Ctot
  std::vector<int64_t> rs, re, cs, ce;    // output row / column windows
  std::vector<int64_t> hlo, hhi;  // output rows whose window holds input row h
  bool identity;                             // H x W is the common grid: R is the identity
};

struct Pyramid {
  int64_t B, T, S, Ho, Wo, n, Ctot;
  std::vector<Level> levels;
};

Pyramid make_pyramid(int64_t B, int64_t T, const std::vector<int64_t>& C,
                     const std::vector<int64_t>& hw) {
  Pyramid p;
  p.B = B;
  p.T = T;
  p.S = static_cast<int64_t>(C.size());
  p.Ho = hw[2 * (p.S - 1)];
  p.Wo = hw[2 * (p.S - 1) + 1];
  p.n = T * p.Ho * p.Wo;
  p.Ctot = 0;
  for (int64_t s = 0; s < p.S; ++s) {
    Level l;
    l.C = C[s];
    l.H = hw[2 * s];
    l.W = hw[2 * s + 1];
    l.off = p.Ctot;
    p.Ctot += l.C;
    auto windows = [](int64_t in, int64_t out, std::vector<int64_t>& st, std::vector<int64_t>& en,
                      std::vector<int64_t>* lo, std::vector<int64_t>* hi) {
      st.resize(out);
      en.resize(out);
      if (lo) lo->assign(in, out);
      if (hi) hi->assign(in, -1);
      for (int64_t o = 0; o < out; ++o) {
        st[o] = win_start(o, in, out);
        en[o] = win_end(o, in, out);
        for (int64_t k = st[o]; lo && k < en[o]; ++k) {
          (*lo)[k] = std::min((*lo)[k], o);
          (*hi)[k] = std::max((*hi)[k], o);
        }
      }
    };
    windows(l.H, p.Ho, l.rs, l.re, &l.hlo, &l.hhi);
    windows(l.W, p.Wo, l.cs, l.ce, nullptr, nullptr);
    l.identity = l.H == p.Ho && l.W == p.Wo;
    p.levels.push_back(std::move(l));
  }
  return p;
}

// A run of channel planes [c0, c1) of level s, sample b, frame t.
struct Task {
  int64_t b, s, t, c0, c1;
};

std::vector<Task> plane_tasks(const Pyramid& p) {
  std::vector<Task> tasks;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t s = 0; s < p.S; ++s) {
      const Level& l = p.levels[s];
      const int64_t step = std::max<int64_t>(1, kTaskElems / (l.H * l.W));
      for (int64_t t = 0; t < p.T; ++t)
        for (int64_t c = 0; c < l.C; c += step)
          tasks.push_back({b, s, t, c, std::min(l.C, c + step)});
    }
  return tasks;
}

// ------------------------------------------------------------------------- forward
// 1 / window size of every output cell of level l.
template <typename T>
C10_ALWAYS_INLINE std::vector<T> inverse_counts(const Pyramid& p, const Level& l) {
  std::vector<T> inv(p.Ho * p.Wo);
  for (int64_t oh = 0; oh < p.Ho; ++oh)
    for (int64_t ow = 0; ow < p.Wo; ++ow)
      inv[oh * p.Wo + ow] =
          T(1) / static_cast<T>((l.re[oh] - l.rs[oh]) * (l.ce[ow] - l.cs[ow]));
  return inv;
}

// The window rows r0..r1 of plane summed over kBlk columns from w0 (rows inner: the partial
// sums stay in registers).
template <int kBlk, typename T, typename scalar_t>
C10_ALWAYS_INLINE void column_sums(const scalar_t* plane, int64_t W, int64_t r0, int64_t r1,
                                   int64_t w0, T* part) {
  for (int j = 0; j < kBlk; ++j) part[j] = static_cast<T>(plane[r0 * W + w0 + j]);
  for (int64_t h = r0 + 1; h < r1; ++h)
    for (int j = 0; j < kBlk; ++j) part[j] += static_cast<T>(plane[h * W + w0 + j]);
}

// One output row of a level whose column windows are all kK wide (W = kK * Wo): blocks of
// kBlk columns hold whole windows, reduced straight from registers; a last block overlapping
// the previous one covers a W that kBlk does not divide (its windows are written twice, alike).
template <int kBlk, int kK, typename T, typename scalar_t>
C10_ALWAYS_INLINE void pool_row_uniform(const scalar_t* plane, int64_t W, int64_t r0, int64_t r1,
                                        const T* inv, T* dst) {
  auto block = [&](int64_t w0) ATTNPOOL_INLINE_LAMBDA {
    T part[kBlk];
    column_sums<kBlk>(plane, W, r0, r1, w0, part);
    for (int g = 0; g < kBlk / kK; ++g) {
      T sum = part[g * kK];
      for (int j = 1; j < kK; ++j) sum += part[g * kK + j];
      const int64_t ow = w0 / kK + g;
      dst[ow] = sum * inv[ow];
    }
  };
  int64_t w0 = 0;
  for (; w0 + kBlk <= W; w0 += kBlk) block(w0);
  if (w0 < W) block(W - kBlk);
}

// Any windows (overlapping, or narrower than the output): column sums into row, then each
// window's share of row.
template <typename T, typename scalar_t>
C10_ALWAYS_INLINE void pool_row_general(const Pyramid& p, const Level& l, const scalar_t* plane,
                                        int64_t r0, int64_t r1, const T* inv, T* row, T* dst) {
  const int64_t W = l.W;
  int64_t w0 = 0;
  for (; w0 + kCols <= W; w0 += kCols) column_sums<kCols>(plane, W, r0, r1, w0, row + w0);
  for (; w0 < W; ++w0) column_sums<1>(plane, W, r0, r1, w0, row + w0);
  for (int64_t ow = 0; ow < p.Wo; ++ow) {
    T sum = 0;
    for (int64_t w = l.cs[ow]; w < l.ce[ow]; ++w) sum += row[w];
    dst[ow] = sum * inv[ow];
  }
}

template <typename scalar_t>
C10_ALWAYS_INLINE void pool_task(const Pyramid& p, const Task& k, const scalar_t* x,
                                 at::opmath_type<scalar_t>* pooled) {
  using T = at::opmath_type<scalar_t>;
  const Level& l = p.levels[k.s];
  const int64_t H = l.H, W = l.W, HW = H * W, Wo = p.Wo, HoWo = p.Ho * Wo;
  const std::vector<T> inv = inverse_counts<T>(p, l);
  std::vector<T> row(W);
  const int64_t K = W % Wo == 0 ? W / Wo : 0;  // uniform column windows, K wide
  for (int64_t c = k.c0; c < k.c1; ++c) {
    const scalar_t* plane = x + ((k.b * p.T + k.t) * l.C + c) * HW;
    T* dst = pooled + (k.b * p.Ctot + l.off + c) * p.n + k.t * HoWo;
    if (l.identity) {
      for (int64_t i = 0; i < HW; ++i) dst[i] = static_cast<T>(plane[i]);
      continue;
    }
    for (int64_t oh = 0; oh < p.Ho; ++oh) {
      const int64_t r0 = l.rs[oh], r1 = l.re[oh];
      const T* iv = &inv[oh * Wo];
      T* d = dst + oh * Wo;
      if (W >= 16 && K == 8) pool_row_uniform<16, 8>(plane, W, r0, r1, iv, d);
      else if (W >= 16 && K == 4) pool_row_uniform<16, 4>(plane, W, r0, r1, iv, d);
      else if (W >= 16 && K == 2) pool_row_uniform<16, 2>(plane, W, r0, r1, iv, d);
      else if (W >= 16 && K == 1) pool_row_uniform<16, 1>(plane, W, r0, r1, iv, d);
      else if (W >= 8 && K == 2) pool_row_uniform<8, 2>(plane, W, r0, r1, iv, d);
      else if (W >= 8 && K == 1) pool_row_uniform<8, 1>(plane, W, r0, r1, iv, d);
      else pool_row_general(p, l, plane, r0, r1, iv, row.data(), d);
    }
  }
}

// Softmax of e [n] into a.
template <typename T>
C10_ALWAYS_INLINE void softmax(const T* e, int64_t n, T* a) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, e[i]);
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (a[i] = std::exp(e[i] - mx));
  for (int64_t i = 0; i < n; ++i) a[i] /= sum;
}

// Per-sample quantities both heads need, from pooled and y of sample b.
template <typename T>
struct Sample {
  std::vector<T> a, yh, r, d, sig, gram;  // [n], [S, n], [S], [S], [S], [S, S]; d = max(r, eps)
  C10_ALWAYS_INLINE Sample(const Pyramid& p, const T* y, double eps)
      : a(p.n), yh(p.S * p.n), r(p.S), d(p.S), sig(p.S), gram(p.S * p.S) {
    const int64_t n = p.n, S = p.S;
    std::vector<T> e(y, y + n);
    for (int64_t s = 1; s < S; ++s)
      for (int64_t i = 0; i < n; ++i) e[i] += y[s * n + i];
    softmax(e.data(), n, a.data());
    for (int64_t s = 0; s < S; ++s) {
      const T* ys = y + s * n;
      r[s] = std::sqrt(dot_short(n, ys, ys));
      d[s] = std::max(r[s], static_cast<T>(eps));
      T sg = 0;
      for (int64_t i = 0; i < n; ++i) sg += (yh[s * n + i] = ys[i] / d[s]);
      sig[s] = sg;
    }
    for (int64_t s = 0; s < S; ++s)
      for (int64_t q = 0; q < S; ++q) gram[s * S + q] = dot_short(n, &yh[s * n], &yh[q * n]);
  }
};

// Channel means mu[c] of the C rows of P [C, n].
template <typename T>
C10_ALWAYS_INLINE void row_means(const T* P, int64_t C, int64_t n, T* mu) {
  for (int64_t c = 0; c < C; ++c) mu[c] = sum_short(n, P + c * n) / static_cast<T>(n);
}

// u[c] = sum_i (P[c,i] - mu[c]) yh[i] = sum_i (P[c,i] - mu[c]) y[i] / d (yh = y / d), centred
// before the sum: maps with large channel means would otherwise lose the PCA term to
// cancellation in fp32.
template <typename T>
C10_ALWAYS_INLINE void pca_projection(const T* P, int64_t C, int64_t n, const T* y, T d,
                                      const T* mu, T* u) {
  std::vector<T> row(n);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < n; ++i) row[i] = P[c * n + i] - mu[c];
    u[c] = dot_short(n, row.data(), y) / d;  // with y and one division: yh's roundings stay out
  }
}

// The heads run over runs of at most kHeadChunk channels of one level ("chunks", fixed by the
// shapes alone): a sum over channels (the scores, and the backward's ga and gyh) is summed per
// chunk, then over the chunks in order. Batches under kHeadSplitBelow run each step over all
// items (b, chunk) in parallel, then the next, so that B=1 keeps every thread busy (a task per
// sample ran each head on one thread: 0.27 of the 0.8 ms of kernel time at B=1, fp32, the
// benchmark's pyramid); larger ones run all steps of a sample in one task, while its pooled
// maps stay in cache (by steps over the whole batch, B=8 was 10-15 % slower). The choice
// depends on B alone, so the results do not depend on the thread count; the two ways are
// compiled apart, so a sample's last bits may differ between batches of 3 and of 4.
// The per-sample quantities (Sample: softmax, norms, Gram matrix; a few S x n sums) are
// built once per sample outside the tasks.
constexpr int64_t kHeadChunk = 256;
constexpr int64_t kHeadSplitBelow = 4;

// Runs chunk_step(b, k) for every chunk k, then sample_step(b), then chunk_step2(b, k), for
// every sample b (see kHeadSplitBelow).
template <typename ChunkStep, typename SampleStep, typename ChunkStep2>
void head_steps(int64_t B, int64_t K, const ChunkStep& chunk_step, const SampleStep& sample_step,
                const ChunkStep2& chunk_step2) {
  if (B < kHeadSplitBelow) {
    parallel_run(B * K, Tasks([&](int64_t i) ATTNPOOL_INLINE_LAMBDA { chunk_step(i / K, i % K); }));
    parallel_run(B, Tasks([&](int64_t b) ATTNPOOL_INLINE_LAMBDA { sample_step(b); }));
    parallel_run(B * K, Tasks([&](int64_t i) ATTNPOOL_INLINE_LAMBDA { chunk_step2(i / K, i % K); }));
  } else {
    parallel_run(B, Tasks([&](int64_t b) ATTNPOOL_INLINE_LAMBDA {
      for (int64_t k = 0; k < K; ++k) chunk_step(b, k);
      sample_step(b);
      for (int64_t k = 0; k < K; ++k) chunk_step2(b, k);
    }));
  }
}

struct Chunk {
  int64_t s, c0, c1;  // level, channels [c0, c1) of Ctot
};

std::vector<Chunk> head_chunks(const Pyramid& p) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < p.S; ++s) {
    const Level& l = p.levels[s];
    for (int64_t c = 0; c < l.C; c += kHeadChunk)
      chunks.push_back({s, l.off + c, l.off + std::min(l.C, c + kHeadChunk)});
  }
  return chunks;
}

// dst[i] = the sum over the chunks of level s (of every level: s < 0) of part[k][i], in
// chunk order; 0 for a level without channels (the raw op does not reject one).
template <typename T>
C10_ALWAYS_INLINE void sum_chunks(const std::vector<Chunk>& chunks, int64_t s, const T* part,
                                  int64_t n, T* dst) {
  std::fill_n(dst, n, T(0));
  bool first = true;
  for (size_t k = 0; k < chunks.size(); ++k) {
    if (s >= 0 && chunks[k].s != s) continue;
    const T* src = part + k * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = first ? src[i] : dst[i] + src[i];
    first = false;
  }
}

// Channels [c0, c1) (of all levels) of sample b: their means mu and PCA terms u (unscaled).
template <typename T>
C10_ALWAYS_INLINE void head_channels(const Pyramid& p, int64_t b, int64_t c0, int64_t c1,
                                     const T* pooled, const T* y, const Sample<T>& sm, T* mu,
                                     T* u) {
  const int64_t n = p.n;
  const T* Pb = pooled + b * p.Ctot * n;
  for (int64_t s = 0; s < p.S; ++s) {
    const Level& l = p.levels[s];
    const int64_t lo = std::max(c0, l.off), hi = std::min(c1, l.off + l.C);
    if (lo >= hi) continue;
    row_means(Pb + lo * n, hi - lo, n, mu + b * p.Ctot + lo);
    pca_projection(Pb + lo * n, hi - lo, n, y + (b * p.S + s) * n, sm.d[s],
                   mu + b * p.Ctot + lo, u + b * p.Ctot + lo);
  }
}

// Forward head: the scores y (per chunk, then summed), then out, mu and u (channels), then
// the loss per sample. Returns the sum of the samples' losses, in order.
template <typename scalar_t>
at::opmath_type<scalar_t> head_forward(const Pyramid& p, const std::vector<const scalar_t*>& w,
                                       const scalar_t* bias, double eps, double lam,
                                       const at::opmath_type<scalar_t>* pooled,
                                       at::opmath_type<scalar_t>* y, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t n = p.n, S = p.S, Ct = p.Ctot;
  const std::vector<Chunk> chunks = head_chunks(p);
  const int64_t K = static_cast<int64_t>(chunks.size());
  std::vector<T> part(p.B * K * n), mu(p.B * Ct), u(p.B * Ct);
  std::vector<std::optional<Sample<T>>> samples(p.B);
  auto scores = [&](int64_t b, int64_t k) ATTNPOOL_INLINE_LAMBDA {
    const Chunk& ch = chunks[k];
    T* ps = part.data() + (b * K + k) * n;
    std::fill_n(ps, n, T(0));
    for (int64_t c = ch.c0; c < ch.c1; ++c) {
      const T wc = static_cast<T>(w[ch.s][c - p.levels[ch.s].off]);
      const T* row = pooled + (b * Ct + c) * n;
      for (int64_t i = 0; i < n; ++i) ps[i] += wc * row[i];
    }
  };
  auto sample = [&](int64_t b) ATTNPOOL_INLINE_LAMBDA {
    for (int64_t s = 0; s < S; ++s) {
      T* ys = y + (b * S + s) * n;
      sum_chunks(chunks, s, part.data() + b * K * n, n, ys);
      for (int64_t i = 0; i < n; ++i) ys[i] += static_cast<T>(bias[s]);
    }
    samples[b].emplace(p, y + b * S * n, eps);
  };
  auto channels = [&](int64_t b, int64_t k) ATTNPOOL_INLINE_LAMBDA {
    const Chunk& ch = chunks[k];
    const Sample<T>& sm = *samples[b];
    const T* Pb = pooled + b * Ct * n;
    for (int64_t c = ch.c0; c < ch.c1; ++c)
      out[b * Ct + c] = static_cast<scalar_t>(dot_short(n, Pb + c * n, sm.a.data()));
    head_channels(p, b, ch.c0, ch.c1, pooled, y, sm, mu.data(), u.data());
  };
  head_steps(p.B, K, scores, sample, channels);
  T total = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    const Sample<T>& sm = *samples[b];
    T variance = 0;
    for (int64_t s = 0; s < S; ++s) {
      const Level& l = p.levels[s];
      const T* us = u.data() + b * Ct + l.off;
      variance += dot_short(l.C, us, us) / static_cast<T>(l.C);
    }
    T overlap = 0;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t q = 0; q < S; ++q)
        if (q != s) overlap += sm.gram[s * S + q] * sm.gram[s * S + q];
    total += static_cast<T>(lam) * overlap - variance / static_cast<T>(S);
  }
  return total;
}

// ------------------------------------------------------------------------- backward
// The rank-1 factors of dP per sample: a [B, n], gy [B, S, n], yc [B, S, n] (yh - sig/n),
// gz [B, Ctot] (grad_out), ku [B, Ctot] (kappa_s u_s).
template <typename T>
struct Factors {
  std::vector<T> a, gy, yc, gz, ku;
};

// Backward head, in the phases of head_forward: mu and u (channels); the chunk sums of ga and
// gyh; gy and the factors (samples); grad_weights partials (channels).
template <typename scalar_t>
void head_backward(const Pyramid& p, double eps, double lam, double gl, const scalar_t* grad_out,
                   const at::opmath_type<scalar_t>* pooled, const at::opmath_type<scalar_t>* y,
                   Factors<at::opmath_type<scalar_t>>& f, at::opmath_type<scalar_t>* gw_part,
                   at::opmath_type<scalar_t>* gb_part) {
  using T = at::opmath_type<scalar_t>;
  const int64_t n = p.n, S = p.S, Ct = p.Ctot;
  const std::vector<Chunk> chunks = head_chunks(p);
  const int64_t K = static_cast<int64_t>(chunks.size());
  std::vector<T> mu(p.B * Ct), ga_part(p.B * K * n), gyh_part(p.B * K * n);
  std::vector<Sample<T>> samples;
  samples.reserve(p.B);
  for (int64_t b = 0; b < p.B; ++b) samples.emplace_back(p, y + b * S * n, eps);
  // Sums over channels use P - mu (centred rows): the softmax and the PCA term are blind to a
  // channel's mean, and fp32 would lose them to cancellation against large means.
  auto centred_sums = [&](int64_t b, int64_t k) ATTNPOOL_INLINE_LAMBDA {
    const Chunk& ch = chunks[k];
    const Sample<T>& sm = samples[b];
    for (int64_t c = ch.c0; c < ch.c1; ++c)
      f.gz[b * Ct + c] = static_cast<T>(grad_out[b * Ct + c]);
    head_channels(p, b, ch.c0, ch.c1, pooled, y, sm, mu.data(), f.ku.data());
    T* ga = ga_part.data() + (b * K + k) * n;
    T* gyh = gyh_part.data() + (b * K + k) * n;
    std::fill_n(ga, n, T(0));
    std::fill_n(gyh, n, T(0));
    for (int64_t c = ch.c0; c < ch.c1; ++c) {
      const T* row = pooled + (b * Ct + c) * n;
      const T m = mu[b * Ct + c], gz = f.gz[b * Ct + c], u = f.ku[b * Ct + c];
      for (int64_t i = 0; i < n; ++i) {
        ga[i] += gz * (row[i] - m);
        gyh[i] += u * (row[i] - m);
      }
    }
  };
  auto factors = [&](int64_t b) ATTNPOOL_INLINE_LAMBDA {
    const Sample<T>& sm = samples[b];
    std::vector<T> ga(n), ge(n), g(n);
    sum_chunks(chunks, -1, ga_part.data() + b * K * n, n, ga.data());
    const T aga = dot_short(n, sm.a.data(), ga.data());
    std::copy(sm.a.begin(), sm.a.end(), f.a.data() + b * n);
    for (int64_t i = 0; i < n; ++i) ge[i] = sm.a[i] * (ga[i] - aga);
    const T cross = static_cast<T>(4.0 * lam * gl);
    for (int64_t s = 0; s < S; ++s) {
      const Level& l = p.levels[s];
      const T kappa = static_cast<T>(-2.0 * gl / static_cast<double>(S * l.C));
      sum_chunks(chunks, s, gyh_part.data() + b * K * n, n, g.data());
      for (int64_t i = 0; i < n; ++i) g[i] *= kappa;
      for (int64_t q = 0; q < S; ++q) {
        if (q == s) continue;
        const T c = cross * sm.gram[s * S + q];
        const T* yq = &sm.yh[q * n];
        for (int64_t i = 0; i < n; ++i) g[i] += c * yq[i];
      }
      // through yh = y / max(r, eps): clamp_min passes the gradient where r >= eps. The
      // projection off the unit map is formed with the scores y themselves, yh (yh . g) =
      // y (y . g) / r^2: gyh is often nearly parallel to yh, and the rounding of yh would
      // otherwise dominate what is left after the cancellation.
      T* gy = f.gy.data() + (b * S + s) * n;
      const T* ys = y + (b * S + s) * n;
      const bool big = sm.r[s] >= static_cast<T>(eps);
      const T d = sm.d[s];  // r where big
      const T proj = big ? dot_short(n, ys, g.data()) / (d * d) : T(0);
      for (int64_t i = 0; i < n; ++i) gy[i] = ge[i] + (g[i] - ys[i] * proj) / d;
      // with gy accurate (the centred sums above), the parameter gradients are its plain sums,
      // as the reference forms them
      gb_part[b * S + s] = sum_short(n, gy);
      const T mean_yh = sm.sig[s] / static_cast<T>(n);
      T* yc = f.yc.data() + (b * S + s) * n;
      for (int64_t i = 0; i < n; ++i) yc[i] = sm.yh[s * n + i] - mean_yh;
    }
  };
  auto weight_parts = [&](int64_t b, int64_t k) ATTNPOOL_INLINE_LAMBDA {
    const Chunk& ch = chunks[k];
    const T kappa = static_cast<T>(-2.0 * gl / static_cast<double>(S * p.levels[ch.s].C));
    const T* gy = f.gy.data() + (b * S + ch.s) * n;
    for (int64_t c = ch.c0; c < ch.c1; ++c) {
      gw_part[b * Ct + c] = dot_short(n, gy, pooled + (b * Ct + c) * n);
      f.ku[b * Ct + c] *= kappa;
    }
  };
  head_steps(p.B, K, centred_sums, factors, weight_parts);
}

template <typename scalar_t>
C10_ALWAYS_INLINE void unpool_task(const Pyramid& p, const Task& k,
                                   const std::vector<const scalar_t*>& w,
                                   const Factors<at::opmath_type<scalar_t>>& f, scalar_t* gx) {
  using T = at::opmath_type<scalar_t>;
  const Level& l = p.levels[k.s];
  const int64_t H = l.H, W = l.W, HW = H * W, Ho = p.Ho, Wo = p.Wo, HoWo = Ho * Wo;
  const int64_t pos = k.t * HoWo;
  const T* a = f.a.data() + k.b * p.n + pos;
  const T* gy = f.gy.data() + (k.b * p.S + k.s) * p.n + pos;
  const T* yc = f.yc.data() + (k.b * p.S + k.s) * p.n + pos;
  const std::vector<T> inv = inverse_counts<T>(p, l);
  std::vector<T> d(HoWo), rows(Ho * W), line(W);
  for (int64_t c = k.c0; c < k.c1; ++c) {
    const T gz = f.gz[k.b * p.Ctot + l.off + c];
    const T wc = static_cast<T>(w[k.s][c]);
    const T ku = f.ku[k.b * p.Ctot + l.off + c];
    scalar_t* plane = gx + ((k.b * p.T + k.t) * l.C + c) * HW;
    if (l.identity) {
      for (int64_t i = 0; i < HW; ++i)
        plane[i] = static_cast<scalar_t>(gz * a[i] + wc * gy[i] + ku * yc[i]);
      continue;
    }
    for (int64_t i = 0; i < HoWo; ++i) d[i] = (gz * a[i] + wc * gy[i] + ku * yc[i]) * inv[i];
    // rows[oh, w]: the gradient of input column w from output row oh. Windows advance
    // monotonically, so columns below `covered` already hold an earlier window's share
    // (overlaps only where the sizes do not divide); others are assigned.
    for (int64_t oh = 0; oh < Ho; ++oh) {
      T* r = &rows[oh * W];
      int64_t covered = 0;
      for (int64_t ow = 0; ow < Wo; ++ow) {
        const T v = d[oh * Wo + ow];
        const int64_t c0 = l.cs[ow], c1 = l.ce[ow], mid = std::min(c1, covered);
        for (int64_t ww = c0; ww < mid; ++ww) r[ww] += v;
        for (int64_t ww = std::max(c0, mid); ww < c1; ++ww) r[ww] = v;
        covered = std::max(covered, c1);
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      const int64_t o0 = l.hlo[h], o1 = l.hhi[h];
      scalar_t* dst = plane + h * W;
      if (o0 == o1) {
        const T* src = &rows[o0 * W];
        for (int64_t ww = 0; ww < W; ++ww) dst[ww] = static_cast<scalar_t>(src[ww]);
      } else {
        std::copy_n(&rows[o0 * W], W, line.data());
        for (int64_t oh = o0 + 1; oh <= o1; ++oh)
          for (int64_t ww = 0; ww < W; ++ww) line[ww] += rows[oh * W + ww];
        for (int64_t ww = 0; ww < W; ++ww) dst[ww] = static_cast<scalar_t>(line[ww]);
      }
    }
  }
}

// ------------------------------------------------------------------------- checks
void check_levels(const std::vector<at::Tensor>& weights, at::ScalarType dtype) {
  TORCH_CHECK(!weights.empty(), "pyramid_attention cpu: at least one level");
  for (size_t s = 0; s < weights.size(); ++s)
    TORCH_CHECK(weights[s].dim() == 1 && weights[s].device().is_cpu() &&
                    weights[s].scalar_type() == dtype,
                "pyramid_attention cpu: weights[", s, "] must be a 1-D CPU tensor of dtype ",
                dtype);
}

// Data pointers of one tensor per level (P is `const scalar_t` or `scalar_t`).
template <typename P>
std::vector<P*> level_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<P*> ptrs;
  for (const auto& t : ts) ptrs.push_back(static_cast<P*>(t.data_ptr()));
  return ptrs;
}


}  // namespace

PyramidForward pyramid_attention_forward_cpu(const std::vector<at::Tensor>& xs_in,
                                             const std::vector<at::Tensor>& weights_in,
                                             const at::Tensor& bias_in, double eps,
                                             double lam) {
  TORCH_CHECK(!xs_in.empty() && xs_in.size() == weights_in.size(),
              "pyramid_attention cpu: one weight per level");
  const at::ScalarType dtype = xs_in[0].scalar_type();
  check_levels(weights_in, dtype);
  const int64_t S = static_cast<int64_t>(xs_in.size());
  TORCH_CHECK(bias_in.numel() == S && bias_in.scalar_type() == dtype,
              "pyramid_attention cpu: bias must be [", S, "] of dtype ", dtype);
  std::vector<at::Tensor> xs, weights;
  std::vector<int64_t> C, hw;
  const int64_t B = xs_in[0].size(0), T = xs_in[0].size(1);
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor& x = xs_in[s];
    TORCH_CHECK(x.dim() == 5 && x.size(0) == B && x.size(1) == T && x.device().is_cpu() &&
                    x.scalar_type() == dtype && x.size(2) == weights_in[s].size(0),
                "pyramid_attention cpu: xs[", s, "] must be [", B, ", ", T, ", ",
                weights_in[s].size(0), ", H, W] of dtype ", dtype, ", got ", x.sizes());
    xs.push_back(x.contiguous());
    weights.push_back(weights_in[s].contiguous());
    C.push_back(x.size(2));
    hw.push_back(x.size(3));
    hw.push_back(x.size(4));
  }
  const at::Tensor bias = bias_in.contiguous();
  const Pyramid p = make_pyramid(B, T, C, hw);
  const auto op = xs[0].options().dtype(opmath_dtype(dtype));
  at::Tensor pooled = at::empty({B, p.Ctot, p.n}, op);
  at::Tensor y = at::empty({B, S, p.n}, op);
  at::Tensor out = at::empty({B, p.Ctot}, xs[0].options());
  at::Tensor loss = at::empty({}, xs[0].options());
  if (B == 0) return {out, loss.fill_(std::numeric_limits<double>::quiet_NaN()), pooled, y};
  const std::vector<Task> tasks = plane_tasks(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pyramid_attention_forward_cpu",
                                  [&] {
    using Op = at::opmath_type<scalar_t>;
    Op* P = pooled.mutable_data_ptr<Op>();
    const auto x = level_ptrs<const scalar_t>(xs);
    parallel_run(static_cast<int64_t>(tasks.size()), Tasks([&](int64_t k) ATTNPOOL_INLINE_LAMBDA {
      pool_task<scalar_t>(p, tasks[k], x[tasks[k].s], P);
    }));
    const Op total = head_forward<scalar_t>(p, level_ptrs<const scalar_t>(weights),
                                            bias.const_data_ptr<scalar_t>(), eps, lam, P,
                                            y.mutable_data_ptr<Op>(),
                                            out.mutable_data_ptr<scalar_t>());
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total / static_cast<Op>(B));
  });
  return {out, loss, pooled, y};
}

PyramidBackward pyramid_attention_backward_cpu(const at::Tensor& grad_out_in,
                                               const at::Tensor& grad_loss,
                                               const at::Tensor& pooled_in, const at::Tensor& y_in,
                                               const std::vector<at::Tensor>& weights_in,
                                               double eps, double lam,
                                               const std::vector<int64_t>& sizes) {
  const int64_t S = static_cast<int64_t>(weights_in.size());
  TORCH_CHECK(S >= 1 && static_cast<int64_t>(sizes.size()) == 2 * S,
              "pyramid_attention cpu: sizes must hold H, W of each of the ", S, " levels");
  const at::ScalarType dtype = grad_out_in.scalar_type();
  check_levels(weights_in, dtype);
  TORCH_CHECK(grad_loss.numel() == 1, "pyramid_attention cpu: grad_loss must be 0-dim");
  const int64_t B = y_in.size(0), n = y_in.size(2);
  std::vector<int64_t> C;
  std::vector<at::Tensor> weights;
  for (const auto& w : weights_in) {
    C.push_back(w.size(0));
    weights.push_back(w.contiguous());
  }
  const int64_t HoWo = sizes[2 * S - 2] * sizes[2 * S - 1];
  TORCH_CHECK(HoWo > 0 && n % HoWo == 0, "pyramid_attention cpu: y's n must be T*Ho*Wo");
  const Pyramid p = make_pyramid(B, n / HoWo, C, sizes);
  TORCH_CHECK(pooled_in.dim() == 3 && pooled_in.size(0) == B && pooled_in.size(1) == p.Ctot &&
                  pooled_in.size(2) == n && y_in.dim() == 3 && y_in.size(1) == S &&
                  pooled_in.scalar_type() == opmath_dtype(dtype) &&
                  y_in.scalar_type() == opmath_dtype(dtype),
              "pyramid_attention cpu: pooled / y do not match the forward's");
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == B && grad_out_in.size(1) == p.Ctot,
              "pyramid_attention cpu: grad_out must be [", B, ", ", p.Ctot, "]");
  const at::Tensor pooled = pooled_in.contiguous(), y = y_in.contiguous(),
                   grad_out = grad_out_in.contiguous();
  const auto opt = grad_out.options();
  std::vector<at::Tensor> grad_xs, grad_ws;
  for (int64_t s = 0; s < S; ++s)
    grad_xs.push_back(at::empty({B, p.T, C[s], sizes[2 * s], sizes[2 * s + 1]}, opt));
  at::Tensor gw_part = at::empty({B, p.Ctot}, pooled.options());
  at::Tensor gb_part = at::empty({B, S}, pooled.options());
  const double gl = grad_loss.item<double>() / static_cast<double>(std::max<int64_t>(B, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "pyramid_attention_backward_cpu", [&] {
    using Op = at::opmath_type<scalar_t>;
    const auto w = level_ptrs<const scalar_t>(weights);
    const auto gx = level_ptrs<scalar_t>(grad_xs);
    Factors<Op> f{std::vector<Op>(B * n), std::vector<Op>(B * S * n), std::vector<Op>(B * S * n),
                  std::vector<Op>(B * p.Ctot), std::vector<Op>(B * p.Ctot)};
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    const Op* P = pooled.const_data_ptr<Op>();
    const Op* yp = y.const_data_ptr<Op>();
    Op* gw = gw_part.mutable_data_ptr<Op>();
    Op* gb = gb_part.mutable_data_ptr<Op>();
    head_backward<scalar_t>(p, eps, lam, gl, go, P, yp, f, gw, gb);
    const std::vector<Task> tasks = plane_tasks(p);
    parallel_run(static_cast<int64_t>(tasks.size()), Tasks([&](int64_t k) ATTNPOOL_INLINE_LAMBDA {
      unpool_task<scalar_t>(p, tasks[k], w, f, gx[tasks[k].s]);
    }));
  });
  // batch sums in a fixed order (sum over dim 0 of a contiguous [B, .] tensor)
  const at::Tensor gw = gw_part.sum(0).to(dtype), gb = gb_part.sum(0).to(dtype);
  for (int64_t s = 0; s < S; ++s) grad_ws.push_back(gw.narrow(0, p.levels[s].off, C[s]).clone());
  return {grad_xs, grad_ws, gb};
}

}  // namespace attnpool
