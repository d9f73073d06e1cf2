// Torch-side helpers shared by the CUDA glue (attention_cluster_torch.cpp,
// attentional_pooling_torch.cpp, st_regularizer_torch.cpp, pyramid_attention_torch.cpp): dtype
// mapping to the launchers' DType, input checks, workspace allocation, current
// stream and launch-status check. Host C++ with torch; the launcher headers (*.cuh) stay
// torch-free. Not a translation unit of its own (setup.py globs *_torch.cpp).
#pragma once

#include "attnpool.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/dtype.cuh"

namespace attnpool {
namespace cuda_glue {

using cuda_common::DType;

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "attnpool cuda: unsupported dtype ", t);
  }
}


// A CUDA tensor on `device` with the given dtype and shape (any strides).
inline void check_tensor(const at::Tensor& t, const char* name, const at::Device& device,
                         at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), "attnpool cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == device, "attnpool cuda: ", name, " is on ", t.device(),
              ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "attnpool cuda: ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "attnpool cuda: ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

// As check_tensor, and contiguous.
inline void check_input(const at::Tensor& t, const char* name, const at::Device& device,
                        at::ScalarType dtype, at::IntArrayRef shape) {
  check_tensor(t, name, device, dtype, shape);
  TORCH_CHECK(t.is_contiguous(), "attnpool cuda: ", name, " must be contiguous");
}

// Kernel scratch of `elems` elements (undefined when 0: the launchers take nullptr).
inline at::Tensor workspace_tensor(int64_t elems, const at::TensorOptions& options) {
  return elems > 0 ? at::empty({elems}, options) : at::Tensor();
}

inline void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

inline cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "attnpool cuda: ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace cuda_glue
}  // namespace attnpool
