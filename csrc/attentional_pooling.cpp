// The op attnpool::attentional_pooling (docs/design.md "Attentional pooling"), its factored
// core: its schemas and its compiled kernels (CPU: cpu/attentional_pooling.cpp; CUDA:
// cuda/attentional_pooling_torch.cpp). See registration.h for what is registered where.
#include "registration.h"

namespace attnpool {
namespace {

// x [B, C, n] (the kernels read both dense layouts in place), wb [P, C], bb [P] -> z, the maps
// h, and their means over positions m [B, P] in opmath (the logits' bias term takes its
// gradient through m unrounded, not as n equal roundings in h's dtype).
template <bool kCuda>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& wb,
                                                       const at::Tensor& bb,
                                                       std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "attentional_pooling");
  const int64_t B = x.size(0), C = x.size(1), n = x.size(2), P = wb.size(0);
  const auto stat = opmath_type(x.scalar_type());
  if (B == 0) return {at::empty({0, P, C}, x.options()), at::empty({0, P, n}, x.options()),
                      at::empty({0, P}, x.options().dtype(stat))};
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, attentional_pooling_forward);
  auto [z, h] = kernel(x, wb.contiguous(), bb.contiguous());
  at::Tensor m = h.to(stat).mean(-1);
  return {z, h, m};
}

template <bool kCuda>
AttpoolBackward backward(const at::Tensor& grad_z, const at::Tensor& grad_h, const at::Tensor& x,
                         const at::Tensor& h, const at::Tensor& wb, std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "attentional_pooling_backward");
  if (x.size(0) == 0) return {at::zeros_like(x), at::zeros_like(wb), at::zeros({wb.size(0)},
                                                                              wb.options())};
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, attentional_pooling_backward);
  return kernel(grad_z.contiguous(), grad_h.contiguous(), x, h.contiguous(), wb.contiguous());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def("attentional_pooling(Tensor x, Tensor wb, Tensor bb, str backend) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("attentional_pooling_backward(Tensor grad_z, Tensor grad_h, Tensor x, Tensor h, "
        "Tensor wb, str backend) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("attentional_pooling", &forward<false>);
  m.impl("attentional_pooling_backward", &backward<false>);
}

#ifdef ATTNPOOL_WITH_CUDA
TORCH_LIBRARY_IMPL(attnpool, CUDA, m) {
  m.impl("attentional_pooling", &forward<true>);
  m.impl("attentional_pooling_backward", &backward<true>);
}
#endif

}  // namespace attnpool
