// CUDA device emulation for the host compiler (g++ >= 9, C++17): lets the unmodified
// csrc/cuda/*.cu kernels and launchers compile as plain C++ and run on the CPU, as nvcc's old
// device-emulation mode did. See README.md in this directory for how it works and its limits.
//
// Included in place of <cuda_runtime.h>, <cuda_runtime_api.h>, <cuda_fp16.h> and
// <cuda_bf16.h> (shim headers on the include path). The `<<<grid, block, smem, stream>>>`
// launches and the `extern __shared__` declarations are rewritten by transform.py into calls
// of ::cuda_emu::launch and ::cuda_emu::dynamic_smem; everything else is the sources' own text.
//
// Execution model: a launch runs its blocks one after another on the calling thread; each CUDA
// thread of a block is a fiber (own stack, cooperative switching) scheduled round-robin in
// thread order. A fiber runs until it reaches a barrier (__syncthreads, a warp shuffle,
// __syncwarp) or returns; __syncthreads releases once every live thread of the block arrived,
// a shuffle once every lane of the warp did. A barrier nobody can release (a __syncthreads
// under divergent control flow, lanes of a warp at different shuffles) is reported as a
// launch failure instead of hanging. The runtime is cuda_emu_runtime.cpp (one per library).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static shared memory: one object per kernel (or device function) instantiation and host
// thread; blocks run one after another on one host thread, so it is per-block storage. (Not
// cleared between blocks, as on the GPU; see README for what that cannot catch.)
#define __shared__ static thread_local
#define __constant__ static
// __restrict__ is a g++ keyword already.

// ------------------------------------------------------------------ runtime types
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef enum cudaError cudaError_t;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

constexpr int warpSize = 32;

namespace cuda_emu {
namespace detail {

enum class State : int { kRunnable, kWaitBlock, kWaitWarp, kDone };

struct Thread {
  void* sp;        // saved stack pointer while suspended
  uint3 idx;       // threadIdx
  int linear;      // x + y*bx + z*bx*by
  int lane, warp;  // linear % 32, linear / 32
  State state;
  uint64_t wait_gen;  // generation of the barrier waited on
  uint32_t shfl_seq;  // shuffles executed by this thread
};

struct Block;

// The emulated thread running now and its block (per host thread).
extern thread_local Thread* tl_thread;
extern thread_local Block* tl_block;

struct BlockGeom {
  dim3 grid, block;
  uint3 block_idx;
};
extern thread_local BlockGeom tl_geom;

[[noreturn]] void outside_kernel(const char* what);

inline Thread* current() {
  Thread* t = tl_thread;
  if (t == nullptr) outside_kernel("threadIdx");
  return t;
}

void syncthreads();
void syncwarp(unsigned int mask);
// One warp exchange: publishes `bytes` bytes of `value`, waits for every lane of the warp,
// copies lane src's value to out. Checks that all lanes take part (full mask, no exited lane)
// and reach their n-th shuffle together.
void shfl_exchange(unsigned int mask, const void* value, void* out, size_t bytes, int src_lane,
                   const char* what);
unsigned char* dynamic_smem_ptr();

using Entry = void (*)(void*);
cudaError_t launch_raw(const char* kernel, const char* file, int line, dim3 grid, dim3 block,
                       size_t smem, cudaStream_t stream, Entry entry, void* ctx);

template <typename T> inline T shfl_common(unsigned int mask, T var, int src, const char* what) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16,
                "shuffles of trivially copyable types of at most 16 bytes");
  T out;
  shfl_exchange(mask, &var, &out, sizeof(T), src, what);
  return out;
}

inline int segment_base(int lane, int width) { return lane - lane % width; }

}  // namespace detail

// Base pointer of the launch's dynamic shared memory (the `extern __shared__` array).
template <typename T = unsigned char> inline T* dynamic_smem() {
  return reinterpret_cast<T*>(detail::dynamic_smem_ptr());
}

// kernel<<<grid, block, smem, stream>>>(args...) becomes
// launch(name, file, line, grid, block, smem, stream, [&](auto&&... a) { kernel(a...); }, args...):
// the arguments are evaluated once, copied (decayed) as CUDA copies kernel parameters, and
// every emulated thread calls the kernel with them (implicit conversions and default arguments
// apply as in the original call). Synchronous: returns when every block ran.
template <typename F, typename... Args>
inline void launch(const char* kernel, const char* file, int line, dim3 grid, dim3 block,
                   size_t smem, cudaStream_t stream, F&& call, Args&&... args) {
  struct Ctx {
    std::decay_t<F> call;
    std::tuple<std::decay_t<Args>...> args;
  };
  Ctx ctx{std::forward<F>(call), std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...)};
  detail::launch_raw(
      kernel, file, line, grid, block, smem, stream,
      [](void* p) {
        Ctx* c = static_cast<Ctx*>(p);
        std::apply(c->call, c->args);
      },
      &ctx);
}

}  // namespace cuda_emu

// ------------------------------------------------------------------ built-in variables
#define threadIdx (::cuda_emu::detail::current()->idx)
#define blockIdx (::cuda_emu::detail::tl_geom.block_idx)
#define blockDim (::cuda_emu::detail::tl_geom.block)
#define gridDim (::cuda_emu::detail::tl_geom.grid)

// ------------------------------------------------------------------ runtime API
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

// ------------------------------------------------------------------ barriers and warps
inline void __syncthreads() { ::cuda_emu::detail::syncthreads(); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { ::cuda_emu::detail::syncwarp(mask); }

template <typename T> inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask,
                                               int width = 32) {
  const int lane = ::cuda_emu::detail::current()->lane;
  int src = lane ^ lane_mask;
  if (src >= ::cuda_emu::detail::segment_base(lane, width) + width) src = lane;
  return ::cuda_emu::detail::shfl_common(mask, var, src, "__shfl_xor_sync");
}

template <typename T> inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta,
                                                int width = 32) {
  const int lane = ::cuda_emu::detail::current()->lane;
  int src = lane + static_cast<int>(delta);
  if (src >= ::cuda_emu::detail::segment_base(lane, width) + width) src = lane;
  return ::cuda_emu::detail::shfl_common(mask, var, src, "__shfl_down_sync");
}

template <typename T> inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta,
                                              int width = 32) {
  const int lane = ::cuda_emu::detail::current()->lane;
  int src = lane - static_cast<int>(delta);
  if (src < ::cuda_emu::detail::segment_base(lane, width)) src = lane;
  return ::cuda_emu::detail::shfl_common(mask, var, src, "__shfl_up_sync");
}

template <typename T> inline T __shfl_sync(unsigned int mask, T var, int src_lane,
                                           int width = 32) {
  const int lane = ::cuda_emu::detail::current()->lane;
  const int src = ::cuda_emu::detail::segment_base(lane, width) + (src_lane % width);
  return ::cuda_emu::detail::shfl_common(mask, var, src, "__shfl_sync");
}

// ------------------------------------------------------------------ rounded arithmetic
// Separate IEEE operations (the library is built with -ffp-contract=off: nothing fuses).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }

// ------------------------------------------------------------------ __half / __nv_bfloat16
namespace cuda_emu {
namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float -> binary16, round to nearest even; NaN -> the canonical 0x7fff (as CUDA's).
inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (ax < 0x38800000u) {  // below 2^-14: subnormal (or zero), units of 2^-24
    const float scaled = bits_float(ax) * 16777216.0f;  // exact
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));  // ties to even
    return static_cast<uint16_t>(sign | m);  // m == 1024 is the smallest normal, correctly
  }
  const uint32_t r = ax + 0x0fffu + ((ax >> 13) & 1u);  // ties to even on the 13 dropped bits
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// float -> bfloat16, round to nearest even; NaN -> the canonical 0x7fff (as CUDA's).
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace detail
}  // namespace cuda_emu

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

// Storage types with the conversions of cuda_fp16.h / cuda_bf16.h (trivial default
// constructor, so that they live in arrays and device buffers as the 2-byte values).
struct __half {
  unsigned short __x;
  __half() = default;
  __half(__half_raw r) : __x(r.x) {}
  __half(float f) : __x(::cuda_emu::detail::float_to_half_bits(f)) {}
  operator float() const { return ::cuda_emu::detail::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(::cuda_emu::detail::float_to_bf16_bits(f)) {}
  operator float() const { return ::cuda_emu::detail::bf16_bits_to_float(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "2-byte storage types");
static_assert(std::is_trivial<__half>::value && std::is_trivial<__nv_bfloat16>::value,
              "trivial storage types");

inline float __half2float(__half h) { return ::cuda_emu::detail::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) {
  return __half_raw{::cuda_emu::detail::float_to_half_bits(f)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) {
  return ::cuda_emu::detail::bf16_bits_to_float(b.__x);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16_raw{::cuda_emu::detail::float_to_bf16_bits(f)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
