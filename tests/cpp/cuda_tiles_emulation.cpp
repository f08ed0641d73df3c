// Runs the index arithmetic of the CUDA gram_hadamard kernel on the CPU.
//
// For random problems (every mode, positions, outputs, symmetric or not) it
// walks the kernel's 1-D grid of tile pairs with tiles::tile_of_block, computes
// each tile element as the kernel does (operand addressing with row_div and
// offsets, out_index and its mirror) and compares the result with a naive
// loop over the definition. Exit status 0 means every case matched.
#include "cuda/gram_hadamard_tiles.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace lazykernel::tiles;

namespace {

constexpr int64_t BM = 64;  // must match gram_hadamard_cuda.cu
constexpr int64_t BN = 64;

struct Operand {
  const double* data;
  int64_t stride, offset, row_div;
  double at(int64_t r, int64_t k) const { return data[(r / row_div) * stride + offset + k]; }
};

int check_problem(std::mt19937& rng, int mode) {
  std::uniform_real_distribution<double> uniform(-1, 1);
  const int64_t n1 = 1 + rng() % 150, T = 1 + rng() % 3, O = 1 + rng() % 4;
  const int64_t K = 1 + rng() % 20, D = 1 + rng() % 20;
  const bool symmetric = rng() % 2;
  const int64_t n2 = symmetric ? n1 : 1 + rng() % 150;
  std::vector<double> A1(n1 * T * K), A2(n2 * T * K), G1(n1 * T * O * D), G2(n2 * T * O * D);
  for (auto* v : {&A1, &A2, &G1, &G2})
    for (auto& x : *v) x = uniform(rng);
  if (symmetric) A2 = A1, G2 = G1;
  const int64_t cell = mode == kTrace ? 1 : mode == kDiagonal ? O : O * O;
  std::vector<double> out(n1 * n2 * cell, 0), expected(n1 * n2 * cell, 0);

  for (int64_t i = 0; i < n1; i++)
    for (int64_t j = 0; j < n2; j++)
      for (int64_t t = 0; t < T; t++)
        for (int64_t s = 0; s < T; s++) {
          double S = 0;
          for (int64_t k = 0; k < K; k++) S += A1[(i * T + t) * K + k] * A2[(j * T + s) * K + k];
          for (int64_t o = 0; o < O; o++)
            for (int64_t p = 0; p < O; p++) {
              if (mode != kFull && o != p) continue;
              double U = 0;
              for (int64_t d = 0; d < D; d++)
                U += G1[((i * T + t) * O + o) * D + d] * G2[((j * T + s) * O + p) * D + d];
              const int64_t index = mode == kTrace      ? i * n2 + j
                                    : mode == kDiagonal ? (i * n2 + j) * O + o
                                                        : ((i * n2 + j) * O + o) * O + p;
              expected[index] += S * U;
            }
        }

  const bool full = mode == kFull;
  const int64_t per_sample = full ? T * O : T;
  const int64_t rows = n1 * per_sample, cols = n2 * per_sample;
  const int64_t row_tiles = (rows + BM - 1) / BM, col_tiles = (cols + BN - 1) / BN;
  const Operand a1{A1.data(), K, 0, full ? O : 1}, a2{A2.data(), K, 0, full ? O : 1};
  const int64_t g_depth = mode == kTrace ? O * D : D;
  const int64_t g_stride = full ? D : O * D;
  const int64_t g_output_stride = mode == kDiagonal ? D : 0;
  const int64_t z_count = mode == kDiagonal ? O : 1;
  const int64_t pairs = tile_pairs(row_tiles, col_tiles, symmetric);
  int failures = 0;
  for (int64_t z = 0; z < z_count; z++) {
    const Operand g1{G1.data(), g_stride, z * g_output_stride, 1};
    const Operand g2{G2.data(), g_stride, z * g_output_stride, 1};
    for (int64_t block = 0; block < pairs + 2; block++) {
      int64_t R, C;
      const bool inside = tile_of_block(block, row_tiles, col_tiles, symmetric, &R, &C);
      if (inside != (block < pairs)) {
        std::printf("block %lld of %lld: tile_of_block says %d\n", (long long)block,
                    (long long)pairs, inside);
        failures++;
      }
      if (!inside) continue;
      const bool mirror = symmetric && R != C;
      for (int64_t r = R * BM; r < std::min(rows, (R + 1) * BM); r++)
        for (int64_t c = C * BN; c < std::min(cols, (C + 1) * BN); c++) {
          double S = 0, U = 0;
          for (int64_t k = 0; k < K; k++) S += a1.at(r, k) * a2.at(c, k);
          for (int64_t k = 0; k < g_depth; k++) U += g1.at(r, k) * g2.at(c, k);
          const OutIndex index = out_index(mode, r, c, T, O, n2, z);
          out[index.direct] += S * U;
          if (mirror) out[index.mirrored] += S * U;
        }
    }
  }
  double error = 0, scale = 1e-30;
  for (size_t q = 0; q < out.size(); q++) {
    error = std::max(error, std::fabs(out[q] - expected[q]));
    scale = std::max(scale, std::fabs(expected[q]));
  }
  if (error > 1e-10 * scale) {
    std::printf("mode %d n1 %lld n2 %lld T %lld O %lld symmetric %d: max error %g\n", mode,
                (long long)n1, (long long)n2, (long long)T, (long long)O, symmetric, error);
    failures++;
  }
  return failures;
}

// The upper-triangle enumeration must visit (0,0), (0,1), ..., (0,n-1), (1,1), ...
int check_triangle(int64_t n) {
  int64_t previous_row = 0, previous_col = -1;
  const int64_t count = n * (n + 1) / 2;
  const int64_t stride = count > 2000000 ? count / 2000000 : 1;
  for (int64_t block = 0; block < count; block += stride) {
    int64_t R, C;
    if (!tile_of_block(block, n, n, true, &R, &C) || R > C || C >= n) return 1;
    if (stride == 1) {
      const bool next_in_row = R == previous_row && C == previous_col + 1;
      const bool next_row = R == previous_row + 1 && C == R && previous_col == n - 1;
      if (!next_in_row && !next_row) return 1;
    }
    previous_row = R, previous_col = C;
  }
  int64_t R, C;
  return tile_of_block(count, n, n, true, &R, &C) ? 1 : 0;
}

}  // namespace

int main() {
  std::mt19937 rng(1);
  int failures = 0, cases = 0;
  for (int trial = 0; trial < 300; ++trial, ++cases) failures += check_problem(rng, trial % 3);
  for (int64_t n : {1, 2, 3, 7, 64, 1000, 70000, 3000000}) {
    ++cases;
    if (check_triangle(n)) {
      std::printf("triangle enumeration wrong for %lld tiles\n", (long long)n);
      failures++;
    }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures != 0;
}
