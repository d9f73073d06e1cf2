// The op attnpool::st_regularizer (docs/design.md "Spatio-temporal attention"): total
// variation + contrast of the masks and unimodality of the temporal weights in one kernel. Its
// schemas and compiled kernels (CPU: cpu/st_regularizer.cpp; CUDA:
// cuda/st_regularizer_torch.cpp). See registration.h for what is registered where.
#include "registration.h"

namespace attnpool {
namespace {

template <bool kCuda>
at::Tensor forward(const at::Tensor& mask, const at::Tensor& w, double tv_weight,
                   double contrast_weight, double unimodal_weight, bool sqrt, bool tv_mean,
                   bool unimodal_mean, std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "st_regularizer");
  if (mask.size(0) == 0) return at::zeros({}, mask.options());
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, st_regularizer_forward);
  return kernel(mask.contiguous(), w.contiguous(), tv_weight, contrast_weight, unimodal_weight,
                sqrt, tv_mean, unimodal_mean);
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_total, const at::Tensor& mask,
                                            const at::Tensor& w, double tv_weight,
                                            double contrast_weight, double unimodal_weight,
                                            bool sqrt, bool tv_mean, bool unimodal_mean,
                                            std::string_view backend) {
  check_backend(backend, kCuda ? "cuda" : "cpp", "st_regularizer_backward");
  if (mask.size(0) == 0) return {at::zeros_like(mask), at::zeros_like(w)};
  constexpr auto kernel = ATTNPOOL_KERNEL(kCuda, st_regularizer_backward);
  return kernel(grad_total.contiguous(), mask.contiguous(), w.contiguous(), tv_weight,
                contrast_weight, unimodal_weight, sqrt, tv_mean, unimodal_mean);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnpool, m) {
  m.def("st_regularizer(Tensor mask, Tensor w, float tv_weight, float contrast_weight, "
        "float unimodal_weight, bool sqrt, bool tv_mean, bool unimodal_mean, str backend) "
        "-> Tensor");
  m.def("st_regularizer_backward(Tensor grad_total, Tensor mask, Tensor w, float tv_weight, "
        "float contrast_weight, float unimodal_weight, bool sqrt, bool tv_mean, "
        "bool unimodal_mean, str backend) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnpool, CPU, m) {
  m.impl("st_regularizer", &forward<false>);
  m.impl("st_regularizer_backward", &backward<false>);
}

#ifdef ATTNPOOL_WITH_CUDA
TORCH_LIBRARY_IMPL(attnpool, CUDA, m) {
  m.impl("st_regularizer", &forward<true>);
  m.impl("st_regularizer_backward", &backward<true>);
}
#endif

}  // namespace attnpool
