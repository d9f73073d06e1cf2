// Entry points of attnpool._C. Every kernel entry point receives inputs that
// attnpool/ops.py has already validated: one floating dtype for all of an op's
// float inputs, every size >= 1; layouts as each op says below.
#pragma once
#include <torch/extension.h>

#include <tuple>

namespace attnpool {

// Attention clusters: softmax pooling + shift + L2 norm (DESIGN 3.1).
//   x [B, L, F], scores [B, L, N], lengths int64 [B] (optional), alpha/beta [N]
//   -> out [B, N*F] (dtype of x), attn [B, N, L] and norm [B, N] (float32, or
//      float64 for float64 input). norm is the unclamped ||alpha*v + beta||
//      (||v|| when shift is false).
using ClusterForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// -> grad_x [B, L, F], grad_scores [B, L, N], grad_alpha [N], grad_beta [N]
//    (all in the dtype of x; grad_alpha/beta are zero when shift is false).
using ClusterBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ClusterForward cluster_pool_forward_cpu(const at::Tensor& x, const at::Tensor& scores,
                                        const c10::optional<at::Tensor>& lengths,
                                        const at::Tensor& alpha, const at::Tensor& beta,
                                        bool shift, double eps);
ClusterBackward cluster_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                          const at::Tensor& attn, const at::Tensor& norm,
                                          const at::Tensor& alpha, const at::Tensor& beta,
                                          bool shift, double eps);

// Attentional pooling, factored core (DESIGN 3.2):
//   x [B, C, n] (n-contiguous, or C-contiguous = channels-last), wb [P, C], bb [P]
//   -> z [B, P, C] = (1/n) sum_i h[:, :, i] x[:, :, i],  h [B, P, n] = wb x + bb
//   (both in the dtype of x; sums in float32, or float64 for float64 input).
using AttpoolForward = std::tuple<at::Tensor, at::Tensor>;
// grad_z [B, P, C], grad_h [B, P, n] (contiguous; read in opmath, so grad_h may come in
// float32 / float64 whatever x's dtype), x, h as the forward got / returned them
//   -> grad_x (x's shape and layout), grad_wb [P, C], grad_bb [P] (dtype of x).
using AttpoolBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

AttpoolForward attentional_pool_forward_cpu(const at::Tensor& x, const at::Tensor& wb,
                                            const at::Tensor& bb);
AttpoolBackward attentional_pool_backward_cpu(const at::Tensor& grad_z, const at::Tensor& grad_h,
                                              const at::Tensor& x, const at::Tensor& h,
                                              const at::Tensor& wb);

#ifdef ATTNPOOL_WITH_CUDA
ClusterForward cluster_pool_forward_cuda(const at::Tensor& x, const at::Tensor& scores,
                                         const c10::optional<at::Tensor>& lengths,
                                         const at::Tensor& alpha, const at::Tensor& beta,
                                         bool shift, double eps);
ClusterBackward cluster_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& attn, const at::Tensor& norm,
                                           const at::Tensor& alpha, const at::Tensor& beta,
                                           bool shift, double eps);
AttpoolForward attentional_pool_forward_cuda(const at::Tensor& x, const at::Tensor& wb,
                                             const at::Tensor& bb);
AttpoolBackward attentional_pool_backward_cuda(const at::Tensor& grad_z, const at::Tensor& grad_h,
                                               const at::Tensor& x, const at::Tensor& h,
                                               const at::Tensor& wb);
#endif

}  // namespace attnpool
