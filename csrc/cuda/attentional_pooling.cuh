// Launchers of the fused attentional-pooling CUDA kernels (factored core, docs/design.md
// "Attentional pooling";
// contract: csrc/attnpool.h; spec: attnpool.reference.attentional_pooling_op), and of
// weighted_pool, the same pool under given maps (spec: attnpool.reference.weighted_pool).
// Plain C++ over raw pointers and no torch include, so that attentional_pooling.cu compiles
// with nvcc alone; attentional_pooling_torch.cpp is the glue.
//
//   forward:  h[b,p,i] = sum_c wb[p,c] x[b,c,i] + bb[p]      z[b,p,c] = (1/n) sum_i h[b,p,i] x[b,c,i]
//   backward: dh = grad_h + (1/n) grad_z x
//             grad_x = (1/n) grad_z^T h + wb^T dh,  grad_wb = sum_b dh x^T,  grad_bb = sum_{b,i} dh
//
// x (and grad_x) is [B, C, n], dense, in one of two layouts given by channels_last:
//   false: n-contiguous, x(b, c, i) at b*C*n + c*n + i      (NCHW features flattened)
//   true:  C-contiguous, x(b, c, i) at b*C*n + i*C + c      (channels-last)
// Every other pointer is a contiguous device buffer; all on the device current for the call.
// Every launcher only enqueues work on `stream` and returns the launch status
// (cudaGetLastError), never synchronises. No atomics anywhere: every sum has a fixed order.
//   "scalar" buffers are in the dtype of x (DType);
//   "opmath" buffers are float32, or float64 for DType::kFloat64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.cuh"

namespace attnpool {
namespace attentional_pooling_cuda {

using cuda_common::DType;  // kFloat32, kFloat64, kFloat16, kBFloat16

// Position tiles per sample (each of at most 32 positions); the kernels' unit of work is
// (sample, tile). 0 when n < 1.
int64_t attentional_pooling_num_tiles(int64_t n);

// Opmath elements of the workspace attentional_pooling_forward_launch needs (0: nullptr is fine):
// per-tile z partials when n spans several tiles, plus h staging when P is too large for
// shared memory (P > 256 in float32, 128 in float64).
int64_t attentional_pooling_forward_workspace_elems(DType dtype, int64_t B, int64_t C, int64_t n, int64_t P);

// Forward. Requires B, C, n, P >= 1 (cudaErrorInvalidValue otherwise).
//   x [B, C, n] scalar (layout: channels_last), wb [P, C], bb [P]: scalar;
//   -> z [B, P, C], h [B, P, n]: scalar (z is computed from the opmath h, not the rounded one).
//   workspace: opmath scratch of attentional_pooling_forward_workspace_elems elements.
cudaError_t attentional_pooling_forward_launch(DType dtype, const void* x, bool channels_last, const void* wb,
                                   const void* bb, void* z, void* h, void* workspace, int64_t B,
                                   int64_t C, int64_t n, int64_t P, cudaStream_t stream);

// Opmath elements of the workspace attentional_pooling_backward_launch needs: 0 unless P is too large
// for h / dh tiles in shared memory (P > 128 in float32, 64 in float64).
int64_t attentional_pooling_backward_workspace_elems(DType dtype, int64_t B, int64_t C, int64_t n, int64_t P);

// Backward. Requires B, C, n, P >= 1.
//   grad_z [B, P, C], h [B, P, n] (as the forward returned it), wb [P, C]: scalar,
//   contiguous; grad_h [B, P, n]: opmath, contiguous; x [B, C, n] scalar in the layout given by channels_last;
//   -> grad_x [B, C, n] scalar, in the same layout as x;
//      grad_wb_partial [B * T, P, C] and grad_bb_partial [B * T, P]: opmath, the terms of
//      grad_wb / grad_bb of each (sample, tile), T = attentional_pooling_num_tiles(n); the caller sums
//      them over the first dimension in a fixed order (deterministic);
//      workspace: opmath scratch of attentional_pooling_backward_workspace_elems elements.
cudaError_t attentional_pooling_backward_launch(DType dtype, const void* grad_z, const void* grad_h,
                                    const void* x, bool channels_last, const void* h,
                                    const void* wb, void* grad_x, void* grad_wb_partial,
                                    void* grad_bb_partial, void* workspace, int64_t B, int64_t C,
                                    int64_t n, int64_t P, cudaStream_t stream);

// ------------------------------------------------------------------ weighted_pool
// The attentional pool with the maps h given (no h = wb x + bb phase):
//   forward:  z[b,p,c] = (1/n) sum_i h[b,p,i] x[b,c,i]
//   backward: grad_x = (1/n) grad_z^T h,  grad_h = (1/n) grad_z x   (no reduction over b)
// Same units of work, layouts, opmath and determinism as the attentional pool.

// Opmath elements of the workspace weighted_pool_forward_launch needs (0: nullptr is fine); equal to
// attentional_pooling_forward_workspace_elems: per-tile z partials when n spans several tiles, plus h
// staging when P is too large for shared memory (P > 256 in float32, 128 in float64).
int64_t weighted_pool_forward_workspace_elems(DType dtype, int64_t B, int64_t C, int64_t n, int64_t P);

// Forward. Requires B, C, n, P >= 1 (cudaErrorInvalidValue otherwise).
//   x [B, C, n] scalar (layout: channels_last), h [B, P, n] scalar, contiguous
//   -> z [B, P, C] scalar; workspace: opmath scratch of weighted_pool_forward_workspace_elems elements.
cudaError_t weighted_pool_forward_launch(DType dtype, const void* x, bool channels_last, const void* h,
                                 void* z, void* workspace, int64_t B, int64_t C, int64_t n,
                                 int64_t P, cudaStream_t stream);

// Opmath elements of the workspace weighted_pool_backward_launch needs: 0 unless P is too large for
// the h tile in shared memory (P > 256 in float32, 128 in float64).
int64_t weighted_pool_backward_workspace_elems(DType dtype, int64_t B, int64_t C, int64_t n, int64_t P);

// Backward. Requires B, C, n, P >= 1.
//   grad_z [B, P, C], h [B, P, n]: scalar, contiguous; x [B, C, n] scalar (channels_last);
//   -> grad_x [B, C, n] scalar in x's layout, grad_h [B, P, n] scalar, contiguous;
//   workspace: opmath scratch of weighted_pool_backward_workspace_elems elements.
cudaError_t weighted_pool_backward_launch(DType dtype, const void* grad_z, const void* x,
                                  bool channels_last, const void* h, void* grad_x, void* grad_h,
                                  void* workspace, int64_t B, int64_t C, int64_t n, int64_t P,
                                  cudaStream_t stream);

}  // namespace attentional_pooling_cuda
}  // namespace attnpool
