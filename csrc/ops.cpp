// Module init of attnpool._C: binds the fused kernels' entry points.
// Registration as torch.library custom ops (fake kernels, autograd, backend
// choice) lives in each op's file, attnpool/<name>.py (machinery: attnpool/_ops.py);
// these are the raw kernels they call.
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
  m.def("attention_cluster_forward_cpu", &attnpool::attention_cluster_forward_cpu);
  m.def("attention_cluster_backward_cpu", &attnpool::attention_cluster_backward_cpu);
  m.def("attention_cluster_fc1_forward_cpu", &attnpool::attention_cluster_fc1_forward_cpu);
  m.def("attention_cluster_fc1_backward_cpu", &attnpool::attention_cluster_fc1_backward_cpu);
  m.def("attentional_pooling_forward_cpu", &attnpool::attentional_pooling_forward_cpu);
  m.def("attentional_pooling_backward_cpu", &attnpool::attentional_pooling_backward_cpu);
  m.def("weighted_pool_forward_cpu", &attnpool::weighted_pool_forward_cpu);
  m.def("weighted_pool_backward_cpu", &attnpool::weighted_pool_backward_cpu);
  m.def("st_regularizer_forward_cpu", &attnpool::st_regularizer_forward_cpu);
  m.def("st_regularizer_backward_cpu", &attnpool::st_regularizer_backward_cpu);
  m.def("pyramid_attention_forward_cpu", &attnpool::pyramid_attention_forward_cpu);
  m.def("pyramid_attention_backward_cpu", &attnpool::pyramid_attention_backward_cpu);
#ifdef ATTNPOOL_WITH_CUDA
  m.def("attention_cluster_forward_cuda", &attnpool::attention_cluster_forward_cuda);
  m.def("attention_cluster_backward_cuda", &attnpool::attention_cluster_backward_cuda);
  m.def("attentional_pooling_forward_cuda", &attnpool::attentional_pooling_forward_cuda);
  m.def("attentional_pooling_backward_cuda", &attnpool::attentional_pooling_backward_cuda);
  m.def("weighted_pool_forward_cuda", &attnpool::weighted_pool_forward_cuda);
  m.def("weighted_pool_backward_cuda", &attnpool::weighted_pool_backward_cuda);
  m.def("st_regularizer_forward_cuda", &attnpool::st_regularizer_forward_cuda);
  m.def("st_regularizer_backward_cuda", &attnpool::st_regularizer_backward_cuda);
  m.def("pyramid_attention_forward_cuda", &attnpool::pyramid_attention_forward_cuda);
  m.def("pyramid_attention_backward_cuda", &attnpool::pyramid_attention_backward_cuda);
  m.attr("with_cuda") = true;
  m.attr("cuda_version") = std::to_string(CUDART_VERSION / 1000) + "." +
                           std::to_string(CUDART_VERSION % 1000 / 10);
  m.attr("cuda_archs") = ATTNPOOL_STR(ATTNPOOL_CUDA_ARCHS);  // e.g. 80_90
#else
  m.attr("with_cuda") = false;
#endif
}
