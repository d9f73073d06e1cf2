// Memory layout of x [B, C, n] as the pooling kernels (attentional_pooling, weighted_pool)
// read it, shared by the CPU kernels and the CUDA glue. Its Python twin is
// attnpool/_ops.py's dense_bcn (the op makes x one of these layouts before any kernel).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace attnpool {

// The strides of t equal `strides` on every dimension of size > 1.
inline bool strided_as(const at::Tensor& t, at::IntArrayRef strides) {
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != strides[d]) return false;
  return true;
}

// x [B, C, n] as the kernels read it in place: n-contiguous (NCHW) or C-contiguous
// (channels-last), else made a contiguous copy (the op validates first, so that is only a
// safety net). Returns whether the kernels read it as channels-last. With C == 1 or n == 1
// both layouts describe the same memory; the one with the longer contiguous run is taken.
inline bool bcn_channels_last(at::Tensor& x) {
  const int64_t C = x.size(1), n = x.size(2);
  const bool nc = strided_as(x, {C * n, n, 1});
  const bool cl = strided_as(x, {C * n, 1, C});
  if (!nc && !cl) {
    x = x.contiguous();
    return false;
  }
  return cl && (!nc || C >= n);
}

}  // namespace attnpool
