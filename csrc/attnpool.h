// Entry points of attnpool._C. Every kernel entry point receives inputs that
// the op's file (attnpool/<name>.py) has already validated: one floating dtype for all of an op's
// float inputs, every size >= 1; layouts as each op says below.
#pragma once
#include <ATen/ATen.h>  // no torch/extension.h: it brings pybind11 (see ops.cpp)

#include <tuple>
#include <vector>

namespace attnpool {

// The dtype the kernels accumulate in (and return their small statistics in): float64 for
// float64, else float32 (attnpool/_ops.py's opmath).
inline at::ScalarType opmath_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Attention clusters: softmax pooling + shift + L2 norm (docs/design.md "Attention clusters").
//   x [B, L, F], scores [B, L, N] (opmath: float for half / bfloat16), lengths int64 [B]
//   (optional), alpha/beta [N]
//   -> out [B, N*F] (dtype of x), attn [B, N, L] and norm [B, N] (float32, or
//      float64 for float64 input). With shift, out = u / (sqrt(N) max(norm, eps)) and norm
//      the unclamped sqrt(||u||^2 + eps_sqrt), u = alpha*v + beta (eps_sqrt = 0: torch's
//      clamp_min form; eps = 0: eps inside the root, as PaddlePaddle's l2_normalize);
//      ||v|| when shift is false.
using ClusterForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// -> grad_x [B, L, F], grad_scores [B, L, N], grad_alpha [N], grad_beta [N]
//    (all in the dtype of x; grad_alpha/beta are zero when shift is false).
using ClusterBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ClusterForward attention_cluster_forward_cpu(const at::Tensor& x, const at::Tensor& scores,
                                        const c10::optional<at::Tensor>& lengths,
                                        const at::Tensor& alpha, const at::Tensor& beta,
                                        bool shift, double eps, double eps_sqrt);
// lengths as the forward's: padded frames are never read (NaN there reaches no gradient;
// grad_x is 0 on them).
ClusterBackward attention_cluster_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                          const at::Tensor& attn, const at::Tensor& norm,
                                          const at::Tensor& alpha, const at::Tensor& beta,
                                          const c10::optional<at::Tensor>& lengths,
                                          bool shift, double eps, double eps_sqrt);
// Attention clusters with the fc1 scoring layer fused: scores = x weight^T (weight [N, F],
// x's dtype; a bias would cancel in the softmax), never written to memory.
ClusterForward attention_cluster_fc1_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& lengths,
                                            const at::Tensor& alpha, const at::Tensor& beta,
                                            bool shift, double eps, double eps_sqrt);
// grad_attn [B, N, L] (optional; any float dtype): gradient w.r.t. the returned attention;
// out, attn, norm: the forward's results (du follows from out: no recompute of v; out may be
// absent without shift, where du = grad_out).
//   -> grad_x [B, L, F], grad_weight [N, F] (deterministic), grad_alpha [N], grad_beta [N].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_cluster_fc1_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_attn, const at::Tensor& x,
    const at::Tensor& weight, const c10::optional<at::Tensor>& out, const at::Tensor& attn,
    const at::Tensor& norm, const at::Tensor& alpha, const at::Tensor& beta,
    const c10::optional<at::Tensor>& lengths, bool shift, double eps, double eps_sqrt);

// Attentional pooling, factored core (docs/design.md "Attentional pooling"):
//   x [B, C, n] (n-contiguous, or C-contiguous = channels-last), wb [P, C], bb [P]
//   -> z [B, P, C] = (1/n) sum_i h[:, :, i] x[:, :, i],  h [B, P, n] = wb x + bb
//   (both in the dtype of x; sums in float32, or float64 for float64 input).
using AttpoolForward = std::tuple<at::Tensor, at::Tensor>;
// grad_z [B, P, C], grad_h [B, P, n] (contiguous; read in opmath, so grad_h may come in
// float32 / float64 whatever x's dtype), x, h as the forward got / returned them
//   -> grad_x (x's shape and layout), grad_wb [P, C], grad_bb [P] (dtype of x).
using AttpoolBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

AttpoolForward attentional_pooling_forward_cpu(const at::Tensor& x, const at::Tensor& wb,
                                            const at::Tensor& bb);
AttpoolBackward attentional_pooling_backward_cpu(const at::Tensor& grad_z, const at::Tensor& grad_h,
                                              const at::Tensor& x, const at::Tensor& h,
                                              const at::Tensor& wb);

// Weighted spatial pooling under given maps (attentional pooling with the bottom-up maps
// supplied; the masked frame means of docs/design.md "Spatio-temporal attention"):
//   x [B, C, n] (n- or C-contiguous), h [B, P, n] (x's dtype, contiguous)
//   -> z [B, P, C] = (1/n) sum_i h[:, :, i] x[:, :, i] (x's dtype)
// backward: grad_z [B, P, C] -> grad_x (x's shape and layout) = (1/n) grad_z^T h,
//           grad_h [B, P, n] = (1/n) grad_z x.
at::Tensor weighted_pool_forward_cpu(const at::Tensor& x, const at::Tensor& h);
std::tuple<at::Tensor, at::Tensor> weighted_pool_backward_cpu(const at::Tensor& grad_z,
                                                              const at::Tensor& x,
                                                              const at::Tensor& h);

// Spatio-temporal regulariser (docs/design.md "Spatio-temporal attention"), all three terms in one
// kernel:
//   mask [B, T, H, W], w [B, T] (one dtype, contiguous) -> total, a 0-dim tensor of that dtype
//   = tv_weight * TV(mask) + contrast_weight * contrast(mask) + unimodal_weight * U(w),
//   TV summed over the B*T maps (averaged when tv_mean), U over the B*(T-2) terms
//   (averaged when unimodal_mean; 0 when T < 3), sqrt as the official code when `sqrt`.
// backward: grad_total (0-dim) -> grad_mask [B, T, H, W], grad_w [B, T].
at::Tensor st_regularizer_forward_cpu(const at::Tensor& mask, const at::Tensor& w,
                                      double tv_weight, double contrast_weight,
                                      double unimodal_weight, bool sqrt, bool tv_mean,
                                      bool unimodal_mean);
std::tuple<at::Tensor, at::Tensor> st_regularizer_backward_cpu(
    const at::Tensor& grad_total, const at::Tensor& mask, const at::Tensor& w, double tv_weight,
    double contrast_weight, double unimodal_weight, bool sqrt, bool tv_mean, bool unimodal_mean);

// Interaction-aware pyramid attention (docs/design.md "Pyramid attention"; spec: the reference's
// pyramid_attention):
//   xs[s] [B, T, C_s, H_s, W_s] (contiguous; maps come as T = 1), weights[s] [C_s], bias [S],
//   one dtype -> out [B, Ctot] (xs' dtype; Ctot = sum C_s, level-major), loss (0-dim, xs'
//   dtype, batch mean), pooled [B, Ctot, n] = R(X_s) stacked (opmath), y [B, S, n] the raw
//   scores (opmath); n = T*Ho*Wo (the last level's Ho x Wo), i = t*Ho*Wo + oh*Wo + ow.
using PyramidForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// grad_out [B, Ctot] (xs' dtype), grad_loss (0-dim), pooled and y as the forward returned
// them, sizes = {H_0, W_0, ..., H_{S-1}, W_{S-1}}
//   -> grad_xs[s] [B, T, C_s, H_s, W_s], grad_weights[s] [C_s], grad_bias [S] (xs' dtype).
// Per sample, with P_s its pooled maps, a = softmax(sum_s y_s), yh_s = y_s / max(r_s, eps)
// (r_s = ||y_s||), sig_s = sum_i yh_s[i], mu_s = mean_i P_s, u_s = P_s yh_s - mu_s sig_s,
// G = [yh_s . yh_t], gl = grad_loss / B, gz_s = grad_out's level-s slice:
//   ga = sum_s gz_s P_s;  ge = a (ga - a.ga);  kappa_s = -2 gl / (S C_s)
//   gyh_s = kappa_s (u_s P_s - u_s.mu_s) + 4 lam gl sum_{t != s} G_st yh_t
//   gy_s = ge + (r_s >= eps ? (gyh_s - yh_s (yh_s.gyh_s)) / r_s : gyh_s / eps)
//   grad_weights[s] = sum_b P_s gy_s,  grad_bias[s] = sum_b sum_i gy_s[i]
//   grad_xs[s] = R^T dP_s,  dP_s = gz_s (x) a + w_s (x) gy_s + kappa_s u_s (x) (yh_s - sig_s/n)
// (dP_s is never materialised: R^T spreads each pooled cell over its window / its size).
using PyramidBackward = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

PyramidForward pyramid_attention_forward_cpu(const std::vector<at::Tensor>& xs,
                                             const std::vector<at::Tensor>& weights,
                                             const at::Tensor& bias, double eps, double lam);
PyramidBackward pyramid_attention_backward_cpu(const at::Tensor& grad_out,
                                               const at::Tensor& grad_loss,
                                               const at::Tensor& pooled, const at::Tensor& y,
                                               const std::vector<at::Tensor>& weights,
                                               double eps, double lam,
                                               const std::vector<int64_t>& sizes);

#ifdef ATTNPOOL_WITH_CUDA
ClusterForward attention_cluster_forward_cuda(const at::Tensor& x, const at::Tensor& scores,
                                         const c10::optional<at::Tensor>& lengths,
                                         const at::Tensor& alpha, const at::Tensor& beta,
                                         bool shift, double eps, double eps_sqrt);
ClusterBackward attention_cluster_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& attn, const at::Tensor& norm,
                                           const at::Tensor& alpha, const at::Tensor& beta,
                                           const c10::optional<at::Tensor>& lengths,
                                           bool shift, double eps, double eps_sqrt);
AttpoolForward attentional_pooling_forward_cuda(const at::Tensor& x, const at::Tensor& wb,
                                             const at::Tensor& bb);
AttpoolBackward attentional_pooling_backward_cuda(const at::Tensor& grad_z, const at::Tensor& grad_h,
                                               const at::Tensor& x, const at::Tensor& h,
                                               const at::Tensor& wb);
at::Tensor weighted_pool_forward_cuda(const at::Tensor& x, const at::Tensor& h);
std::tuple<at::Tensor, at::Tensor> weighted_pool_backward_cuda(const at::Tensor& grad_z,
                                                               const at::Tensor& x,
                                                               const at::Tensor& h);
at::Tensor st_regularizer_forward_cuda(const at::Tensor& mask, const at::Tensor& w,
                                       double tv_weight, double contrast_weight,
                                       double unimodal_weight, bool sqrt, bool tv_mean,
                                       bool unimodal_mean);
std::tuple<at::Tensor, at::Tensor> st_regularizer_backward_cuda(
    const at::Tensor& grad_total, const at::Tensor& mask, const at::Tensor& w, double tv_weight,
    double contrast_weight, double unimodal_weight, bool sqrt, bool tv_mean, bool unimodal_mean);
PyramidForward pyramid_attention_forward_cuda(const std::vector<at::Tensor>& xs,
                                              const std::vector<at::Tensor>& weights,
                                              const at::Tensor& bias, double eps, double lam);
PyramidBackward pyramid_attention_backward_cuda(const at::Tensor& grad_out,
                                                const at::Tensor& grad_loss,
                                                const at::Tensor& pooled, const at::Tensor& y,
                                                const std::vector<at::Tensor>& weights,
                                                double eps, double lam,
                                                const std::vector<int64_t>& sizes);
#endif

}  // namespace attnpool
