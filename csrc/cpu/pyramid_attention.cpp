// Fused CPU kernels of interaction-aware pyramid attention (our formulation of Du et al.,
// ECCV 2018; docs/design.md "Pyramid attention", spec: attnpool.reference.pyramid_attention;
// contract in attnpool.h).
//
// Forward, two parallel passes:
//   pool   every frame plane of every level averaged to the common Ho x Wo grid (torch's
//          adaptive windows), read once, rows summed first so the inner loop runs over
//          contiguous W -> pooled [B, Ctot, n] (opmath). The only pass over the inputs.
//   head   per sample, over the pooled maps only: scores y_s, the fused softmax a, out, the
//          unit maps yh_s, the PCA term u_s and the level Gram matrix -> loss_b.
// Backward, two parallel passes:
//   head   per sample: the gradient gy_s of every level's scores, per-sample partials of
//          grad_weights / grad_bias, and the three rank-1 factors of dP_s = gz (x) a +
//          w (x) gy_s + kappa_s u_s (x) (yh_s - sig_s/n).
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

template <typename scalar_t>
C10_ALWAYS_INLINE at::opmath_type<scalar_t> head_forward(const Pyramid& p, int64_t b,
                                       const std::vector<const scalar_t*>& w, const scalar_t* bias,
                                       double eps, double lam,
                                       const at::opmath_type<scalar_t>* pooled,
                                       at::opmath_type<scalar_t>* y, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t n = p.n, S = p.S;
  const T* Pb = pooled + b * p.Ctot * n;
  T* yb = y + b * S * n;
  for (int64_t s = 0; s < S; ++s) {
    const Level& l = p.levels[s];
    T* ys = yb + s * n;
    std::fill_n(ys, n, static_cast<T>(bias[s]));
    for (int64_t c = 0; c < l.C; ++c) {
      const T wc = static_cast<T>(w[s][c]);
      const T* row = Pb + (l.off + c) * n;
      for (int64_t i = 0; i < n; ++i) ys[i] += wc * row[i];
    }
  }
  Sample<T> sm(p, yb, eps);
  for (int64_t c = 0; c < p.Ctot; ++c)
    out[b * p.Ctot + c] = static_cast<scalar_t>(dot_short(n, Pb + c * n, sm.a.data()));
  T variance = 0;
  std::vector<T> u, mu;
  for (int64_t s = 0; s < S; ++s) {
    const Level& l = p.levels[s];
    u.resize(l.C);
    mu.resize(l.C);
    row_means(Pb + l.off * n, l.C, n, mu.data());
    pca_projection(Pb + l.off * n, l.C, n, yb + s * n, sm.d[s], mu.data(), u.data());
    variance += dot_short(l.C, u.data(), u.data()) / static_cast<T>(l.C);
  }
  T overlap = 0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t q = 0; q < S; ++q)
      if (q != s) overlap += sm.gram[s * S + q] * sm.gram[s * S + q];
  return static_cast<T>(lam) * overlap - variance / static_cast<T>(S);
}

// ------------------------------------------------------------------------- backward
// The rank-1 factors of dP per sample: a [B, n], gy [B, S, n], yc [B, S, n] (yh - sig/n),
// gz [B, Ctot] (grad_out), ku [B, Ctot] (kappa_s u_s).
template <typename T>
struct Factors {
  std::vector<T> a, gy, yc, gz, ku;
};

template <typename scalar_t>
C10_ALWAYS_INLINE void head_backward(const Pyramid& p, int64_t b, double eps, double lam,
                                     double gl, const scalar_t* grad_out,
                                     const at::opmath_type<scalar_t>* pooled,
                                     const at::opmath_type<scalar_t>* y,
                                     Factors<at::opmath_type<scalar_t>>& f,
                                     at::opmath_type<scalar_t>* gw_part,
                                     at::opmath_type<scalar_t>* gb_part) {
  using T = at::opmath_type<scalar_t>;
  const int64_t n = p.n, S = p.S;
  const T* Pb = pooled + b * p.Ctot * n;
  Sample<T> sm(p, y + b * S * n, eps);
  T* gz = &f.gz[b * p.Ctot];
  for (int64_t c = 0; c < p.Ctot; ++c) gz[c] = static_cast<T>(grad_out[b * p.Ctot + c]);
  // Sums over channels use P - mu (centred rows): the softmax and the PCA term are blind to a
  // channel's mean, and fp32 would lose them to cancellation against large means.
  std::vector<T> mu(p.Ctot), ga(n, T(0));
  row_means(Pb, p.Ctot, n, mu.data());
  for (int64_t c = 0; c < p.Ctot; ++c) {
    const T* row = Pb + c * n;
    for (int64_t i = 0; i < n; ++i) ga[i] += gz[c] * (row[i] - mu[c]);
  }
  const T aga = dot_short(n, sm.a.data(), ga.data());
  std::copy(sm.a.begin(), sm.a.end(), &f.a[b * n]);
  std::vector<T> ge(n), gyh(n);
  for (int64_t i = 0; i < n; ++i) ge[i] = sm.a[i] * (ga[i] - aga);
  const T cross = static_cast<T>(4.0 * lam * gl);
  for (int64_t s = 0; s < S; ++s) {
    const Level& l = p.levels[s];
    const T* Ps = Pb + l.off * n;
    const T* mus = &mu[l.off];
    const T* yh = &sm.yh[s * n];
    T* u = &f.ku[b * p.Ctot + l.off];
    pca_projection(Ps, l.C, n, y + (b * S + s) * n, sm.d[s], mus, u);
    const T kappa = static_cast<T>(-2.0 * gl / static_cast<double>(S * l.C));
    std::fill(gyh.begin(), gyh.end(), T(0));
    for (int64_t c = 0; c < l.C; ++c) {
      const T* row = Ps + c * n;
      for (int64_t i = 0; i < n; ++i) gyh[i] += u[c] * (row[i] - mus[c]);
    }
    for (int64_t i = 0; i < n; ++i) gyh[i] *= kappa;
    for (int64_t q = 0; q < S; ++q) {
      if (q == s) continue;
      const T g = cross * sm.gram[s * S + q];
      const T* yq = &sm.yh[q * n];
      for (int64_t i = 0; i < n; ++i) gyh[i] += g * yq[i];
    }
    // through yh = y / max(r, eps): clamp_min passes the gradient where r >= eps. The
    // projection off the unit map is formed with the scores y themselves, yh (yh . g) =
    // y (y . g) / r^2: gyh is often nearly parallel to yh, and the rounding of yh would
    // otherwise dominate what is left after the cancellation.
    T* gy = &f.gy[(b * S + s) * n];
    const T* ys = y + (b * S + s) * n;
    const bool big = sm.r[s] >= static_cast<T>(eps);
    const T d = sm.d[s];  // r where big
    const T proj = big ? dot_short(n, ys, gyh.data()) / (d * d) : T(0);
    for (int64_t i = 0; i < n; ++i) gy[i] = ge[i] + (gyh[i] - ys[i] * proj) / d;
    // with gy accurate (the centred sums above), the parameter gradients are its plain sums,
    // as the reference forms them
    gb_part[b * S + s] = sum_short(n, gy);
    for (int64_t c = 0; c < l.C; ++c)
      gw_part[b * p.Ctot + l.off + c] = dot_short(n, gy, Ps + c * n);
    const T mean_yh = sm.sig[s] / static_cast<T>(n);
    T* yc = &f.yc[(b * S + s) * n];
    for (int64_t i = 0; i < n; ++i) yc[i] = yh[i] - mean_yh;
    for (int64_t c = 0; c < l.C; ++c) u[c] *= kappa;
  }
}

template <typename scalar_t>
C10_ALWAYS_INLINE void unpool_task(const Pyramid& p, const Task& k,
                                   const std::vector<const scalar_t*>& w,
                                   const Factors<at::opmath_type<scalar_t>>& f, scalar_t* gx) {
  using T = at::opmath_type<scalar_t>;
  const Level& l = p.levels[k.s];
  const int64_t H = l.H, W = l.W, HW = H * W, Ho = p.Ho, Wo = p.Wo, HoWo = Ho * Wo;
  const int64_t pos = k.t * HoWo;
  const T* a = &f.a[k.b * p.n + pos];
  const T* gy = &f.gy[(k.b * p.S + k.s) * p.n + pos];
  const T* yc = &f.yc[(k.b * p.S + k.s) * p.n + pos];
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
    const auto w = level_ptrs<const scalar_t>(weights);
    std::vector<Op> loss_b(B);
    Op* yp = y.mutable_data_ptr<Op>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    parallel_run(B, Tasks([&](int64_t b) ATTNPOOL_INLINE_LAMBDA {
      loss_b[b] = head_forward<scalar_t>(p, b, w, bias.const_data_ptr<scalar_t>(), eps, lam, P,
                                         yp, outp);
    }));
    Op total = 0;
    for (int64_t b = 0; b < B; ++b) total += loss_b[b];
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
    parallel_run(B, Tasks([&](int64_t b) ATTNPOOL_INLINE_LAMBDA {
      head_backward<scalar_t>(p, b, eps, lam, gl, go, P, yp, f, gw, gb);
    }));
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
