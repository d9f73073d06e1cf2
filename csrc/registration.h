// What every op's registration file (csrc/<name>.cpp) shares: the op library's macros, the
// accumulation dtype, and the check that a compiled kernel was called with its own backend.
// Each csrc/<name>.cpp defines its op's schemas (TORCH_LIBRARY_FRAGMENT) and registers the
// CPU kernels and, in a CUDA build, the CUDA ones (TORCH_LIBRARY_IMPL); the fake kernels,
// autograd, vmap rules and the Triton twin (attnpool::<name>_triton) are registered from
// Python, in attnpool/<name>.py. The adapters here do only what every backend needs before a
// kernel: empty batches, contiguity, integer lengths; input checks happen in Python first.
#pragma once
#include "attnpool.h"

#include <torch/library.h>

#include <string_view>

namespace attnpool {

// Every op takes the backend that attnpool.backends resolved as its last argument, so that
// the choice is recorded in traced graphs; a compiled kernel accepts only its own.
inline void check_backend(std::string_view backend, std::string_view expected, const char* op) {
  TORCH_CHECK(backend == expected, "attnpool::", op, ": the ", expected,
              " kernels were called with backend '", backend, "' (the Triton kernels are the op "
              "attnpool::", op, "_triton; tensors on another device need their own backend)");
}

}  // namespace attnpool

// The entry point `name`_cpu or `name`_cuda (attnpool.h) of the device an adapter serves: an op's
// adapters are templates over kCuda, and the CUDA entry points exist only in a CUDA build.
#ifdef ATTNPOOL_WITH_CUDA
#define ATTNPOOL_KERNEL(kCuda, name) ((kCuda) ? name##_cuda : name##_cpu)
#else
#define ATTNPOOL_KERNEL(kCuda, name) (name##_cpu)
#endif
