// Torch glue of the attention-cluster CUDA kernels: checks, device guard, output and
// scratch allocation, launch on the current stream, deterministic reduction over B.
// The kernels themselves (attention_cluster.cu) see raw pointers only.
#include "cuda/attention_cluster.cuh"
#include "cuda/torch_glue.h"

namespace attnpool {
namespace {

namespace cc = cluster_cuda;
using namespace cuda_glue;  // kernel_dtype, opmath_type, check_input, workspace_tensor, ...

}  // namespace

ClusterForward cluster_pool_forward_cuda(const at::Tensor& x, const at::Tensor& scores,
                                         const c10::optional<at::Tensor>& lengths,
                                         const at::Tensor& alpha, const at::Tensor& beta,
                                         bool shift, double eps, double eps_sqrt) {
  TORCH_CHECK(x.dim() == 3, "attnpool cuda: x must be [B, L, F], got ", x.sizes());
  TORCH_CHECK(scores.dim() == 3, "attnpool cuda: scores must be [B, L, N], got ", scores.sizes());
  const int64_t B = x.size(0), L = x.size(1), F = x.size(2), N = scores.size(2);
  const at::Device device = x.device();
  const at::ScalarType dtype = x.scalar_type();
  const cc::DType kdtype = kernel_dtype(dtype);
  check_input(x, "x", device, dtype, {B, L, F});
  check_input(scores, "scores", device, opmath_type(dtype), {B, L, N});
  check_input(alpha, "alpha", device, dtype, {N});
  check_input(beta, "beta", device, dtype, {N});
  if (lengths.has_value()) check_input(*lengths, "lengths", device, at::kLong, {B});

  const c10::cuda::CUDAGuard guard(device);
  const auto stat = x.options().dtype(opmath_type(dtype));
  at::Tensor out = at::empty({B, N * F}, x.options());
  at::Tensor attn = at::empty({B, N, L}, stat);
  at::Tensor norm = at::empty({B, N}, stat);
  if (out.numel() == 0 || attn.numel() == 0) {  // the caller short-circuits these already
    out.zero_();
    attn.zero_();
    norm.zero_();
    return {out, attn, norm};
  }
  check_launch(cc::cluster_pool_forward_launch(
                   kdtype, x.data_ptr(), scores.data_ptr(),
                   lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr,
                   alpha.data_ptr(), beta.data_ptr(), out.data_ptr(), attn.data_ptr(),
                   norm.data_ptr(), B, L, F, N, shift, eps, eps_sqrt,
                   current_stream(device)),
               "cluster_pool_forward");
  return {out, attn, norm};
}

ClusterBackward cluster_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& attn, const at::Tensor& norm,
                                           const at::Tensor& alpha, const at::Tensor& beta,
                                           const c10::optional<at::Tensor>& lengths,
                                           bool shift, double eps, double eps_sqrt) {
  TORCH_CHECK(x.dim() == 3, "attnpool cuda: x must be [B, L, F], got ", x.sizes());
  TORCH_CHECK(attn.dim() == 3, "attnpool cuda: attn must be [B, N, L], got ", attn.sizes());
  const int64_t B = x.size(0), L = x.size(1), F = x.size(2), N = attn.size(1);
  const at::Device device = x.device();
  const at::ScalarType dtype = x.scalar_type();
  const at::ScalarType stat_type = opmath_type(dtype);
  const cc::DType kdtype = kernel_dtype(dtype);
  check_input(grad_out, "grad_out", device, dtype, {B, N * F});
  check_input(x, "x", device, dtype, {B, L, F});
  check_input(attn, "attn", device, stat_type, {B, N, L});
  check_input(norm, "norm", device, stat_type, {B, N});
  check_input(alpha, "alpha", device, dtype, {N});
  check_input(beta, "beta", device, dtype, {N});
  if (lengths.has_value()) check_input(*lengths, "lengths", device, at::kLong, {B});

  const c10::cuda::CUDAGuard guard(device);
  const auto stat = x.options().dtype(stat_type);
  at::Tensor grad_x = at::empty({B, L, F}, x.options());
  at::Tensor grad_scores = at::empty({B, L, N}, x.options());
  if (grad_x.numel() == 0 || grad_scores.numel() == 0) {  // the caller short-circuits these
    return {grad_x.zero_(), grad_scores.zero_(), at::zeros({N}, x.options()),
            at::zeros({N}, x.options())};
  }
  // Per-sample grad_alpha/beta terms and per-unit dv coefficients (kernel scratch).
  at::Tensor alpha_part = at::empty({B, N}, stat);
  at::Tensor beta_part = at::empty({B, N}, stat);
  at::Tensor coef = at::empty({B, N, 3}, x.options().dtype(at::kDouble));
  at::Tensor workspace =
      workspace_tensor(cc::cluster_pool_backward_workspace_elems(kdtype, B, L, N), stat);
  check_launch(cc::cluster_pool_backward_launch(
                   kdtype, grad_out.data_ptr(), x.data_ptr(),
                   lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr,
                   attn.data_ptr(), norm.data_ptr(), alpha.data_ptr(), beta.data_ptr(), grad_x.data_ptr(), grad_scores.data_ptr(),
                   alpha_part.data_ptr(), beta_part.data_ptr(), coef.data_ptr(),
                   data_or_null(workspace), B, L, F, N, shift, eps, eps_sqrt,
                   current_stream(device)),
               "cluster_pool_backward");
  if (!shift) {
    return {grad_x, grad_scores, at::zeros({N}, x.options()), at::zeros({N}, x.options())};
  }
  // Sum over B with torch's reduction (fixed order for a fixed shape: deterministic),
  // in opmath, then round once to the dtype of x.
  return {grad_x, grad_scores, alpha_part.sum(0).to(dtype), beta_part.sum(0).to(dtype)};
}

}  // namespace attnpool
