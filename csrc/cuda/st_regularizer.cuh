// Launchers of the fused spatio-temporal regulariser CUDA kernels (docs/design.md "Spatio-temporal
// attention"; contract:
// csrc/attnpool.h; spec: attnpool.reference.st_regularizer). Plain C++ over raw
// pointers and no torch include, so that st_regularizer.cu compiles with nvcc alone;
// st_regularizer_torch.cpp is the glue.
//
//   total = tv_weight * TV(mask) / (tv_mean ? max(B*T, 1) : 1)
//         + contrast_weight * sum(0.5*M*[M<0.5] - 0.5*M*[M>0.5]) / B
//         + unimodal_weight * sum_{b, t=1..T-2} r_t / (unimodal_mean ? max(B*(T-2), 1) : 1)
//   TV: sum over the maps of |vertical| + |horizontal| differences,
//   r_t = relu(w[t-1] w[t+1] - w[t]^2), sqrt(r_t) when `sqrt`.
//
// mask [B, T, H, W] and w [B, T] are contiguous device buffers of one dtype ("scalar");
// sums in opmath (float32, or float64 for kFloat64). Every launcher only enqueues work on
// `stream` and returns the launch status (cudaGetLastError), never synchronises. No atomics:
// every sum has a fixed order that depends on the sizes only (bitwise deterministic).
// Any sizes >= 0 are accepted (nothing is read when a product is 0; B = 0 gives the
// reference's NaN from the contrast's 0/0).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.cuh"

namespace attnpool {
namespace st_regularizer_cuda {

using cuda_common::DType;  // kFloat32, kFloat64, kFloat16, kBFloat16

struct StParams {
  double tv_weight = 0;
  double contrast_weight = 0;
  double unimodal_weight = 0;
  bool sqrt = true;           // r_t -> sqrt(r_t)
  bool tv_mean = false;       // TV divided by B*T
  bool unimodal_mean = true;  // U divided by B*(T-2)
};

// Opmath elements of the workspace st_regularizer_forward_launch needs: 0 (nullptr is fine) when the
// forward runs as a single block (B*T*H*W <= 65536), else 3 per block of the main kernel.
int64_t st_regularizer_forward_workspace_elems(DType dtype, int64_t B, int64_t T, int64_t H, int64_t W);

// Forward: one kernel for all three terms. total: one scalar element (a 0-dim tensor).
// Small inputs (the benchmark's 30 x 20 x 7 x 7): that single launch writes total.
// Larger ones: the main kernel writes per-block opmath partials (tv, contrast, unimodal)
// to the workspace and a one-block kernel sums them in block order and writes total.
cudaError_t st_regularizer_forward_launch(DType dtype, const void* mask, const void* w, void* total,
                              void* workspace, int64_t B, int64_t T, int64_t H, int64_t W,
                              const StParams& params, cudaStream_t stream);

// Backward: one kernel. grad_total: one scalar element (device), read by the kernel;
//   -> grad_mask [B, T, H, W], grad_w [B, T]: scalar, contiguous, every element written.
cudaError_t st_regularizer_backward_launch(DType dtype, const void* grad_total, const void* mask,
                               const void* w, void* grad_mask, void* grad_w, int64_t B,
                               int64_t T, int64_t H, int64_t W, const StParams& params,
                               cudaStream_t stream);

}  // namespace st_regularizer_cuda
}  // namespace attnpool
