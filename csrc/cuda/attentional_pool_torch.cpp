// Torch glue of the attentional-pooling and weighted_pool CUDA kernels: checks, device guard, layout of x,
// output and scratch allocation, launch on the current stream, deterministic reduction of
// the grad_wb / grad_bb partials. The kernels themselves (attentional_pool.cu) see raw
// pointers only.
#include "attnpool.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda/attentional_pool.cuh"

namespace attnpool {
namespace {

namespace ap = attpool_cuda;

ap::DType attpool_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ap::DType::kFloat32;
    case at::kDouble: return ap::DType::kFloat64;
    case at::kHalf: return ap::DType::kFloat16;
    case at::kBFloat16: return ap::DType::kBFloat16;
    default: TORCH_CHECK(false, "attnpool cuda: unsupported dtype ", t);
  }
}

at::ScalarType attpool_opmath_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A CUDA tensor on `device` with the given dtype and shape (any strides: the caller makes
// it contiguous, or reads it in place for x).
void attpool_check(const at::Tensor& t, const char* name, const at::Device& device,
                   at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), "attnpool cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, "attnpool cuda: ", name, " is on ", t.device(),
              ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "attnpool cuda: ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "attnpool cuda: ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

void attpool_check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "attnpool cuda: ", what, " failed: ", cudaGetErrorString(err));
}

// Strides of t equal `strides` on every dimension of size > 1.
bool attpool_strided_as(const at::Tensor& t, at::IntArrayRef strides) {
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != strides[d]) return false;
  return true;
}

// x [B, C, n] as the kernels read it in place: n-contiguous or C-contiguous (channels-last),
// else a contiguous copy. Returns channels_last. With C == 1 or n == 1 both layouts name the
// same memory; the one with the longer contiguous run is taken.
bool attpool_layout(at::Tensor& x) {
  const int64_t C = x.size(1), n = x.size(2);
  const bool nc = attpool_strided_as(x, {C * n, n, 1});
  const bool cl = attpool_strided_as(x, {C * n, 1, C});
  if (!nc && !cl) {
    x = x.contiguous();
    return false;
  }
  return cl && (!nc || C >= n);
}

}  // namespace

AttpoolForward attentional_pool_forward_cuda(const at::Tensor& x_in, const at::Tensor& wb_in,
                                             const at::Tensor& bb_in) {
  TORCH_CHECK(x_in.dim() == 3, "attnpool cuda: x must be [B, C, n], got ", x_in.sizes());
  TORCH_CHECK(wb_in.dim() == 2, "attnpool cuda: wb must be [P, C], got ", wb_in.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1), n = x_in.size(2), P = wb_in.size(0);
  const at::Device device = x_in.device();
  const at::ScalarType dtype = x_in.scalar_type();
  const ap::DType kdtype = attpool_kernel_dtype(dtype);
  attpool_check(x_in, "x", device, dtype, {B, C, n});
  attpool_check(wb_in, "wb", device, dtype, {P, C});
  attpool_check(bb_in, "bb", device, dtype, {P});

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor wb = wb_in.contiguous();
  const at::Tensor bb = bb_in.contiguous();
  at::Tensor z = at::empty({B, P, C}, x_in.options());
  at::Tensor h = at::empty({B, P, n}, x_in.options());
  if (B == 0 || C == 0 || n == 0 || P == 0) {  // the caller short-circuits these already
    h.copy_(bb.view({1, P, 1}).expand({B, P, n}));  // no channels: h = bb
    z.fill_(std::numeric_limits<double>::quiet_NaN());  // mean over no positions (else empty)
    return {z, h};
  }
  at::Tensor x = x_in;
  const bool channels_last = attpool_layout(x);
  const auto stat = x.options().dtype(attpool_opmath_type(dtype));
  const int64_t ws_elems = ap::attpool_forward_workspace_elems(kdtype, B, C, n, P);
  at::Tensor workspace = ws_elems > 0 ? at::empty({ws_elems}, stat) : at::Tensor();
  attpool_check_launch(ap::attpool_forward_launch(
                           kdtype, x.data_ptr(), channels_last, wb.data_ptr(), bb.data_ptr(),
                           z.data_ptr(), h.data_ptr(),
                           workspace.defined() ? workspace.data_ptr() : nullptr, B, C, n, P,
                           c10::cuda::getCurrentCUDAStream(device.index()).stream()),
                       "attentional_pool_forward");
  return {z, h};
}

AttpoolBackward attentional_pool_backward_cuda(const at::Tensor& grad_z_in,
                                               const at::Tensor& grad_h_in,
                                               const at::Tensor& x_in, const at::Tensor& h_in,
                                               const at::Tensor& wb_in) {
  TORCH_CHECK(x_in.dim() == 3, "attnpool cuda: x must be [B, C, n], got ", x_in.sizes());
  TORCH_CHECK(wb_in.dim() == 2, "attnpool cuda: wb must be [P, C], got ", wb_in.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1), n = x_in.size(2), P = wb_in.size(0);
  const at::Device device = x_in.device();
  const at::ScalarType dtype = x_in.scalar_type();
  const at::ScalarType stat_type = attpool_opmath_type(dtype);
  const ap::DType kdtype = attpool_kernel_dtype(dtype);
  attpool_check(x_in, "x", device, dtype, {B, C, n});
  attpool_check(wb_in, "wb", device, dtype, {P, C});
  // Gradients and h: any floating dtype, read in x's (as the CPU kernels do).
  for (const at::Tensor* t : {&grad_z_in, &grad_h_in, &h_in})
    TORCH_CHECK(t->is_floating_point(),
                "attnpool cuda: grad_z, grad_h and h must be floating, got ", t->scalar_type());
  attpool_check(grad_z_in, "grad_z", device, grad_z_in.scalar_type(), {B, P, C});
  attpool_check(grad_h_in, "grad_h", device, grad_h_in.scalar_type(), {B, P, n});
  attpool_check(h_in, "h", device, h_in.scalar_type(), {B, P, n});

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor grad_z = grad_z_in.to(dtype).contiguous();
  const at::Tensor grad_h = grad_h_in.to(stat_type).contiguous();  // read in opmath
  const at::Tensor h = h_in.to(dtype).contiguous();
  const at::Tensor wb = wb_in.contiguous();
  at::Tensor x = x_in;
  const bool channels_last = B > 0 && C > 0 && n > 0 ? attpool_layout(x) : false;
  // grad_x in the layout the kernel writes: x's (strides equal on every dimension of size > 1).
  at::Tensor grad_x = channels_last ? at::empty({B, n, C}, x.options()).transpose(1, 2)
                                    : at::empty({B, C, n}, x.options());
  if (B == 0 || C == 0 || n == 0 || P == 0) {  // the caller short-circuits these already
    // dh = grad_h when there are no channels: grad_bb = sum of grad_h (0 when B or n is 0).
    return {grad_x.zero_(), at::zeros({P, C}, x.options()),
            grad_h.to(stat_type).sum(at::IntArrayRef({0, 2})).to(dtype)};
  }
  const auto stat = x.options().dtype(stat_type);
  const int64_t tiles = ap::attpool_num_tiles(n);
  // Per-(sample, tile) grad_wb / grad_bb terms (kernel output, summed below).
  at::Tensor wb_part = at::empty({B * tiles, P, C}, stat);
  at::Tensor bb_part = at::empty({B * tiles, P}, stat);
  const int64_t ws_elems = ap::attpool_backward_workspace_elems(kdtype, B, C, n, P);
  at::Tensor workspace = ws_elems > 0 ? at::empty({ws_elems}, stat) : at::Tensor();
  attpool_check_launch(ap::attpool_backward_launch(
                           kdtype, grad_z.data_ptr(), grad_h.data_ptr(), x.data_ptr(),
                           channels_last, h.data_ptr(), wb.data_ptr(), grad_x.data_ptr(),
                           wb_part.data_ptr(), bb_part.data_ptr(),
                           workspace.defined() ? workspace.data_ptr() : nullptr, B, C, n, P,
                           c10::cuda::getCurrentCUDAStream(device.index()).stream()),
                       "attentional_pool_backward");
  // Sum over (sample, tile) with torch's reduction (fixed order for a fixed shape:
  // deterministic), in opmath, then round once to the dtype of x.
  return {grad_x, wb_part.sum(0).to(dtype), bb_part.sum(0).to(dtype)};
}

// ------------------------------------------------------------------ weighted_pool
at::Tensor weighted_pool_forward_cuda(const at::Tensor& x_in, const at::Tensor& h_in) {
  TORCH_CHECK(x_in.dim() == 3, "attnpool cuda: x must be [B, C, n], got ", x_in.sizes());
  TORCH_CHECK(h_in.dim() == 3, "attnpool cuda: h must be [B, P, n], got ", h_in.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1), n = x_in.size(2), P = h_in.size(1);
  const at::Device device = x_in.device();
  const at::ScalarType dtype = x_in.scalar_type();
  const ap::DType kdtype = attpool_kernel_dtype(dtype);
  attpool_check(x_in, "x", device, dtype, {B, C, n});
  attpool_check(h_in, "h", device, dtype, {B, P, n});

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor z = at::empty({B, P, C}, x_in.options());
  if (B == 0 || C == 0 || n == 0 || P == 0) {  // the caller short-circuits these already
    z.fill_(std::numeric_limits<double>::quiet_NaN());  // mean over no positions (else empty)
    return z;
  }
  const at::Tensor h = h_in.contiguous();
  at::Tensor x = x_in;
  const bool channels_last = attpool_layout(x);
  const auto stat = x.options().dtype(attpool_opmath_type(dtype));
  const int64_t ws_elems = ap::wpool_forward_workspace_elems(kdtype, B, C, n, P);
  at::Tensor workspace = ws_elems > 0 ? at::empty({ws_elems}, stat) : at::Tensor();
  attpool_check_launch(ap::wpool_forward_launch(
                           kdtype, x.data_ptr(), channels_last, h.data_ptr(), z.data_ptr(),
                           workspace.defined() ? workspace.data_ptr() : nullptr, B, C, n, P,
                           c10::cuda::getCurrentCUDAStream(device.index()).stream()),
                       "weighted_pool_forward");
  return z;
}

std::tuple<at::Tensor, at::Tensor> weighted_pool_backward_cuda(const at::Tensor& grad_z_in,
                                                               const at::Tensor& x_in,
                                                               const at::Tensor& h_in) {
  TORCH_CHECK(x_in.dim() == 3, "attnpool cuda: x must be [B, C, n], got ", x_in.sizes());
  TORCH_CHECK(h_in.dim() == 3, "attnpool cuda: h must be [B, P, n], got ", h_in.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1), n = x_in.size(2), P = h_in.size(1);
  const at::Device device = x_in.device();
  const at::ScalarType dtype = x_in.scalar_type();
  const ap::DType kdtype = attpool_kernel_dtype(dtype);
  attpool_check(x_in, "x", device, dtype, {B, C, n});
  // The gradient and h: any floating dtype, read in x's (as the CPU kernels do).
  for (const at::Tensor* t : {&grad_z_in, &h_in})
    TORCH_CHECK(t->is_floating_point(), "attnpool cuda: grad_z and h must be floating, got ",
                t->scalar_type());
  attpool_check(grad_z_in, "grad_z", device, grad_z_in.scalar_type(), {B, P, C});
  attpool_check(h_in, "h", device, h_in.scalar_type(), {B, P, n});

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor grad_z = grad_z_in.to(dtype).contiguous();
  const at::Tensor h = h_in.to(dtype).contiguous();
  at::Tensor x = x_in;
  const bool channels_last = B > 0 && C > 0 && n > 0 ? attpool_layout(x) : false;
  // grad_x in the layout the kernel writes: x's (strides equal on every dimension of size > 1).
  at::Tensor grad_x = channels_last ? at::empty({B, n, C}, x.options()).transpose(1, 2)
                                    : at::empty({B, C, n}, x.options());
  at::Tensor grad_h = at::empty({B, P, n}, x.options());
  if (B == 0 || C == 0 || n == 0 || P == 0) {  // the caller short-circuits these already
    return {grad_x.zero_(), grad_h.zero_()};    // empty sums: 0
  }
  const int64_t ws_elems = ap::wpool_backward_workspace_elems(kdtype, B, C, n, P);
  at::Tensor workspace = ws_elems > 0
                             ? at::empty({ws_elems}, x.options().dtype(attpool_opmath_type(dtype)))
                             : at::Tensor();
  attpool_check_launch(ap::wpool_backward_launch(
                           kdtype, grad_z.data_ptr(), x.data_ptr(), channels_last, h.data_ptr(),
                           grad_x.data_ptr(), grad_h.data_ptr(),
                           workspace.defined() ? workspace.data_ptr() : nullptr, B, C, n, P,
                           c10::cuda::getCurrentCUDAStream(device.index()).stream()),
                       "weighted_pool_backward");
  return {grad_x, grad_h};
}

}  // namespace attnpool
