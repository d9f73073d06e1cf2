// extern "C" entry points over the launchers of csrc/cuda (their C++ signatures take enum
// classes, bool and structs by reference), for ctypes. dtype: 0 float32, 1 float64,
// 2 float16, 3 bfloat16 (DType's order). Every launcher returns its cudaError_t as an int;
// cuda_emu_last_message() (cuda_emu_runtime.cpp) says what failed.
#include <cstdint>

#include "attention_cluster.cuh"
#include "attentional_pooling.cuh"
#include "pyramid_attention.cuh"
#include "st_regularizer.cuh"

namespace {
using attnpool::cuda_common::DType;
DType dt(int d) { return static_cast<DType>(d); }
}  // namespace

extern "C" {

// ------------------------------------------------------------------ attention cluster
int emu_attention_cluster_forward(int dtype, const void* x, const void* scores, const int64_t* lengths,
                        const void* alpha, const void* beta, void* out, void* attn, void* norm,
                        int64_t B, int64_t L, int64_t F, int64_t N, int shift, double eps,
                        double eps_sqrt) {
  return attnpool::attention_cluster_cuda::attention_cluster_forward_launch(dt(dtype), x, scores, lengths, alpha,
                                                            beta, out, attn, norm, B, L, F, N,
                                                            shift != 0, eps, eps_sqrt, nullptr);
}

int64_t emu_attention_cluster_backward_workspace_elems(int dtype, int64_t B, int64_t L, int64_t N) {
  return attnpool::attention_cluster_cuda::attention_cluster_backward_workspace_elems(dt(dtype), B, L, N);
}

int emu_attention_cluster_backward(int dtype, const void* grad_out, const void* x, const int64_t* lengths,
                         const void* attn, const void* norm, const void* alpha, const void* beta,
                         void* grad_x, void* grad_scores, void* grad_alpha_partial,
                         void* grad_beta_partial, void* coef, void* workspace, int64_t B,
                         int64_t L, int64_t F, int64_t N, int shift, double eps,
                         double eps_sqrt) {
  return attnpool::attention_cluster_cuda::attention_cluster_backward_launch(
      dt(dtype), grad_out, x, lengths, attn, norm, alpha, beta, grad_x, grad_scores,
      grad_alpha_partial, grad_beta_partial, coef, workspace, B, L, F, N, shift != 0, eps,
      eps_sqrt, nullptr);
}

// ------------------------------------------------------------------ attentional pool
int64_t emu_attentional_pooling_num_tiles(int64_t n) { return attnpool::attentional_pooling_cuda::attentional_pooling_num_tiles(n); }

int64_t emu_attentional_pooling_forward_workspace_elems(int dtype, int64_t B, int64_t C, int64_t n,
                                            int64_t P) {
  return attnpool::attentional_pooling_cuda::attentional_pooling_forward_workspace_elems(dt(dtype), B, C, n, P);
}

int64_t emu_attentional_pooling_backward_workspace_elems(int dtype, int64_t B, int64_t C, int64_t n,
                                             int64_t P) {
  return attnpool::attentional_pooling_cuda::attentional_pooling_backward_workspace_elems(dt(dtype), B, C, n, P);
}

int emu_attentional_pooling_forward(int dtype, const void* x, int channels_last, const void* wb,
                        const void* bb, void* z, void* h, void* workspace, int64_t B, int64_t C,
                        int64_t n, int64_t P) {
  return attnpool::attentional_pooling_cuda::attentional_pooling_forward_launch(dt(dtype), x, channels_last != 0, wb, bb,
                                                       z, h, workspace, B, C, n, P, nullptr);
}

int emu_attentional_pooling_backward(int dtype, const void* grad_z, const void* grad_h, const void* x,
                         int channels_last, const void* h, const void* wb, void* grad_x,
                         void* grad_wb_partial, void* grad_bb_partial, void* workspace, int64_t B,
                         int64_t C, int64_t n, int64_t P) {
  return attnpool::attentional_pooling_cuda::attentional_pooling_backward_launch(
      dt(dtype), grad_z, grad_h, x, channels_last != 0, h, wb, grad_x, grad_wb_partial,
      grad_bb_partial, workspace, B, C, n, P, nullptr);
}

int64_t emu_weighted_pool_forward_workspace_elems(int dtype, int64_t B, int64_t C, int64_t n, int64_t P) {
  return attnpool::attentional_pooling_cuda::weighted_pool_forward_workspace_elems(dt(dtype), B, C, n, P);
}

int64_t emu_weighted_pool_backward_workspace_elems(int dtype, int64_t B, int64_t C, int64_t n,
                                           int64_t P) {
  return attnpool::attentional_pooling_cuda::weighted_pool_backward_workspace_elems(dt(dtype), B, C, n, P);
}

int emu_weighted_pool_forward(int dtype, const void* x, int channels_last, const void* h, void* z,
                      void* workspace, int64_t B, int64_t C, int64_t n, int64_t P) {
  return attnpool::attentional_pooling_cuda::weighted_pool_forward_launch(dt(dtype), x, channels_last != 0, h, z,
                                                     workspace, B, C, n, P, nullptr);
}

int emu_weighted_pool_backward(int dtype, const void* grad_z, const void* x, int channels_last,
                       const void* h, void* grad_x, void* grad_h, void* workspace, int64_t B,
                       int64_t C, int64_t n, int64_t P) {
  return attnpool::attentional_pooling_cuda::weighted_pool_backward_launch(dt(dtype), grad_z, x, channels_last != 0,
                                                      h, grad_x, grad_h, workspace, B, C, n, P,
                                                      nullptr);
}

// ------------------------------------------------------------------ st regulariser
namespace {
attnpool::st_regularizer_cuda::StParams st_params(double tv_weight, double contrast_weight,
                                      double unimodal_weight, int sqrt, int tv_mean,
                                      int unimodal_mean) {
  attnpool::st_regularizer_cuda::StParams p;
  p.tv_weight = tv_weight;
  p.contrast_weight = contrast_weight;
  p.unimodal_weight = unimodal_weight;
  p.sqrt = sqrt != 0;
  p.tv_mean = tv_mean != 0;
  p.unimodal_mean = unimodal_mean != 0;
  return p;
}
}  // namespace

int64_t emu_st_regularizer_forward_workspace_elems(int dtype, int64_t B, int64_t T, int64_t H, int64_t W) {
  return attnpool::st_regularizer_cuda::st_regularizer_forward_workspace_elems(dt(dtype), B, T, H, W);
}

int emu_st_regularizer_forward(int dtype, const void* mask, const void* w, void* total, void* workspace,
                   int64_t B, int64_t T, int64_t H, int64_t W, double tv_weight,
                   double contrast_weight, double unimodal_weight, int sqrt, int tv_mean,
                   int unimodal_mean) {
  return attnpool::st_regularizer_cuda::st_regularizer_forward_launch(
      dt(dtype), mask, w, total, workspace, B, T, H, W,
      st_params(tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean, unimodal_mean),
      nullptr);
}

int emu_st_regularizer_backward(int dtype, const void* grad_total, const void* mask, const void* w,
                    void* grad_mask, void* grad_w, int64_t B, int64_t T, int64_t H, int64_t W,
                    double tv_weight, double contrast_weight, double unimodal_weight, int sqrt,
                    int tv_mean, int unimodal_mean) {
  return attnpool::st_regularizer_cuda::st_regularizer_backward_launch(
      dt(dtype), grad_total, mask, w, grad_mask, grad_w, B, T, H, W,
      st_params(tv_weight, contrast_weight, unimodal_weight, sqrt, tv_mean, unimodal_mean),
      nullptr);
}

// ------------------------------------------------------------------ pyramid attention
namespace {
attnpool::pyramid_attention_cuda::PyramidShape pyr_shape(int64_t B, int64_t T, int S, const int64_t* C,
                                               const int64_t* H, const int64_t* W) {
  attnpool::pyramid_attention_cuda::PyramidShape p;
  p.B = B;
  p.T = T;
  p.S = S;
  for (int s = 0; s < S && s < attnpool::pyramid_attention_cuda::kMaxLevels; ++s) {
    p.C[s] = C[s];
    p.H[s] = H[s];
    p.W[s] = W[s];
  }
  return p;
}
}  // namespace

int64_t emu_pyramid_attention_forward_workspace_elems(int dtype, int64_t B, int64_t T, int S,
                                            const int64_t* C, const int64_t* H,
                                            const int64_t* W) {
  return attnpool::pyramid_attention_cuda::pyramid_attention_forward_workspace_elems(dt(dtype),
                                                                 pyr_shape(B, T, S, C, H, W));
}

int64_t emu_pyramid_attention_backward_workspace_elems(int dtype, int64_t B, int64_t T, int S,
                                             const int64_t* C, const int64_t* H,
                                             const int64_t* W) {
  return attnpool::pyramid_attention_cuda::pyramid_attention_backward_workspace_elems(dt(dtype),
                                                                  pyr_shape(B, T, S, C, H, W));
}

int emu_pyramid_attention_forward(int dtype, int64_t B, int64_t T, int S, const int64_t* C,
                        const int64_t* H, const int64_t* W, const void* const* xs,
                        const void* const* weights, const void* bias, double eps, double lam,
                        void* out, void* loss, void* pooled, void* y, void* workspace) {
  return attnpool::pyramid_attention_cuda::pyramid_attention_forward_launch(dt(dtype), pyr_shape(B, T, S, C, H, W),
                                                       xs, weights, bias, eps, lam, out, loss,
                                                       pooled, y, workspace, nullptr);
}

int emu_pyramid_attention_backward(int dtype, int64_t B, int64_t T, int S, const int64_t* C,
                         const int64_t* H, const int64_t* W, const void* grad_out,
                         const void* grad_loss, const void* pooled, const void* y,
                         const void* const* weights, double eps, double lam,
                         void* const* grad_xs, void* const* grad_weights, void* grad_bias,
                         void* workspace) {
  return attnpool::pyramid_attention_cuda::pyramid_attention_backward_launch(
      dt(dtype), pyr_shape(B, T, S, C, H, W), grad_out, grad_loss, pooled, y, weights, eps, lam,
      grad_xs, grad_weights, grad_bias, workspace, nullptr);
}

}  // extern "C"
