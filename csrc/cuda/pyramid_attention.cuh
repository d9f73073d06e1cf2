// Launchers of the fused interaction-aware pyramid attention CUDA kernels (docs/design.md "Pyramid
// attention";
// contract: csrc/attnpool.h; spec: attnpool.reference.pyramid_attention). Plain
// C++ over raw pointers and no torch include, so that pyramid_attention.cu compiles with
// nvcc alone; pyramid_attention_torch.cpp is the glue.
//
// Levels s < S, xs[s] [B, T, C_s, H_s, W_s]; Ho, Wo = H_{S-1}, W_{S-1}; n = T*Ho*Wo,
// position i = t*Ho*Wo + oh*Wo + ow; Ctot = sum C_s, level s owns channels off_s + c.
// R = torch's adaptive average pooling of every frame to Ho x Wo (windows
// [floor(o*In/Out), ceil((o+1)*In/Out)), possibly overlapping or repeating rows).
// Per sample b, with P_s = R(X_s) [C_s, n] (opmath):
//   forward:  y_s = w_s^T P_s + bias_s,  a = softmax_i(sum_s y_s),  out_s = P_s a,
//             yh_s = y_s / max(|y_s|, eps),  sig_s = sum_i yh_s,  mu_s = mean_i P_s,
//             u_s = P_s yh_s - mu_s sig_s,  G_st = yh_s . yh_t,
//             loss_b = -(1/S) sum_s |u_s|^2 / C_s + lam sum_{s != t} G_st^2,  loss = mean_b.
//   backward (gl = grad_loss / B, gz_s = grad_out[b, off_s:], kappa_s = -2 gl / (S C_s)):
//             ge = a (gz.P - a.(gz.P)),
//             gyh_s = kappa_s (u_s^T P_s - u_s.mu_s) + 4 lam gl sum_{t != s} G_st yh_t,
//             gy_s = ge + (r_s >= eps ? (gyh_s - yh_s (yh_s.gyh_s)) / r_s : gyh_s / eps),
//             grad_w_s = sum_b P_s gy_s,  grad_bias_s = sum_{b,i} gy_s,
//             grad_xs[s] = R^T dP_s,  dP_s = gz_s a^T + w_s gy_s^T + kappa_s u_s (yh_s - sig_s/n)^T
//             (rank 3, evaluated per element: never stored).
//
// Every pointer is a device buffer, contiguous, on the device current for the call.
//   "scalar" buffers are in the dtype of xs (DType); "opmath" buffers are float32, or
//   float64 for DType::kFloat64 (pooled, y, workspaces).
// Every launcher only enqueues work on `stream` and returns the launch status
// (cudaGetLastError), never synchronises. No atomics: every sum has a fixed order that
// depends on the sizes only (bitwise deterministic).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.cuh"

namespace attnpool {
namespace pyramid_attention_cuda {

using cuda_common::DType;  // kFloat32, kFloat64, kFloat16, kBFloat16

// Levels are passed to the kernels by value (pointer and size arrays of this length).
constexpr int kMaxLevels = 8;

// Sizes of the pyramid: B >= 0 (B = 0 enqueues only what writes the outputs of size
// independent of B), T >= 1, 1 <= S <= kMaxLevels, C[s], H[s], W[s] >= 1 for s < S.
// Any other value makes the launchers return cudaErrorInvalidValue.
struct PyramidShape {
  int64_t B = 0;
  int64_t T = 0;
  int S = 0;
  int64_t C[kMaxLevels] = {};
  int64_t H[kMaxLevels] = {};
  int64_t W[kMaxLevels] = {};
};

// Opmath elements of the workspace pyramid_attention_forward_launch needs: B*((S+1)*n + 1)
// (a [B, n], yh [B, S, n], per-sample losses [B]); 0 for invalid shapes.
int64_t pyramid_attention_forward_workspace_elems(DType dtype, const PyramidShape& shape);

// Forward.
//   xs[s]: S device pointers, [B, T, C_s, H_s, W_s] scalar; weights[s]: S pointers, [C_s]
//   scalar; bias [S] scalar;
//   -> out [B, Ctot] scalar, loss: one scalar element (NaN when B = 0, a mean over nothing),
//      pooled [B, Ctot, n] opmath, y [B, S, n] opmath (raw scores, bias included);
//   workspace: opmath scratch of pyramid_attention_forward_workspace_elems elements.
cudaError_t pyramid_attention_forward_launch(DType dtype, const PyramidShape& shape,
                                   const void* const* xs, const void* const* weights,
                                   const void* bias, double eps, double lam, void* out,
                                   void* loss, void* pooled, void* y, void* workspace,
                                   cudaStream_t stream);

// Opmath elements of the workspace pyramid_attention_backward_launch needs:
// B*((2S+2)*n + 2*Ctot + S); 0 for invalid shapes.
int64_t pyramid_attention_backward_workspace_elems(DType dtype, const PyramidShape& shape);

// Backward.
//   grad_out [B, Ctot] scalar; grad_loss: one scalar element, read on the device;
//   pooled [B, Ctot, n], y [B, S, n]: opmath, as the forward returned them;
//   weights[s]: S pointers, [C_s] scalar;
//   -> grad_xs[s]: S pointers, [B, T, C_s, H_s, W_s] scalar, every element written once;
//      grad_weights[s]: S pointers, [C_s] scalar; grad_bias [S] scalar (both sums over the
//      batch in a fixed order; 0 when B = 0);
//   workspace: opmath scratch of pyramid_attention_backward_workspace_elems elements.
cudaError_t pyramid_attention_backward_launch(DType dtype, const PyramidShape& shape, const void* grad_out,
                                    const void* grad_loss, const void* pooled, const void* y,
                                    const void* const* weights, double eps, double lam,
                                    void* const* grad_xs, void* const* grad_weights,
                                    void* grad_bias, void* workspace, cudaStream_t stream);

}  // namespace pyramid_attention_cuda
}  // namespace attnpool
