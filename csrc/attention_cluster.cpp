// The op attnpool::attention_cluster (docs/design.md "Attention clusters"): its schemas and its
// compiled kernels (CPU: cpu/attention_cluster.cpp; CUDA: cuda/attention_cluster_torch.cpp).
// See registration.h for what is registered where.
#include "registration.h"

namespace attnpool {
namespace {

// Frames past lengths[b] are padding; each sample needs at least one frame. On the CPU the
// check is a read of B integers; on a GPU it is a device-side assert (no sync).
void check_lengths(const c10::optional<at::Tensor>& lengths, int64_t L) {
  if (!lengths) return;
  const at::Tensor ok = lengths->ge(1).logical_and(lengths->le(L)).all();
  if (lengths->is_cpu()) {
    TORCH_CHECK_VALUE(ok.item<bool>(), "lengths must lie in [1, L=", L, "], got ",
                      lengths->flatten());
  } else {
    at::_assert_async(ok, "lengths must lie in [1, L]");
  }
}

c10::optional<at::Tensor> as_int64(const c10::optional<at::Tensor>& lengths) {
  if (!lengths) return c10::nullopt;
  return lengths->to(at::kLong).contiguous();
}

// x [B, L, F] with scores [B, L, N] or the scoring layer weight [N, F] (fc1; bias [N] is
// cancelled by the softmax, taken only so that autograd returns its zero gradient).
template <bool kCuda>
ClusterForward forward(const at::Tensor& x, const c10::optional<at::Tensor>& scores,
                       const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& /*bias*/,
                       const c10::optional<at::Tensor>& lengths, const at::Tensor& alpha,
                       const at::Tensor& beta, bool shift, double eps, double eps_sqrt,
                       std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "attention_cluster");
  TORCH_CHECK(scores.has_value() != weight.has_value(),
              "attnpool::attention_cluster takes either scores or weight");
  const int64_t B = x.size(0), L = x.size(1), F = x.size(2), N = alpha.size(0);
  check_lengths(lengths, L);
  const auto len = as_int64(lengths);
  const auto stat = x.options().dtype(opmath_type(x.scalar_type()));
  if (B == 0) return {at::empty({0, N * F}, x.options()), at::empty({0, N, L}, stat),
                      at::empty({0, N}, stat)};
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, attention_cluster_forward);
  if (!kCuda && weight) {  // the CPU kernels compute the scores per task, never stored
    return attention_cluster_fc1_forward_cpu(x.contiguous(), weight->contiguous(), len,
                                             alpha.contiguous(), beta.contiguous(), shift, eps,
                                             eps_sqrt);
  }
  // The kernels take the scores in opmath: rounded to half / bfloat16 they would move every
  // softmax weight by about that rounding times |score| (fp16 outputs of the GPU kernels
  // were 3x further from float64 than the fp16 reference at B=4, L=300, F=2048, N=64).
  const at::Tensor s = weight ? at::linear(x.to(stat.dtype()), weight->to(stat.dtype()))
                              : scores->to(stat.dtype());
  return kernel(x.contiguous(), s.contiguous(), len, alpha.contiguous(), beta.contiguous(),
                shift, eps, eps_sqrt);
}

template <bool kCuda>
ClusterBackward backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& attn,
                         const at::Tensor& norm, const at::Tensor& alpha, const at::Tensor& beta,
                         const c10::optional<at::Tensor>& lengths, bool shift, double eps,
                         double eps_sqrt, std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "attention_cluster_backward");
  if (x.size(0) == 0) {
    return {at::zeros_like(x), at::zeros({0, x.size(1), attn.size(1)}, x.options()),
            at::zeros_like(alpha), at::zeros_like(beta)};
  }
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, attention_cluster_backward);
  return kernel(grad_out.contiguous(), x.contiguous(), attn.contiguous(), norm.contiguous(),
                alpha.contiguous(), beta.contiguous(), as_int64(lengths), shift, eps, eps_sqrt);
}

// The CPU kernels with the fc1 scoring layer fused (forward: `forward` with a weight).
ClusterBackward fc1_backward_cpu(const at::Tensor& grad_out,
                                 const c10::optional<at::Tensor>& grad_attn, const at::Tensor& x,
                                 const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& out, const at::Tensor& attn,
                                 const at::Tensor& norm, const at::Tensor& alpha,
                                 const at::Tensor& beta, const c10::optional<at::Tensor>& lengths,
                                 bool shift, double eps, double eps_sqrt,
                                 std::string_view backend) {
  check_backend(backend, "cpp", "attention_cluster_fc1_backward");
  if (x.size(0) == 0) {
    return {at::zeros_like(x), at::zeros_like(weight), at::zeros_like(alpha),
            at::zeros_like(beta)};
  }
  c10::optional<at::Tensor> ga, o;
  if (grad_attn) ga = grad_attn->contiguous();
  if (out) o = out->contiguous();
  return attention_cluster_fc1_backward_cpu(
      grad_out.contiguous(), ga, x.contiguous(), weight.contiguous(), o, attn.contiguous(),
      norm.contiguous(), alpha.contiguous(), beta.contiguous(), as_int64(lengths), shift, eps,
      eps_sqrt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def("attention_cluster(Tensor x, Tensor? scores, Tensor? weight, Tensor? bias, "
        "Tensor? lengths, Tensor alpha, Tensor beta, bool shift, float eps, float eps_sqrt, "
        "str backend) -> (Tensor, Tensor, Tensor)");
  m.def("attention_cluster_backward(Tensor grad_out, Tensor x, Tensor attn, Tensor norm, "
        "Tensor alpha, Tensor beta, Tensor? lengths, bool shift, float eps, float eps_sqrt, "
        "str backend) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_cluster_fc1_backward(Tensor grad_out, Tensor? grad_attn, Tensor x, "
        "Tensor weight, Tensor? out, Tensor attn, Tensor norm, Tensor alpha, Tensor beta, "
        "Tensor? lengths, bool shift, float eps, float eps_sqrt, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("attention_cluster", &forward<false>);
  m.impl("attention_cluster_backward", &backward<false>);
  m.impl("attention_cluster_fc1_backward", &fc1_backward_cpu);
}

#ifdef ATTNPOOL_WITH_CUDA
TORCH_LIBRARY_IMPL(attnpool, CUDA, m) {
  m.impl("attention_cluster", &forward<true>);
  m.impl("attention_cluster_backward", &backward<true>);
}
#endif

}  // namespace attnpool
