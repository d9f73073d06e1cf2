// The op attnpool::pyramid_attention (docs/design.md "Pyramid attention"): its schemas and
// compiled kernels (CPU: cpu/pyramid_attention.cpp; CUDA: cuda/pyramid_attention_torch.cpp).
// See registration.h for what is registered where.
#include "registration.h"

namespace attnpool {
namespace {

std::vector<at::Tensor> contiguous(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// xs[s] [B, T, C_s, H_s, W_s], weights[s] [C_s], bias [S] -> out [B, sum C_s], loss (0-dim,
// batch mean), and for the backward the pooled maps [B, sum C_s, n] and scores y [B, S, n].
template <bool kCuda>
PyramidForward forward(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& weights,
                       const at::Tensor& bias, double eps, double lam, std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "pyramid_attention");
  const at::Tensor& x0 = xs.front();
  if (x0.size(0) == 0) {  // the batch mean of nothing, as torch's
    int64_t Ctot = 0;
    for (const auto& w : weights) Ctot += w.size(0);
    const at::Tensor& last = xs.back();
    const int64_t n = x0.size(1) * last.size(-2) * last.size(-1);
    const auto stat = x0.options().dtype(opmath_type(x0.scalar_type()));
    return {at::empty({0, Ctot}, x0.options()),
            at::full({}, std::numeric_limits<double>::quiet_NaN(), x0.options()),
            at::empty({0, Ctot, n}, stat),
            at::empty({0, static_cast<int64_t>(xs.size()), n}, stat)};
  }
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, pyramid_attention_forward);
  return kernel(contiguous(xs), contiguous(weights), bias.contiguous(), eps, lam);
}

// -> [grad_xs..., grad_weights..., grad_bias] (S + S + 1 tensors); sizes = [H_0, W_0, ...,
// H_{S-1}, W_{S-1}] of the inputs.
template <bool kCuda>
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& grad_loss,
                                 const at::Tensor& pooled, const at::Tensor& y,
                                 const std::vector<at::Tensor>& weights, double eps, double lam,
                                 c10::SymIntArrayRef sizes, std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "pyramid_attention_backward");
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, pyramid_attention_backward);
  std::vector<int64_t> hw;
  hw.reserve(sizes.size());
  for (const auto& s : sizes) hw.push_back(s.expect_int());
  auto [grad_xs, grad_ws, grad_bias] = kernel(grad_out.contiguous(), grad_loss, pooled.contiguous(),
                                              y.contiguous(), contiguous(weights), eps, lam, hw);
  std::vector<at::Tensor> grads = std::move(grad_xs);
  grads.insert(grads.end(), grad_ws.begin(), grad_ws.end());
  grads.push_back(grad_bias);
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def("pyramid_attention(Tensor[] xs, Tensor[] weights, Tensor bias, float eps, float lam, "
        "str backend) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("pyramid_attention_backward(Tensor grad_out, Tensor grad_loss, Tensor pooled, Tensor y, "
        "Tensor[] weights, float eps, float lam, SymInt[] sizes, str backend) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("pyramid_attention", &forward<false>);
  m.impl("pyramid_attention_backward", &backward<false>);
}

#ifdef ATTNPOOL_WITH_CUDA
TORCH_LIBRARY_IMPL(attnpool, CUDA, m) {
  m.impl("pyramid_attention", &forward<true>);
  m.impl("pyramid_attention_backward", &backward<true>);
}
#endif

}  // namespace attnpool
