// Module init of attnpool._C: what this build holds, for `python -m attnpool`. The ops
// themselves are registered with torch's dispatcher by csrc/<name>.cpp when the library is
// loaded (import attnpool, torch.ops.load_library on this file, or dlopen from a C++
// program); their fake kernels, autograd and Triton twins come from attnpool/<name>.py.
//
// Python's limited C API only, and no pybind11 anywhere in the library (setup.py builds it
// with py_limited_api, so it does not link libtorch_python): a process without Python can
// load it, as long as it never calls this function (dlopen with RTLD_LAZY binds these few
// Python functions only when called).
#include <Python.h>

#include "cpu/isa.h"

#include <torch/version.h>

#include <string>

#ifdef ATTNPOOL_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

#define ATTNPOOL_STR_(x) #x
#define ATTNPOOL_STR(x) ATTNPOOL_STR_(x)
#define ATTNPOOL_CAT_(a, b) a##b
#define ATTNPOOL_CAT(a, b) ATTNPOOL_CAT_(a, b)

extern "C" PyObject* ATTNPOOL_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, ATTNPOOL_STR(TORCH_EXTENSION_NAME),
                               "attnpool fused kernels (CPU, and CUDA when built with it)", -1,
                               nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  const std::string torch_version = std::to_string(TORCH_VERSION_MAJOR) + "." +
                                    std::to_string(TORCH_VERSION_MINOR) + "." +
                                    std::to_string(TORCH_VERSION_PATCH);
#ifdef ATTNPOOL_WITH_CUDA
  const std::string cuda_version = std::to_string(CUDART_VERSION / 1000) + "." +
                                   std::to_string(CUDART_VERSION % 1000 / 10);
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
  const bool ok =
      PyModule_AddStringConstant(m, "torch_version", torch_version.c_str()) == 0 &&
      PyModule_AddStringConstant(m, "cpu_isas",
                                 ATTNPOOL_MULTI_ISA ? "default, avx2, avx512" : "default") == 0 &&
      PyModule_AddIntConstant(m, "with_cuda", with_cuda) == 0
#ifdef ATTNPOOL_WITH_CUDA
      && PyModule_AddStringConstant(m, "cuda_version", cuda_version.c_str()) == 0 &&
      PyModule_AddStringConstant(m, "cuda_archs", ATTNPOOL_STR(ATTNPOOL_CUDA_ARCHS)) == 0  // 80_90
#endif
      ;
  if (!ok) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
