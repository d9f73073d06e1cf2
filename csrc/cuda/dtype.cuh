// The element type of a launcher's "scalar" buffers, shared by every launcher header
// (attention_cluster.cuh, attentional_pooling.cuh, st_regularizer.cuh, pyramid_attention.cuh;
// each re-exports it into its own namespace). Plain C++, no CUDA and no torch include: the
// *_torch.cpp glue (host compiler) and the .cu files (nvcc) both include it.
#pragma once

namespace attnpool {
namespace cuda_common {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

}  // namespace cuda_common
}  // namespace attnpool
