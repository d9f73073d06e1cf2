// Torch glue of the fused spatio-temporal regulariser CUDA kernels: checks, device guard,
// output and scratch allocation, launch on the current stream. The kernels themselves
// (st_regularizer.cu) see raw pointers only; every sum is theirs, in a fixed order.
#include "attnpool.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/st_regularizer.cuh"

namespace attnpool {
namespace {

namespace st = st_cuda;

st::DType st_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return st::DType::kFloat32;
    case at::kDouble: return st::DType::kFloat64;
    case at::kHalf: return st::DType::kFloat16;
    case at::kBFloat16: return st::DType::kBFloat16;
    default: TORCH_CHECK(false, "attnpool cuda: unsupported dtype ", t);
  }
}

void st_check(const at::Tensor& t, const char* name, const at::Device& device,
              at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), "attnpool cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, "attnpool cuda: ", name, " is on ", t.device(),
              ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "attnpool cuda: ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "attnpool cuda: ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

void st_check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "attnpool cuda: ", what, " failed: ", cudaGetErrorString(err));
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
  TORCH_CHECK(mask_in.dim() == 4, "attnpool cuda: mask must be [B, T, H, W], got ",
              mask_in.sizes());
  const int64_t B = mask_in.size(0), T = mask_in.size(1), H = mask_in.size(2),
                W = mask_in.size(3);
  const at::Device device = mask_in.device();
  const at::ScalarType dtype = mask_in.scalar_type();
  const st::DType kdtype = st_kernel_dtype(dtype);
  st_check(mask_in, "mask", device, dtype, {B, T, H, W});
  st_check(w_in, "w", device, dtype, {B, T});

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  at::Tensor total = at::empty({}, mask.options());
  // Per-block partials of the three sums when the input spans several blocks (summed by the
  // launcher's one-block finishing kernel, in block order); none for small inputs.
  const int64_t ws_elems = st::st_forward_workspace_elems(kdtype, B, T, H, W);
  at::Tensor workspace =
      ws_elems > 0 ? at::empty({ws_elems}, mask.options().dtype(
                                               dtype == at::kDouble ? at::kDouble : at::kFloat))
                   : at::Tensor();
  // Any sizes >= 0 (B = 0: NaN, as the reference's contrast 0 / 0).
  st_check_launch(
      st::st_forward_launch(kdtype, mask.data_ptr(), w.data_ptr(), total.data_ptr(),
                            workspace.defined() ? workspace.data_ptr() : nullptr, B, T, H, W,
                            st_params(tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean,
                                      unimodal_mean),
                            c10::cuda::getCurrentCUDAStream(device.index()).stream()),
      "st_regularizer_forward");
  return total;
}

std::tuple<at::Tensor, at::Tensor> st_regularizer_backward_cuda(
    const at::Tensor& grad_total_in, const at::Tensor& mask_in, const at::Tensor& w_in,
    double tv_weight, double contrast_weight, double unimodal_weight, bool sqrt, bool tv_mean,
    bool unimodal_mean) {
  TORCH_CHECK(mask_in.dim() == 4, "attnpool cuda: mask must be [B, T, H, W], got ",
              mask_in.sizes());
  const int64_t B = mask_in.size(0), T = mask_in.size(1), H = mask_in.size(2),
                W = mask_in.size(3);
  const at::Device device = mask_in.device();
  const at::ScalarType dtype = mask_in.scalar_type();
  const st::DType kdtype = st_kernel_dtype(dtype);
  st_check(mask_in, "mask", device, dtype, {B, T, H, W});
  st_check(w_in, "w", device, dtype, {B, T});
  TORCH_CHECK(grad_total_in.is_floating_point(), "attnpool cuda: grad_total must be floating, got ",
              grad_total_in.scalar_type());
  TORCH_CHECK(grad_total_in.numel() == 1, "attnpool cuda: grad_total must have one element, got ",
              grad_total_in.sizes());
  st_check(grad_total_in, "grad_total", device, grad_total_in.scalar_type(),
           grad_total_in.sizes());

  const c10::cuda::CUDAGuard guard(device);
  // Read by the kernel on the device (no synchronisation), in the dtype of mask.
  const at::Tensor grad_total = grad_total_in.to(dtype).contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  at::Tensor grad_mask = at::empty({B, T, H, W}, mask.options());
  at::Tensor grad_w = at::empty({B, T}, w.options());
  st_check_launch(
      st::st_backward_launch(kdtype, grad_total.data_ptr(), mask.data_ptr(), w.data_ptr(),
                             grad_mask.data_ptr(), grad_w.data_ptr(), B, T, H, W,
                             st_params(tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean,
                                       unimodal_mean),
                             c10::cuda::getCurrentCUDAStream(device.index()).stream()),
      "st_regularizer_backward");
  return {grad_mask, grad_w};
}

}  // namespace attnpool
