// Entry points of attnpool._C. Every kernel entry point receives inputs that
// attnpool/ops.py has already validated and made contiguous: same floating
// dtype for x, scores, alpha, beta; lengths int64 [B] or absent; B, L, F, N >= 1.
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

#ifdef ATTNPOOL_WITH_CUDA
ClusterForward cluster_pool_forward_cuda(const at::Tensor& x, const at::Tensor& scores,
                                         const c10::optional<at::Tensor>& lengths,
                                         const at::Tensor& alpha, const at::Tensor& beta,
                                         bool shift, double eps);
ClusterBackward cluster_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& attn, const at::Tensor& norm,
                                           const at::Tensor& alpha, const at::Tensor& beta,
                                           bool shift, double eps);
#endif

}  // namespace attnpool
