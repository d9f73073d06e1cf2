// fp32 FMA peak of one core (the compute floor of benchmarks/NOTES.md): 12 independent
// accumulator chains of register-wide FMAs, as many as two FMA pipes need to hide the latency.
//   g++ -O3 -mavx2 -mfma benchmarks/fma_peak.cpp -o /tmp/fma_avx2 && /tmp/fma_avx2
//   g++ -O3 -mavx512f -DW512 benchmarks/fma_peak.cpp -o /tmp/fma_avx512 && /tmp/fma_avx512
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#ifdef W512
typedef __m512 V; static const int lanes = 16;
#define FMA _mm512_fmadd_ps
#define SET _mm512_set1_ps
#else
typedef __m256 V; static const int lanes = 8;
#define FMA _mm256_fmadd_ps
#define SET _mm256_set1_ps
#endif
int main() {
  V a0=SET(0),a1=SET(1),a2=SET(2),a3=SET(3),a4=SET(4),a5=SET(5),a6=SET(6),a7=SET(7),a8=SET(8),a9=SET(9),a10=SET(10),a11=SET(11);
  V x = SET(1.0000001f), y = SET(1e-7f);
  const long n = 2000000000L / lanes / 12;
  auto t0 = std::chrono::steady_clock::now();
  for (long k = 0; k < n; ++k) {
    a0=FMA(a0,x,y);a1=FMA(a1,x,y);a2=FMA(a2,x,y);a3=FMA(a3,x,y);a4=FMA(a4,x,y);a5=FMA(a5,x,y);
    a6=FMA(a6,x,y);a7=FMA(a7,x,y);a8=FMA(a8,x,y);a9=FMA(a9,x,y);a10=FMA(a10,x,y);a11=FMA(a11,x,y);
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  V t = a0+a1+a2+a3+a4+a5+a6+a7+a8+a9+a10+a11;
  std::printf("%s fp32 FMA peak, 1 thread: %.0f GFLOP/s (%g)\n", lanes == 16 ? "AVX-512" : "AVX2", 2.0 * n * 12 * lanes / s / 1e9, ((float*)&t)[0]);
}
