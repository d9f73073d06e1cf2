// Torch glue of the attentional-pooling and weighted_pool CUDA kernels: checks, device guard, layout of x,
// output and scratch allocation, launch on the current stream, deterministic reduction of
// the grad_wb / grad_bb partials. The kernels themselves (attentional_pooling.cu) see raw
// pointers only.
#include <limits>

#include "cuda/attentional_pooling.cuh"
#include "cuda/torch_glue.h"
#include "layout.h"

namespace attnpool {
namespace {

namespace ap = attentional_pooling_cuda;
using namespace cuda_glue;  // kernel_dtype, opmath_type, check_tensor, workspace_tensor, ...

// Sizes, device and dtypes of x [B, C, n] and of the maps' tensor (wb [P, C] for the
// attentional pool, h [B, P, n] for weighted_pool; P is its dimension p_dim), after checking
// both ranks and x (the caller checks the rest). Any strides.
struct PoolInputs {
  int64_t B, C, n, P;
  at::Device device;
  at::ScalarType dtype;
  ap::DType kdtype;
};

PoolInputs pool_inputs(const at::Tensor& x_in, const at::Tensor& maps, const char* maps_name,
                       const char* maps_shape, int64_t p_dim) {
  TORCH_CHECK(x_in.dim() == 3, "attnpool cuda: x must be [B, C, n], got ", x_in.sizes());
  TORCH_CHECK(maps.dim() == (p_dim == 0 ? 2 : 3), "attnpool cuda: ", maps_name, " must be ",
              maps_shape, ", got ", maps.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1), n = x_in.size(2), P = maps.size(p_dim);
  const at::Device device = x_in.device();
  const at::ScalarType dtype = x_in.scalar_type();
  const ap::DType kdtype = kernel_dtype(dtype);
  check_tensor(x_in, "x", device, dtype, {B, C, n});
  return {B, C, n, P, device, dtype, kdtype};
}

PoolInputs attentional_pooling_inputs(const at::Tensor& x_in, const at::Tensor& wb_in) {
  return pool_inputs(x_in, wb_in, "wb", "[P, C]", 0);
}

PoolInputs weighted_pool_inputs(const at::Tensor& x_in, const at::Tensor& h_in) {
  return pool_inputs(x_in, h_in, "h", "[B, P, n]", 1);
}

// The backward's x in a layout the kernels read (see bcn_channels_last in layout.h; untouched when empty),
// and grad_x allocated in the layout the kernels write: x's (strides equal on every
// dimension of size > 1). Returns channels_last.
bool backward_layout(at::Tensor& x, at::Tensor& grad_x, int64_t B, int64_t C, int64_t n) {
  const bool channels_last = B > 0 && C > 0 && n > 0 ? bcn_channels_last(x) : false;
  grad_x = channels_last ? at::empty({B, n, C}, x.options()).transpose(1, 2)
                         : at::empty({B, C, n}, x.options());
  return channels_last;
}

}  // namespace

AttpoolForward attentional_pooling_forward_cuda(const at::Tensor& x_in, const at::Tensor& wb_in,
                                             const at::Tensor& bb_in) {
  const auto [B, C, n, P, device, dtype, kdtype] = attentional_pooling_inputs(x_in, wb_in);
  check_tensor(wb_in, "wb", device, dtype, {P, C});
  check_tensor(bb_in, "bb", device, dtype, {P});

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
  const bool channels_last = bcn_channels_last(x);
  const auto stat = x.options().dtype(opmath_type(dtype));
  at::Tensor workspace =
      workspace_tensor(ap::attentional_pooling_forward_workspace_elems(kdtype, B, C, n, P), stat);
  check_launch(ap::attentional_pooling_forward_launch(
        kdtype, x.data_ptr(), channels_last, wb.data_ptr(), bb.data_ptr(), z.data_ptr(),
        h.data_ptr(), data_or_null(workspace), B, C, n, P, current_stream(device)),
               "attentional_pooling_forward");
  return {z, h};
}

AttpoolBackward attentional_pooling_backward_cuda(const at::Tensor& grad_z_in,
                                               const at::Tensor& grad_h_in,
                                               const at::Tensor& x_in, const at::Tensor& h_in,
                                               const at::Tensor& wb_in) {
  const auto [B, C, n, P, device, dtype, kdtype] = attentional_pooling_inputs(x_in, wb_in);
  const at::ScalarType stat_type = opmath_type(dtype);
  check_tensor(wb_in, "wb", device, dtype, {P, C});
  // Gradients and h: any floating dtype, read in x's (as the CPU kernels do).
  for (const at::Tensor* t : {&grad_z_in, &grad_h_in, &h_in})
    TORCH_CHECK(t->is_floating_point(),
                "attnpool cuda: grad_z, grad_h and h must be floating, got ", t->scalar_type());
  check_tensor(grad_z_in, "grad_z", device, grad_z_in.scalar_type(), {B, P, C});
  check_tensor(grad_h_in, "grad_h", device, grad_h_in.scalar_type(), {B, P, n});
  check_tensor(h_in, "h", device, h_in.scalar_type(), {B, P, n});

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor grad_z = grad_z_in.to(dtype).contiguous();
  const at::Tensor grad_h = grad_h_in.to(stat_type).contiguous();  // read in opmath
  const at::Tensor h = h_in.to(dtype).contiguous();
  const at::Tensor wb = wb_in.contiguous();
  at::Tensor x = x_in;
  at::Tensor grad_x;
  const bool channels_last = backward_layout(x, grad_x, B, C, n);
  if (B == 0 || C == 0 || n == 0 || P == 0) {  // the caller short-circuits these already
    // dh = grad_h when there are no channels: grad_bb = sum of grad_h (0 when B or n is 0).
    return {grad_x.zero_(), at::zeros({P, C}, x.options()),
            grad_h.to(stat_type).sum(at::IntArrayRef({0, 2})).to(dtype)};
  }
  const auto stat = x.options().dtype(stat_type);
  const int64_t tiles = ap::attentional_pooling_num_tiles(n);
  // Per-(sample, tile) grad_wb / grad_bb terms (kernel output, summed below).
  at::Tensor wb_part = at::empty({B * tiles, P, C}, stat);
  at::Tensor bb_part = at::empty({B * tiles, P}, stat);
  at::Tensor workspace =
      workspace_tensor(ap::attentional_pooling_backward_workspace_elems(kdtype, B, C, n, P), stat);
  check_launch(ap::attentional_pooling_backward_launch(
        kdtype, grad_z.data_ptr(), grad_h.data_ptr(), x.data_ptr(), channels_last, h.data_ptr(),
        wb.data_ptr(), grad_x.data_ptr(), wb_part.data_ptr(), bb_part.data_ptr(),
        data_or_null(workspace), B, C, n, P, current_stream(device)),
               "attentional_pooling_backward");
  // Sum over (sample, tile) with torch's reduction (fixed order for a fixed shape:
  // deterministic), in opmath, then round once to the dtype of x.
  return {grad_x, wb_part.sum(0).to(dtype), bb_part.sum(0).to(dtype)};
}

// ------------------------------------------------------------------ weighted_pool
at::Tensor weighted_pool_forward_cuda(const at::Tensor& x_in, const at::Tensor& h_in) {
  const auto [B, C, n, P, device, dtype, kdtype] = weighted_pool_inputs(x_in, h_in);
  check_tensor(h_in, "h", device, dtype, {B, P, n});

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor z = at::empty({B, P, C}, x_in.options());
  if (B == 0 || C == 0 || n == 0 || P == 0) {  // the caller short-circuits these already
    z.fill_(std::numeric_limits<double>::quiet_NaN());  // mean over no positions (else empty)
    return z;
  }
  const at::Tensor h = h_in.contiguous();
  at::Tensor x = x_in;
  const bool channels_last = bcn_channels_last(x);
  const auto stat = x.options().dtype(opmath_type(dtype));
  at::Tensor workspace =
      workspace_tensor(ap::weighted_pool_forward_workspace_elems(kdtype, B, C, n, P), stat);
  check_launch(ap::weighted_pool_forward_launch(
        kdtype, x.data_ptr(), channels_last, h.data_ptr(), z.data_ptr(), data_or_null(workspace), B,
        C, n, P, current_stream(device)),
               "weighted_pool_forward");
  return z;
}

std::tuple<at::Tensor, at::Tensor> weighted_pool_backward_cuda(const at::Tensor& grad_z_in,
                                                               const at::Tensor& x_in,
                                                               const at::Tensor& h_in) {
  const auto [B, C, n, P, device, dtype, kdtype] = weighted_pool_inputs(x_in, h_in);
  // The gradient and h: any floating dtype, read in x's (as the CPU kernels do).
  for (const at::Tensor* t : {&grad_z_in, &h_in})
    TORCH_CHECK(t->is_floating_point(), "attnpool cuda: grad_z and h must be floating, got ",
                t->scalar_type());
  check_tensor(grad_z_in, "grad_z", device, grad_z_in.scalar_type(), {B, P, C});
  check_tensor(h_in, "h", device, h_in.scalar_type(), {B, P, n});

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor grad_z = grad_z_in.to(dtype).contiguous();
  const at::Tensor h = h_in.to(dtype).contiguous();
  at::Tensor x = x_in;
  at::Tensor grad_x;
  const bool channels_last = backward_layout(x, grad_x, B, C, n);
  at::Tensor grad_h = at::empty({B, P, n}, x.options());
  if (B == 0 || C == 0 || n == 0 || P == 0) {  // the caller short-circuits these already
    return {grad_x.zero_(), grad_h.zero_()};    // empty sums: 0
  }
  at::Tensor workspace = workspace_tensor(ap::weighted_pool_backward_workspace_elems(kdtype, B, C, n, P),
                                         x.options().dtype(opmath_type(dtype)));
  check_launch(ap::weighted_pool_backward_launch(
        kdtype, grad_z.data_ptr(), x.data_ptr(), channels_last, h.data_ptr(), grad_x.data_ptr(),
        grad_h.data_ptr(), data_or_null(workspace), B, C, n, P, current_stream(device)),
               "weighted_pool_backward");
  return {grad_x, grad_h};
}

}  // namespace attnpool
