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

enum Mode : int { kTrace = 0, kDiagonal = 1, kFull = 2 };

// Element of out ([N1, N2], [N1, N2, O] or [N1, N2, O, O], contiguous) that
// samples (i, j) and outputs (o, p) add to; z is the diagonal mode's output.
LK_HOST_DEVICE int64_t out_element(int mode, int64_t i, int64_t j, int64_t o, int64_t p, int64_t z,
                                   int64_t n2, int64_t outputs) {
  if (mode == kFull) return ((i * n2 + j) * outputs + o) * outputs + p;
  if (mode == kDiagonal) return (i * n2 + j) * outputs + z;
  return i * n2 + j;
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

// ---------------------------------------------------------------------------
// Tiles of the fused kernel (gram_hadamard_cuda.cu).
//
// A tile side has kLanes lanes. A lane is a (position row r, output o) pair:
// lane = rl * ob + ol holds r = r0 + rl and o = o0 + ol. Trace and diagonal
// tiles have ob = 1 (the output is either summed inside the U dot product or
// fixed by the diagonal mode's z index), so lanes are just 64 consecutive
// position rows. Full tiles group ob outputs of rb = kLanes / ob position rows,
// so a tile needs S only for its rb x rb position rows (at most kSmallS, since
// ob >= 2): S is computed once per tile and reused for all ob x ob output pairs,
// instead of once per output pair.
constexpr int kLanes = 64;
constexpr int kSmallS = kLanes / 2;

// One side (rows or columns) of every tile of a launch.
struct TileSide {
  int64_t position_rows;  // N * T
  int64_t outputs;        // O for full tiles, 1 otherwise
  int rb;                 // position rows per tile
  int ob;                 // outputs per tile
  int64_t output_chunks;  // ceil(outputs / ob)
  int64_t tiles;          // ceil(position_rows / rb) * output_chunks
};

// One tile on one side.
struct TileSpan {
  int64_t r0;  // first position row
  int64_t o0;  // first output
  int rcount;  // position rows of the tile that exist (<= rb)
  int ocount;  // outputs of the tile that exist (<= ob)
};

// Everything a launch needs to find its tiles; passed to the kernel by value.
struct Plan {
  int mode;  // after routing: O == 1 diagonal and full are the trace mode
  int64_t n1, n2, positions, outputs;
  TileSide rows, cols;
  int64_t z;  // work items per tile pair: O for diagonal, else 1
  bool symmetric;
  int64_t pairs;  // tile pairs (the upper triangle only when symmetric)
  int64_t work;   // pairs * z
};

LK_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Outputs per full tile. The work of a launch is proportional to the number of
// tile pairs times a fixed cost per pair (a 64 x 64 U tile and a kSmallS² S
// tile), and the pairs scale as (output_chunks / rb)², so the best ob maximises
// rb / output_chunks; ties go to the larger ob (fewer S recomputations).
inline int choose_outputs_per_tile(int64_t outputs) {
  int best = 2;
  int64_t best_rb = kLanes / 2, best_chunks = ceil_div(outputs, 2);
  const int64_t largest = outputs < kLanes ? outputs : kLanes;
  for (int ob = 3; ob <= largest; ++ob) {
    const int64_t rb = kLanes / ob, chunks = ceil_div(outputs, ob);
    if (rb * best_chunks >= best_rb * chunks) best = ob, best_rb = rb, best_chunks = chunks;
  }
  return best;
}

inline TileSide make_side(int64_t position_rows, int64_t outputs, int ob) {
  TileSide side;
  side.position_rows = position_rows;
  side.outputs = outputs;
  side.ob = ob;
  side.rb = kLanes / ob;
  side.output_chunks = ceil_div(outputs, ob);
  side.tiles = ceil_div(position_rows, side.rb) * side.output_chunks;
  return side;
}

inline Plan make_plan(int mode, int64_t n1, int64_t n2, int64_t positions, int64_t outputs,
                      bool symmetric) {
  Plan plan;
  // With one output, [N1,N2,1] and [N1,N2,1,1] have the memory layout of the
  // trace's [N1,N2] and the same values.
  plan.mode = outputs == 1 ? kTrace : mode;
  plan.n1 = n1;
  plan.n2 = n2;
  plan.positions = positions;
  plan.outputs = outputs;
  const bool full = plan.mode == kFull;
  const int ob = full ? choose_outputs_per_tile(outputs) : 1;
  plan.rows = make_side(n1 * positions, full ? outputs : 1, ob);
  plan.cols = make_side(n2 * positions, full ? outputs : 1, ob);
  plan.z = plan.mode == kDiagonal ? outputs : 1;
  plan.symmetric = symmetric;
  plan.pairs = tile_pairs(plan.rows.tiles, plan.cols.tiles, symmetric);
  plan.work = plan.pairs * plan.z;
  return plan;
}

// Work item w of a launch: tile pair (x, y) and diagonal output z. Consecutive
// items share a tile pair so that their operand rows are reused from L2.
// Returns false (and the pair (0, 0)) when w is not below plan.work.
LK_HOST_DEVICE bool work_item(const Plan& plan, int64_t w, int64_t* x, int64_t* y, int64_t* z) {
  *x = 0, *y = 0, *z = 0;
  if (w < 0 || w >= plan.work) return false;
  *z = w % plan.z;
  return tile_of_block(w / plan.z, plan.rows.tiles, plan.cols.tiles, plan.symmetric, x, y);
}

LK_HOST_DEVICE TileSpan tile_span(const TileSide& side, int64_t tile) {
  TileSpan span;
  const int64_t block = tile / side.output_chunks;
  const int64_t chunk = tile % side.output_chunks;
  span.r0 = block * side.rb;
  span.o0 = chunk * side.ob;
  const int64_t rleft = side.position_rows - span.r0;
  const int64_t oleft = side.outputs - span.o0;
  span.rcount = static_cast<int>(rleft < side.rb ? rleft : side.rb);
  span.ocount = static_cast<int>(oleft < side.ob ? oleft : side.ob);
  return span;
}

// Position row and output of a lane; false for lanes past the end of the data.
LK_HOST_DEVICE bool lane_of(const TileSide& side, const TileSpan& span, int lane, int64_t* r,
                            int64_t* o) {
  const int rl = lane / side.ob, ol = lane % side.ob;
  *r = span.r0 + rl;
  *o = span.o0 + ol;
  return rl < span.rcount && ol < span.ocount;
}

// Offset and length of the G (or H) row that a lane's U entry dots.
LK_HOST_DEVICE int64_t g_row_offset(int mode, int64_t r, int64_t o, int64_t z, int64_t outputs,
                                    int64_t g_dim) {
  if (mode == kFull) return (r * outputs + o) * g_dim;
  if (mode == kDiagonal) return r * outputs * g_dim + z * g_dim;
  return r * outputs * g_dim;
}

LK_HOST_DEVICE int64_t g_depth(int mode, int64_t outputs, int64_t g_dim) {
  return mode == kTrace ? outputs * g_dim : g_dim;
}

// --- Reduction over positions (T > 1) of a finished tile ---------------------
//
// Several lanes then add into one element of out. Each side's lanes are grouped
// by key (local sample li, local output ol), key = li * ob + ol; the keys of one
// side number span_samples * ob <= kLanes. The tile is summed over the lanes of
// each key in shared memory first, so out receives one atomic per key pair
// rather than one per lane pair.

LK_HOST_DEVICE int64_t span_first_sample(const TileSpan& span, int64_t positions) {
  return span.r0 / positions;
}

LK_HOST_DEVICE int span_samples(const TileSpan& span, int64_t positions) {
  return static_cast<int>((span.r0 + span.rcount - 1) / positions - span.r0 / positions + 1);
}

// Local position rows [*begin, *end) of the tile that belong to local sample li.
LK_HOST_DEVICE void sample_rows(const TileSpan& span, int64_t positions, int li, int* begin,
                                int* end) {
  const int64_t i = span.r0 / positions + li;
  const int64_t b = i * positions - span.r0, e = (i + 1) * positions - span.r0;
  *begin = static_cast<int>(b < 0 ? 0 : b);
  *end = static_cast<int>(e > span.rcount ? span.rcount : e);
}

// Step 1, one item per (row lane lr, column key kc): sums row lr of `tile` (row
// stride ld) over the column lanes of key kc and stores the sum in the first
// of those lanes. Items touch disjoint lanes, so they may run concurrently.
template <typename scalar_t>
LK_HOST_DEVICE void reduce_columns(scalar_t* tile, int ld, const TileSide& cols,
                                   const TileSpan& span, int64_t positions, int lr, int kc) {
  const int lj = kc / cols.ob, pl = kc % cols.ob;
  int begin, end;
  sample_rows(span, positions, lj, &begin, &end);
  scalar_t* row = tile + lr * ld;
  scalar_t sum = 0;
  for (int cl = begin; cl < end; ++cl) sum += row[cl * cols.ob + pl];
  row[begin * cols.ob + pl] = sum;
}

// Step 2, one item per key pair (kr, kc), after every step-1 item: the tile
// summed over all lanes of both keys.
template <typename scalar_t>
LK_HOST_DEVICE scalar_t reduce_rows(const scalar_t* tile, int ld, const TileSide& rows,
                                    const TileSpan& rspan, const TileSide& cols,
                                    const TileSpan& cspan, int64_t positions, int kr, int kc) {
  const int li = kr / rows.ob, ol = kr % rows.ob;
  const int lj = kc / cols.ob, pl = kc % cols.ob;
  int rbegin, rend, cbegin, cend;
  sample_rows(rspan, positions, li, &rbegin, &rend);
  sample_rows(cspan, positions, lj, &cbegin, &cend);
  const int column = cbegin * cols.ob + pl;
  scalar_t sum = 0;
  for (int rl = rbegin; rl < rend; ++rl) sum += tile[(rl * rows.ob + ol) * ld + column];
  return sum;
}

}  // namespace tiles
}  // namespace lazykernel
