// The op attnpool::weighted_pool: x [B, C, n] pooled under given maps h [B, P, n] (the pose
// variant of attentional pooling, the masked frame means of spatio-temporal attention). Its
// schemas and compiled kernels, which share attentional pooling's (cpu/attentional_pooling.cpp,
// cuda/attentional_pooling_torch.cpp). See registration.h for what is registered where.
#include "registration.h"

namespace attnpool {
namespace {

template <bool kCuda>
at::Tensor forward(const at::Tensor& x, const at::Tensor& h, std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "weighted_pool");
  if (x.size(0) == 0) return at::empty({0, h.size(1), x.size(1)}, x.options());
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, weighted_pool_forward);
  return kernel(x, h.contiguous());
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_z, const at::Tensor& x,
                                            const at::Tensor& h, std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "weighted_pool_backward");
  if (x.size(0) == 0) return {at::zeros_like(x), at::zeros_like(h)};
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, weighted_pool_backward);
  return kernel(grad_z.contiguous(), x, h.contiguous());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def("weighted_pool(Tensor x, Tensor h, str backend) -> Tensor");
  m.def("weighted_pool_backward(Tensor grad_z, Tensor x, Tensor h, str backend) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("weighted_pool", &forward<false>);
  m.impl("weighted_pool_backward", &backward<false>);
}

#ifdef ATTNPOOL_WITH_CUDA
TORCH_LIBRARY_IMPL(attnpool, CUDA, m) {
  m.impl("weighted_pool", &forward<true>);
  m.impl("weighted_pool_backward", &backward<true>);
}
#endif

}  // namespace attnpool
