// Torch glue of the fused pyramid attention CUDA kernels: checks, device guard, output and
// scratch allocation, launch on the current stream. The kernels themselves
// (pyramid_attention.cu) see raw pointers only; every sum is theirs, in a fixed order.
#include <vector>

#include "cuda/pyramid_attention.cuh"
#include "cuda/torch_glue.h"

namespace attnpool {
namespace {

namespace pc = pyramid_attention_cuda;
using namespace cuda_glue;  // kernel_dtype, opmath_type, check_tensor, workspace_tensor, ...

void check_levels(size_t S) {
  TORCH_CHECK(S >= 1, "attnpool cuda: pyramid attention needs at least one level");
  TORCH_CHECK(S <= static_cast<size_t>(pc::kMaxLevels), "attnpool cuda: pyramid attention supports at most ",
              pc::kMaxLevels, " levels, got ", S);
}

// weights[s] [C_s] on device, of dtype (any strides); contiguous copies.
std::vector<at::Tensor> level_weights(const std::vector<at::Tensor>& weights_in,
                                      const pc::PyramidShape& shape, const at::Device& device,
                                      at::ScalarType dtype) {
  TORCH_CHECK(static_cast<int64_t>(weights_in.size()) == shape.S, "attnpool cuda: expected ",
              shape.S, " weights, got ", weights_in.size());
  std::vector<at::Tensor> weights;
  weights.reserve(weights_in.size());
  for (int s = 0; s < shape.S; ++s) {
    check_tensor(weights_in[s], "weights[s]", device, dtype, {shape.C[s]});
    weights.push_back(weights_in[s].contiguous());
  }
  return weights;
}

int64_t total_channels(const pc::PyramidShape& shape) {
  int64_t ctot = 0;
  for (int s = 0; s < shape.S; ++s) ctot += shape.C[s];
  return ctot;
}

}  // namespace

PyramidForward pyramid_attention_forward_cuda(const std::vector<at::Tensor>& xs_in,
                                              const std::vector<at::Tensor>& weights_in,
                                              const at::Tensor& bias_in, double eps, double lam) {
  check_levels(xs_in.size());
  const at::Tensor& x0 = xs_in[0];
  TORCH_CHECK(x0.dim() == 5, "attnpool cuda: xs[0] must be [B, T, C, H, W], got ", x0.sizes());
  const at::Device device = x0.device();
  const at::ScalarType dtype = x0.scalar_type();
  const pc::DType kdtype = kernel_dtype(dtype);

  pc::PyramidShape shape;
  shape.S = static_cast<int>(xs_in.size());
  shape.B = x0.size(0);
  shape.T = x0.size(1);
  for (int s = 0; s < shape.S; ++s) {
    const at::Tensor& x = xs_in[s];
    TORCH_CHECK(x.dim() == 5, "attnpool cuda: xs[", s, "] must be [B, T, C, H, W], got ",
                x.sizes());
    shape.C[s] = x.size(2);
    shape.H[s] = x.size(3);
    shape.W[s] = x.size(4);
    check_tensor(x, "xs[s]", device, dtype, {shape.B, shape.T, shape.C[s], shape.H[s], shape.W[s]});
  }
  TORCH_CHECK(shape.T >= 1, "attnpool cuda: xs must have T >= 1, got ", x0.sizes());
  for (int s = 0; s < shape.S; ++s)
    TORCH_CHECK(shape.C[s] >= 1 && shape.H[s] >= 1 && shape.W[s] >= 1,
                "attnpool cuda: xs[", s, "] must have C, H, W >= 1, got ", xs_in[s].sizes());
  const std::vector<at::Tensor> weights = level_weights(weights_in, shape, device, dtype);
  check_tensor(bias_in, "bias", device, dtype, {shape.S});

  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> xs;
  std::vector<const void*> x_ptrs, w_ptrs;
  for (int s = 0; s < shape.S; ++s) {
    xs.push_back(xs_in[s].contiguous());
    x_ptrs.push_back(xs.back().data_ptr());
    w_ptrs.push_back(weights[s].data_ptr());
  }
  const at::Tensor bias = bias_in.contiguous();
  const int64_t B = shape.B, S = shape.S;
  const int64_t n = shape.T * shape.H[S - 1] * shape.W[S - 1];
  const int64_t ctot = total_channels(shape);
  const auto stat = x0.options().dtype(opmath_type(dtype));
  at::Tensor out = at::empty({B, ctot}, x0.options());
  at::Tensor loss = at::empty({}, x0.options());
  at::Tensor pooled = at::empty({B, ctot, n}, stat);
  at::Tensor y = at::empty({B, S, n}, stat);
  // a, unit scores and per-sample losses (none when B = 0: loss is then NaN, a mean over nothing).
  at::Tensor workspace = workspace_tensor(pc::pyramid_attention_forward_workspace_elems(kdtype, shape), stat);
  check_launch(pc::pyramid_attention_forward_launch(kdtype, shape, x_ptrs.data(), w_ptrs.data(),
                                          bias.data_ptr(), eps, lam, out.data_ptr(),
                                          loss.data_ptr(), pooled.data_ptr(), y.data_ptr(),
                                          data_or_null(workspace), current_stream(device)),
               "pyramid_attention_forward");
  return {out, loss, pooled, y};
}

PyramidBackward pyramid_attention_backward_cuda(const at::Tensor& grad_out_in,
                                                const at::Tensor& grad_loss_in,
                                                const at::Tensor& pooled_in,
                                                const at::Tensor& y_in,
                                                const std::vector<at::Tensor>& weights_in,
                                                double eps, double lam,
                                                const std::vector<int64_t>& sizes) {
  check_levels(weights_in.size());
  const at::Device device = weights_in[0].device();
  const at::ScalarType dtype = weights_in[0].scalar_type();
  const at::ScalarType stat_type = opmath_type(dtype);
  const pc::DType kdtype = kernel_dtype(dtype);

  pc::PyramidShape shape;
  shape.S = static_cast<int>(weights_in.size());
  TORCH_CHECK(static_cast<int64_t>(sizes.size()) == 2 * shape.S, "attnpool cuda: sizes must hold ",
              2 * shape.S, " entries (H_s, W_s per level), got ", sizes.size());
  for (int s = 0; s < shape.S; ++s) {
    TORCH_CHECK(weights_in[s].dim() == 1, "attnpool cuda: weights[", s, "] must be [C], got ",
                weights_in[s].sizes());
    shape.C[s] = weights_in[s].size(0);
    shape.H[s] = sizes[2 * s];
    shape.W[s] = sizes[2 * s + 1];
    TORCH_CHECK(shape.C[s] >= 1 && shape.H[s] >= 1 && shape.W[s] >= 1, "attnpool cuda: level ", s,
                " must have C, H, W >= 1, got C = ", shape.C[s], ", H = ", shape.H[s], ", W = ",
                shape.W[s]);
  }
  const std::vector<at::Tensor> weights = level_weights(weights_in, shape, device, dtype);
  const int64_t S = shape.S;
  const int64_t ctot = total_channels(shape);
  TORCH_CHECK(y_in.dim() == 3 && y_in.size(1) == S, "attnpool cuda: y must be [B, ", S,
              ", n], got ", y_in.sizes());
  const int64_t B = y_in.size(0), n = y_in.size(2);
  const int64_t cells = shape.H[S - 1] * shape.W[S - 1];
  TORCH_CHECK(n >= 1 && n % cells == 0, "attnpool cuda: y's n = ", n,
              " is not a positive multiple of the last level's H*W = ", cells);
  shape.B = B;
  shape.T = n / cells;
  check_tensor(y_in, "y", device, stat_type, {B, S, n});
  check_tensor(pooled_in, "pooled", device, stat_type, {B, ctot, n});
  TORCH_CHECK(grad_out_in.is_floating_point(), "attnpool cuda: grad_out must be floating, got ",
              grad_out_in.scalar_type());
  check_tensor(grad_out_in, "grad_out", device, grad_out_in.scalar_type(), {B, ctot});
  TORCH_CHECK(grad_loss_in.is_floating_point(), "attnpool cuda: grad_loss must be floating, got ",
              grad_loss_in.scalar_type());
  TORCH_CHECK(grad_loss_in.numel() == 1, "attnpool cuda: grad_loss must have one element, got ",
              grad_loss_in.sizes());
  check_tensor(grad_loss_in, "grad_loss", device, grad_loss_in.scalar_type(),
               grad_loss_in.sizes());

  const c10::cuda::CUDAGuard guard(device);
  // Gradients read by the kernels on the device (no synchronisation), in the dtype of xs.
  const at::Tensor grad_out = grad_out_in.to(dtype).contiguous();
  const at::Tensor grad_loss = grad_loss_in.to(dtype).contiguous();
  const at::Tensor pooled = pooled_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const auto opts = weights[0].options();
  std::vector<at::Tensor> grad_xs, grad_ws;
  std::vector<const void*> w_ptrs;
  std::vector<void*> gx_ptrs, gw_ptrs;
  for (int s = 0; s < shape.S; ++s) {
    grad_xs.push_back(at::empty({B, shape.T, shape.C[s], shape.H[s], shape.W[s]}, opts));
    grad_ws.push_back(at::empty({shape.C[s]}, opts));
    w_ptrs.push_back(weights[s].data_ptr());
    gx_ptrs.push_back(grad_xs.back().data_ptr());
    gw_ptrs.push_back(grad_ws.back().data_ptr());
  }
  at::Tensor grad_bias = at::empty({S}, opts);
  // Per-sample vectors (a, ge, unit scores, gy, kappa u) and the per-sample grad_w /
  // grad_bias terms, summed over the batch in order by the launcher's last kernel.
  at::Tensor workspace = workspace_tensor(pc::pyramid_attention_backward_workspace_elems(kdtype, shape),
                                          opts.dtype(stat_type));
  check_launch(pc::pyramid_attention_backward_launch(kdtype, shape, grad_out.data_ptr(),
                                           grad_loss.data_ptr(), pooled.data_ptr(), y.data_ptr(),
                                           w_ptrs.data(), eps, lam, gx_ptrs.data(), gw_ptrs.data(),
                                           grad_bias.data_ptr(), data_or_null(workspace),
                                           current_stream(device)),
               "pyramid_attention_backward");
  return {grad_xs, grad_ws, grad_bias};
}

}  // namespace attnpool
