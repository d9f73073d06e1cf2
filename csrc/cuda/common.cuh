// Device and launcher helpers shared by the .cu files of csrc/cuda (attention_cluster.cu,
// attentional_pooling.cu, st_regularizer.cu, pyramid_attention.cu): opmath types and conversions, warp reductions,
// index arithmetic, grid limits and the DType -> scalar type dispatch. Plain CUDA, no
// torch; nvcc only (the *_torch.cpp glue includes dtype.cuh through the launcher headers,
// never this file). Not a translation unit of its own (setup.py globs *.cu).
//
// Everything is inline (functions) or a template, so that each .cu may include it
// without unused-function warnings or duplicate symbols.
#pragma once

#include "dtype.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace attnpool {
namespace cuda_common {

// ------------------------------------------------------------------ index arithmetic
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ opmath
// Sums accumulate in opmath: float for float / half / bfloat16, double for double.
template <typename T> struct OpMath { using type = T; };
template <> struct OpMath<__half> { using type = float; };
template <> struct OpMath<__nv_bfloat16> { using type = float; };

// scalar -> opmath.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// opmath -> scalar, rounded to nearest, stored at p.
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Math in opmath (float or double overloads).
__device__ __forceinline__ float op_exp(float v) { return expf(v); }
__device__ __forceinline__ double op_exp(double v) { return exp(v); }
__device__ __forceinline__ float op_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double op_sqrt(double v) { return sqrt(v); }
__device__ __forceinline__ float op_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double op_abs(double v) { return fabs(v); }

// ------------------------------------------------------------------ warp reductions
struct SumOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
// Drops a NaN operand (a softmax still turns NaN because exp(NaN - max) is NaN).
struct MaxOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

// Butterfly over the 32 lanes, result in every lane; every lane must call it.
template <typename T, typename Op> __device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Butterfly sum over the 32 lanes, result in every lane; every lane must call it.
template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ------------------------------------------------------------------ launchers
constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit; kernels grid-stride past it

inline unsigned int grid_x(int64_t blocks) {
  return static_cast<unsigned int>(imin(blocks, kMaxGridX));
}

// Bytes of one opmath element of dtype.
inline size_t opmath_bytes(DType dtype) {
  return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
}

template <typename T> struct TypeTag { using type = T; };

// f(TypeTag<scalar_t>{}) for the scalar type of dtype (float, double, __half,
// __nv_bfloat16); cudaErrorInvalidValue for any other value.
template <typename F> cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(TypeTag<float>{});
    case DType::kFloat64: return f(TypeTag<double>{});
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_common
}  // namespace attnpool
