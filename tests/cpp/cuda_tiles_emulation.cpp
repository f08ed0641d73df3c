// Checks the upper-triangle enumeration of tile pairs that the CUDA
// gram_hadamard kernel uses for symmetric problems, up to millions of tiles,
// where the square-root estimate of a block's row is most likely to round
// wrongly. Exit status 0 means every case matched.
#include "cuda/gram_hadamard_tiles.cuh"

#include <cstdio>
#include <initializer_list>

using namespace lazykernel::tiles;

namespace {

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
  int failures = 0, cases = 0;
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
