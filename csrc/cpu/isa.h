// Instruction-set dispatch shared by the CPU kernels. The extension is built for baseline
// x86-64 (no -march), which leaves AVX2 and AVX-512 idle, so each kernel compiles its task
// loops once per instruction set (these target attributes; every helper force-inlined into
// them, hence vectorised for that set) and runs the one matching torch's CPU capability.
#pragma once

#include <ATen/Version.h>

#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#define ATTNPOOL_MULTI_ISA 1
#define ATTNPOOL_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ATTNPOOL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#else
#define ATTNPOOL_MULTI_ISA 0
#endif

namespace attnpool {

enum class Isa { kDefault, kAvx2, kAvx512 };

// torch's choice, so ATEN_CPU_CAPABILITY=default|avx2 also applies here.
inline Isa runtime_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX512" ? Isa::kAvx512 : cap == "AVX2" ? Isa::kAvx2 : Isa::kDefault;
  }();
  return isa;
}

}  // namespace attnpool
