// Instruction-set dispatch shared by the CPU kernels. The extension is built for baseline
// x86-64 (no -march), which leaves AVX2 and AVX-512 idle, so each kernel compiles its task
// loops once per instruction set (these target attributes; every helper force-inlined into
// them, hence vectorised for that set) and runs the one matching torch's CPU capability.
#pragma once

#include <ATen/Parallel.h>
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

// after a lambda's parameter list: inline it into each instruction set's copy of the caller
#if defined(__GNUC__)
#define ATTNPOOL_INLINE_LAMBDA __attribute__((always_inline))
#else
#define ATTNPOOL_INLINE_LAMBDA
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

// job.run<kVec>(begin, end) with kVec the SIMD register width in bytes, compiled once per
// instruction set (everything the job calls must be force-inlined into it).
template <typename Job>
void run_default(const Job& job, int64_t begin, int64_t end) {
  job.template run<16>(begin, end);
}
#if ATTNPOOL_MULTI_ISA
template <typename Job>
ATTNPOOL_TARGET_AVX2 void run_avx2(const Job& job, int64_t begin, int64_t end) {
  job.template run<32>(begin, end);
}
template <typename Job>
ATTNPOOL_TARGET_AVX512 void run_avx512(const Job& job, int64_t begin, int64_t end) {
  job.template run<64>(begin, end);
}
#endif

// A parallel_run job calling fn(i) for every item i; fn is a lambda marked
// ATTNPOOL_INLINE_LAMBDA, so it is compiled into each instruction set's copy.
template <typename Fn>
struct Tasks {
  Fn fn;
  explicit Tasks(Fn f) : fn(f) {}
  template <int>
  C10_ALWAYS_INLINE void run(int64_t begin, int64_t end) const {
    for (int64_t i = begin; i < end; ++i) fn(i);
  }
};

// The job over [0, items) on the intra-op threads, for the machine's instruction set.
// At least `grain` items per thread (fewer items run on the calling thread alone).
template <typename Job>
void parallel_run(int64_t items, int64_t grain, const Job& job) {
  void (*run)(const Job&, int64_t, int64_t) = run_default<Job>;
#if ATTNPOOL_MULTI_ISA
  if (runtime_isa() == Isa::kAvx512) run = run_avx512<Job>;
  if (runtime_isa() == Isa::kAvx2) run = run_avx2<Job>;
#endif
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { run(job, begin, end); });
}

template <typename Job>
void parallel_run(int64_t items, const Job& job) {
  parallel_run(items, 1, job);
}

}  // namespace attnpool
