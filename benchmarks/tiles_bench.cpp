// The cluster's five GEMM-shaped products per sample through csrc/cpu/tiles.h, one thread,
// fp32: what the hand tiles reach, to set against the same products through torch (MKL):
//   g++ -O3 -std=c++17 -mavx2 -mfma -DKVEC=32 -Icsrc -I$(python -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])") benchmarks/tiles_bench.cpp -o /tmp/tiles_avx2
//   g++ -O3 -std=c++17 -mavx512f -mavx512vl -mavx512bw -mavx512dq -mavx2 -mfma -DKVEC=64 -Icsrc -I... benchmarks/tiles_bench.cpp -o /tmp/tiles_avx512
//   /tmp/tiles_avx2 [B L F N]      (default 32 25 1024 32; the kernels' own layouts and calls)
#include "cpu/tiles.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <type_traits>
#include <vector>

using namespace attnpool;
constexpr int kVec = KVEC;
using Tile = Tiling<kVec, float>;

template <class Fn>
double best_ms(Fn fn, int reps = 20) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double, std::milli>(
                              std::chrono::steady_clock::now() - t).count());
  }
  return best;
}

int main(int argc, char** argv) {
  const int64_t B = argc > 4 ? atoi(argv[1]) : 32, L = argc > 4 ? atoi(argv[2]) : 25,
                F = argc > 4 ? atoi(argv[3]) : 1024, N = argc > 4 ? atoi(argv[4]) : 32;
  const int64_t ldw = (N + 31) / 16 * 16;  // the kernels' padded weight^T
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  auto randn = [&](int64_t n) {
    std::vector<float> v(n);
    for (auto& e : v) e = normal(gen);
    return v;
  };
  auto x = randn(B * L * F), wt = randn(F * ldw), attn = randn(B * N * L), dvw = randn(2 * N * F),
       ca = randn(B * L * 2 * N), gs = randn(B * L * N);
  std::vector<float> scores(L * ldw), v(N * F), da(N * L), gx(B * L * F), gw(N * F);
  const double gflop = 2.0 * B * L * F * N / 1e9;
  auto report = [&](const char* name, double ms, double products) {
    std::printf("%-34s %8.3f ms %6.0f GFLOP/s\n", name, ms, products * gflop / ms * 1e3);
  };
  // Each with the kernels' tile and, on AVX-512 (where the shapes differ), the other one.
  auto scores_ms = [&](auto R, auto NV) {
    return best_ms([&] {
      for (int64_t b = 0; b < B; ++b)
        gemm<kVec, R.value, NV.value>(L, (N + Tile::kLanes - 1) / Tile::kLanes * Tile::kLanes, F,
                                      x.data() + b * L * F, F, 1, wt.data(), ldw, scores.data(),
                                      ldw, false);
    });
  };
  auto v_ms = [&](auto R, auto NV) {
    return best_ms([&] {
      for (int64_t b = 0; b < B; ++b)
        gemm<kVec, R.value, NV.value>(N, F, L, attn.data() + b * N * L, L, 1,
                                      x.data() + b * L * F, F, v.data(), F);
    });
  };
  auto grad_x_ms = [&](auto R, auto NV) {
    return best_ms([&] {
      for (int64_t b = 0; b < B; ++b)
        gemm<kVec, R.value, NV.value>(L, F, 2 * N, ca.data() + b * L * 2 * N, 2 * N, 1,
                                      dvw.data(), F, gx.data() + b * L * F, F);
    });
  };
  using Rows = std::integral_constant<int, Tile::kRows>;
  using Vecs = std::integral_constant<int, Tile::kVecs>;
  using WideRows = std::integral_constant<int, Tile::kWideRows>;
  using WideVecs = std::integral_constant<int, Tile::kWideVecs>;
  constexpr bool kOwnShapes = Tile::kWideVecs != Tile::kVecs;
  report("scores = x W^T (gemm, padded W^T)", scores_ms(Rows{}, Vecs{}), 1);
  if (kOwnShapes) report("  ... 14 x kVecs tiles", scores_ms(std::integral_constant<int, 14>{}, Vecs{}), 1);
  report("v = A x (gemm)", v_ms(Rows{}, Vecs{}), 1);
  if (kOwnShapes) report("  ... kWideRows x kWideVecs tiles", v_ms(WideRows{}, WideVecs{}), 1);
  report("da = DV x^T (dot tiles)", best_ms([&] {
    for (int64_t b = 0; b < B; ++b)
      dots<kVec, Tile::kDotRows, Tile::kDotCols>(N, L, F, dvw.data(), F, x.data() + b * L * F, F,
                                                 da.data(), L);
  }), 1);
  report("grad_x = [A^T|GS] [DV; W] (gemm)", grad_x_ms(WideRows{}, WideVecs{}), 2);
  if (kOwnShapes) report("  ... kRows x kVecs tiles", grad_x_ms(Rows{}, Vecs{}), 2);
  report("grad_w = GS^T x (gemm, K = B*L)", best_ms([&] {
    for (int64_t f0 = 0; f0 < F; f0 += 64)
      gemm<kVec, Tile::kRows, Tile::kVecs>(N, std::min<int64_t>(64, F - f0), B * L, gs.data(), 1,
                                           N, x.data() + f0, F, gw.data() + f0, F);
  }), 1);
}
