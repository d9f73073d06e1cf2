// Launchers of the fused attention-cluster CUDA kernels (math: DESIGN 3.1 and
// contract in csrc/attnpool.h). Plain C++ over raw pointers and no torch
// include, so that attention_cluster.cu compiles with nvcc alone (CI compile-
// checks it on a CPU-only torch); attention_cluster_torch.cpp is the glue.
//
// Every pointer is a contiguous device buffer on the device current for the
// call; every launcher only enqueues work on `stream` and returns the launch
// status (cudaGetLastError), never synchronises.
//   "scalar" buffers are in the dtype of x (DType);
//   "opmath" buffers are float32, or float64 for DType::kFloat64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.cuh"

namespace attnpool {
namespace cluster_cuda {

using cuda_common::DType;  // kFloat32, kFloat64, kFloat16, kBFloat16

// Forward. Requires B, L, F, N >= 1 (cudaErrorInvalidValue otherwise).
//   x [B, L, F], alpha/beta [N]: scalar; scores [B, L, N] opmath;
//   lengths int64 [B] or nullptr (all frames valid); clamped to [0, L] in the kernel.
//   -> out [B, N*F] scalar, attn [B, N, L] and norm [B, N] opmath.
// alpha/beta are not read when shift is false. With shift, out = u / (sqrt(N) max(norm, eps)),
// norm = sqrt(||u||^2 + eps_sqrt) unclamped (u = alpha v + beta); ||v|| without shift.
cudaError_t cluster_pool_forward_launch(DType dtype, const void* x, const void* scores,
                                        const int64_t* lengths, const void* alpha,
                                        const void* beta, void* out, void* attn, void* norm,
                                        int64_t B, int64_t L, int64_t F, int64_t N, bool shift,
                                        double eps, double eps_sqrt, cudaStream_t stream);

// Opmath elements of the workspace cluster_pool_backward_launch needs: 0 when its
// per-unit buffers fit in shared memory (L up to about 4.9k frames in float32,
// 2.4k in float64), else B*N*L.
int64_t cluster_pool_backward_workspace_elems(DType dtype, int64_t B, int64_t L, int64_t N);

// Backward. Requires B, L, F, N >= 1.
//   grad_out [B, N*F], x [B, L, F], alpha/beta [N]: scalar; attn [B, N, L], norm [B, N]:
//   opmath, as the forward returned them; lengths as the forward's: padded frames of x are
//   never read (a NaN there reaches no gradient), and grad_x is 0 on them.
//   -> grad_x [B, L, F], grad_scores [B, L, N]: scalar;
//      grad_alpha_partial, grad_beta_partial [B, N]: opmath, per-sample terms of
//      grad_alpha / grad_beta (zero when shift is false); the caller sums them over B
//      in a fixed order (no atomics anywhere: deterministic);
//      coef [B, N, 3]: float64 scratch (whatever the dtype), per-unit coefficients of
//      dv passed between the two backward kernels;
//      workspace: opmath scratch of cluster_pool_backward_workspace_elems elements
//      (may be nullptr when that is 0).
cudaError_t cluster_pool_backward_launch(DType dtype, const void* grad_out, const void* x,
                                         const int64_t* lengths, const void* attn, const void* norm, const void* alpha,
                                         const void* beta, void* grad_x, void* grad_scores,
                                         void* grad_alpha_partial, void* grad_beta_partial,
                                         void* coef, void* workspace, int64_t B, int64_t L,
                                         int64_t F, int64_t N, bool shift, double eps,
                                         double eps_sqrt, cudaStream_t stream);

}  // namespace cluster_cuda
}  // namespace attnpool
