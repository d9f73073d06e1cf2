// Module init of attnpool._C: what this build holds, for `python -m attnpool`. The ops
// themselves are registered with torch's dispatcher by csrc/<name>.cpp when the library is
// loaded (import attnpool, or torch.ops.load_library on this file); their fake kernels,
// autograd and Triton twins come from attnpool/<name>.py.
#include "attnpool.h"
#include "cpu/isa.h"

#include <torch/version.h>

#include <string>

#ifdef ATTNPOOL_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

#define ATTNPOOL_STR_(x) #x
#define ATTNPOOL_STR(x) ATTNPOOL_STR_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnpool fused kernels (CPU, and CUDA when built with it)";
  // What this build holds, for `python -m attnpool`.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
  m.attr("cpu_isas") = ATTNPOOL_MULTI_ISA ? "default, avx2, avx512" : "default";
#ifdef ATTNPOOL_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_version") = std::to_string(CUDART_VERSION / 1000) + "." +
                           std::to_string(CUDART_VERSION % 1000 / 10);
  m.attr("cuda_archs") = ATTNPOOL_STR(ATTNPOOL_CUDA_ARCHS);  // e.g. 80_90
#else
  m.attr("with_cuda") = false;
#endif
}
