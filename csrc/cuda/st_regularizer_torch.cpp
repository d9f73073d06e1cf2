// Torch glue of the fused spatio-temporal regulariser CUDA kernels: checks, device guard,
// output and scratch allocation, launch on the current stream. The kernels themselves
// (st_regularizer.cu) see raw pointers only; every sum is theirs, in a fixed order.
#include "cuda/st_regularizer.cuh"
#include "cuda/torch_glue.h"

namespace attnpool {
namespace {

namespace st = st_regularizer_cuda;
using namespace cuda_glue;  // kernel_dtype, opmath_type, check_tensor, workspace_tensor, ...

// Sizes, device and dtypes of mask [B, T, H, W] and w [B, T], after checking both.
struct StInputs {
  int64_t B, T, H, W;
  at::Device device;
  at::ScalarType dtype;
  st::DType kdtype;
};

StInputs st_inputs(const at::Tensor& mask_in, const at::Tensor& w_in) {
  TORCH_CHECK(mask_in.dim() == 4, "attnpool cuda: mask must be [B, T, H, W], got ",
              mask_in.sizes());
  const int64_t B = mask_in.size(0), T = mask_in.size(1), H = mask_in.size(2),
                W = mask_in.size(3);
  const at::Device device = mask_in.device();
  const at::ScalarType dtype = mask_in.scalar_type();
  const st::DType kdtype = kernel_dtype(dtype);
  check_tensor(mask_in, "mask", device, dtype, {B, T, H, W});
  check_tensor(w_in, "w", device, dtype, {B, T});
  return {B, T, H, W, device, dtype, kdtype};
}

st::StParams st_params(double tv_weight, double contrast_weight, double unimodal_weight,
                       bool sqrt, bool tv_mean, bool unimodal_mean) {
  st::StParams p;
  p.tv_weight = tv_weight;
  p.contrast_weight = contrast_weight;
  p.unimodal_weight = unimodal_weight;
  p.sqrt = sqrt;
  p.tv_mean = tv_mean;
  p.unimodal_mean = unimodal_mean;
  return p;
}

}  // namespace

at::Tensor st_regularizer_forward_cuda(const at::Tensor& mask_in, const at::Tensor& w_in,
                                       double tv_weight, double contrast_weight,
                                       double unimodal_weight, bool sqrt, bool tv_mean,
                                       bool unimodal_mean) {
  const auto [B, T, H, W, device, dtype, kdtype] = st_inputs(mask_in, w_in);

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  at::Tensor total = at::empty({}, mask.options());
  // Per-block partials of the three sums when the input spans several blocks (summed by the
  // launcher's one-block finishing kernel, in block order); none for small inputs.
  at::Tensor workspace = workspace_tensor(st::st_regularizer_forward_workspace_elems(kdtype, B, T, H, W),
                                         mask.options().dtype(opmath_type(dtype)));
  // Any sizes >= 0 (B = 0: NaN, as the reference's contrast 0 / 0).
  check_launch(
      st::st_regularizer_forward_launch(kdtype, mask.data_ptr(), w.data_ptr(), total.data_ptr(),
                            data_or_null(workspace), B, T, H, W,
                            st_params(tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean,
                                      unimodal_mean),
                            current_stream(device)),
      "st_regularizer_forward");
  return total;
}

std::tuple<at::Tensor, at::Tensor> st_regularizer_backward_cuda(
    const at::Tensor& grad_total_in, const at::Tensor& mask_in, const at::Tensor& w_in,
    double tv_weight, double contrast_weight, double unimodal_weight, bool sqrt, bool tv_mean,
    bool unimodal_mean) {
  const auto [B, T, H, W, device, dtype, kdtype] = st_inputs(mask_in, w_in);
  TORCH_CHECK(grad_total_in.is_floating_point(), "attnpool cuda: grad_total must be floating, got ",
              grad_total_in.scalar_type());
  TORCH_CHECK(grad_total_in.numel() == 1, "attnpool cuda: grad_total must have one element, got ",
              grad_total_in.sizes());
  check_tensor(grad_total_in, "grad_total", device, grad_total_in.scalar_type(),
               grad_total_in.sizes());

  const c10::cuda::CUDAGuard guard(device);
  // Read by the kernel on the device (no synchronisation), in the dtype of mask.
  const at::Tensor grad_total = grad_total_in.to(dtype).contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  at::Tensor grad_mask = at::empty({B, T, H, W}, mask.options());
  at::Tensor grad_w = at::empty({B, T}, w.options());
  check_launch(
      st::st_regularizer_backward_launch(kdtype, grad_total.data_ptr(), mask.data_ptr(), w.data_ptr(),
                             grad_mask.data_ptr(), grad_w.data_ptr(), B, T, H, W,
                             st_params(tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean,
                                       unimodal_mean),
                             current_stream(device)),
      "st_regularizer_backward");
  return {grad_mask, grad_w};
}

}  // namespace attnpool
