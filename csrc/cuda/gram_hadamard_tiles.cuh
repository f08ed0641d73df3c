// Index arithmetic of the CUDA gram_hadamard kernels, kept free of CUDA-only
// constructs so that plain C++ (and the CPU tests) can exercise it too.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LK_HOST_DEVICE inline
#endif

namespace lazykernel {
namespace tiles {

// The kernels see each layer as two "row spaces": rows r of the left operands
// and columns c of the right ones. For trace and diagonal a row is a
// (sample, position) pair, r = i*T + t. For full it is (sample, position,
// output), r = (i*T + t)*O + o, so that U = G Hᵀ is a plain GEMM over D while
// S = A Bᵀ reads the row r / O of A.
enum Mode : int { kTrace = 0, kDiagonal = 1, kFull = 2 };

struct OutIndex {
  int64_t direct;    // element of out that (r, c) adds to
  int64_t mirrored;  // element its mirror image (c, r) adds to, for symmetric problems
};

// Where S[r,c]*U[r,c] goes in out ([N1,N2], [N1,N2,O] or [N1,N2,O,O], contiguous).
// `o` is the output index of the diagonal mode (the kernel's z coordinate).
LK_HOST_DEVICE OutIndex out_index(int mode, int64_t r, int64_t c, int64_t positions,
                                  int64_t outputs, int64_t n2, int64_t o) {
  if (mode == kFull) {
    const int64_t ro = r % outputs, co = c % outputs;
    const int64_t i = (r / outputs) / positions, j = (c / outputs) / positions;
    return {((i * n2 + j) * outputs + ro) * outputs + co,
            ((j * n2 + i) * outputs + co) * outputs + ro};
  }
  const int64_t i = r / positions, j = c / positions;
  if (mode == kDiagonal) {
    return {(i * n2 + j) * outputs + o, (j * n2 + i) * outputs + o};
  }
  return {i * n2 + j, j * n2 + i};
}

LK_HOST_DEVICE int64_t tile_pairs(int64_t row_tiles, int64_t col_tiles, bool symmetric) {
  return symmetric ? row_tiles * (row_tiles + 1) / 2 : row_tiles * col_tiles;
}

// A 1-D grid enumerates tile pairs (row tile, column tile); with symmetry only
// the pairs with row tile <= column tile, row by row. Returns false past the end.
LK_HOST_DEVICE bool tile_of_block(int64_t block, int64_t row_tiles, int64_t col_tiles,
                                  bool symmetric, int64_t* row_tile, int64_t* col_tile) {
  if (block < 0 || block >= tile_pairs(row_tiles, col_tiles, symmetric)) return false;
  if (!symmetric) {
    *row_tile = block / col_tiles;
    *col_tile = block % col_tiles;
    return true;
  }
  // Row b of the upper triangle starts after sum_{q<b} (n - q) blocks.
  int64_t b = 0;
  int64_t start = 0;
  const int64_t n = row_tiles;
  // A square root gives the row directly; the loops only correct its rounding.
  double estimate = (2.0 * n + 1.0 - ::sqrt((2.0 * n + 1.0) * (2.0 * n + 1.0) - 8.0 * block)) / 2.0;
  b = estimate < 0 ? 0 : static_cast<int64_t>(estimate);
  if (b > n) b = n;
  start = b * n - b * (b - 1) / 2;
  while (b > 0 && start > block) {
    --b;
    start = b * n - b * (b - 1) / 2;
  }
  while (b < n && start + (n - b) <= block) {
    start += n - b;
    ++b;
  }
  if (b >= n) return false;
  *row_tile = b;
  *col_tile = b + (block - start);
  return true;
}

}  // namespace tiles
}  // namespace lazykernel
