// CUDA kernel of gram_hadamard_accumulate_ (semantics in ../gram_hadamard.h).
//
// Layers are grouped by their number of positions T; one launch handles a
// group (up to kMaxLayers layers). Each thread block owns one tile pair of the
// group's row space x column space (tile layout in gram_hadamard_tiles.cuh)
// and, for every layer, computes the S = A Bᵀ and U = G Hᵀ entries of the tile
// with a shared-memory GEMM and adds S∘U into a register accumulator. Only
// after the last layer does the tile touch `out`, once. Nothing of the size of
// a Gram matrix is ever allocated.
//
//   trace     lanes are position rows r = i*T + t; U dots the O*D-long rows.
//   diagonal  as trace, one work item per output o; U dots D-long slices.
//   full      lanes are (r, o) pairs; U dots D-long rows, and S is needed only
//             for the tile's few position rows: it is computed into shared
//             memory once per tile and reused for all its output pairs.
//
// With T = 1 every lane pair owns one element of out and every element belongs
// to one tile pair, so blocks add without atomics (launches on one stream are
// ordered). With T > 1 a tile is first summed over the positions of each sample
// pair in shared memory and the sums are added atomically, since tiles need not
// start at sample boundaries.
//
// symmetric: S and U are symmetric in the row space, so the contribution of
// lane pair (a, b) to out equals that of (b, a) with the output axes swapped.
// Only tile pairs x <= y run, and x < y also add the mirror image. This covers
// every ordered lane pair exactly once whatever the tile boundaries, so it
// needs no alignment of tiles to samples and holds for T > 1 and full too.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <map>
#include <vector>

#include "../gram_hadamard.h"
#include "gram_hadamard_tiles.cuh"

namespace lazykernel {

namespace {

using tiles::kLanes;
using tiles::kSmallS;

// 64 x 64 tiles, 16-wide K slabs, 256 threads with 4 x 4 register micro-tiles.
// The 4 x 4 micro-tile costs two 16-byte shared loads per 16 FMAs; 64 x 16
// slabs keep shared memory small enough for several resident blocks.
constexpr int kThreads = 256;
constexpr int kChunk = 16;
constexpr int kMicro = 4;
constexpr int kThreadsPerSide = kLanes / kMicro;
// +4 keeps every micro-tile's 4 values 16-byte aligned for vector loads while
// turning the 16-way bank conflict of the transposed slab store (16 threads
// write 16 k of one lane) into 2-way. Read addresses stay a constant offset
// per k; an XOR swizzle instead cost ptxas ~40 registers of hoisted addresses.
constexpr int kSlabLd = kLanes + 4;
// +1: the epilogue reads the result tile along rows and, for mirror images,
// along columns; an odd stride makes both conflict-free.
constexpr int kTileLd = kLanes + 1;
// 16 layer descriptors (48 bytes each) keep the kernel parameters far below
// the 4 KiB limit; larger groups are split across launches.
constexpr int kMaxLayers = 16;

static_assert(kThreadsPerSide * kThreadsPerSide == kThreads, "one micro-tile per thread");
static_assert(kLanes * kChunk == 4 * kThreads, "each thread stages 4 elements per operand slab");
static_assert(kSmallS * kSmallS == 4 * kThreads, "each thread owns 4 entries of a full tile's S");
static_assert(kThreads / kChunk * 4 == kLanes, "staged lanes are threadIdx/16 + 16q, q < 4");

template <typename scalar_t>
struct LayerOperands {
  const scalar_t* a1;
  const scalar_t* a2;
  const scalar_t* g1;
  const scalar_t* g2;
  int64_t a_dim;  // K
  int64_t g_dim;  // D
};

template <typename scalar_t>
struct LayerBatch {
  LayerOperands<scalar_t> layer[kMaxLayers];
  int count;
};

// Register budget. In float32 a thread keeps two 16-value accumulators (the
// current GEMM and S∘U summed over layers) and parks S in shared memory while
// U is computed; that fits 128 registers without spilling, i.e. two blocks
// (16 warps) per SM. In float64 the three accumulators alone take 96
// registers, so 128 would spill whatever S does, and a padded S stash would
// push shared memory past 48 KiB: float64 keeps S in registers and runs one
// block (8 warps, 16 independent FMAs each per k) per SM.
template <typename scalar_t>
struct Budget {
  static constexpr int kBlocksPerSM = 2;
  static constexpr bool kStashS = true;
};
template <>
struct Budget<double> {
  static constexpr int kBlocksPerSM = 1;
  static constexpr bool kStashS = false;
};

template <typename scalar_t>
struct GemmTiles {
  scalar_t x[kChunk][kSlabLd];  // slab of the row operand, [k][lane]
  scalar_t y[kChunk][kSlabLd];  // slab of the column operand
  union {
    scalar_t s[kSmallS][kSmallS + 1];  // full: S of the tile's position rows
    // trace, diagonal (float32): each thread's S micro-tile
    scalar_t stash[Budget<scalar_t>::kStashS ? kMicro * kMicro : 1][kThreads];
  };
};

// The result tile is written only after the last GEMM, so it can share the
// GEMM buffers' memory.
template <typename scalar_t>
union SharedTiles {
  GemmTiles<scalar_t> gemm;
  scalar_t result[kLanes][kTileLd];
};

static_assert(sizeof(SharedTiles<double>) <= 48 * 1024, "static shared memory is limited to 48 KiB");

// Rows of the four lanes a thread stages into each slab (nullptr: the lane has
// no data and contributes zeros).
template <typename scalar_t>
struct StagedRows {
  const scalar_t* row[4];
};

__device__ __forceinline__ int staged_lane(int q) {
  return static_cast<int>(threadIdx.x) / kChunk + kChunk * q;
}

template <typename scalar_t>
__device__ __forceinline__ void fetch(const StagedRows<scalar_t>& src, int64_t k, int64_t depth,
                                      scalar_t (&reg)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    reg[q] = (k < depth && src.row[q] != nullptr) ? __ldg(src.row[q] + k) : scalar_t(0);
  }
}

__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
}

__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}

// Streams `depth` columns of the staged rows through shared memory in slabs of
// kChunk and calls consume() once per slab, while every thread can read it.
// 16 consecutive threads read 16 consecutive elements of one row, so global
// loads are coalesced along the contiguous axis; the next slab is fetched into
// registers before the current one is consumed, so its latency overlaps the FMAs.
template <typename scalar_t, typename Consume>
__device__ __forceinline__ void for_each_slab(GemmTiles<scalar_t>& sm,
                                              const StagedRows<scalar_t>& xs,
                                              const StagedRows<scalar_t>& ys, int64_t depth,
                                              Consume&& consume) {
  const int kl = static_cast<int>(threadIdx.x) % kChunk;
  scalar_t rx[4], ry[4];
  fetch(xs, kl, depth, rx);
  fetch(ys, kl, depth, ry);
  for (int64_t k0 = 0; k0 < depth; k0 += kChunk) {
    __syncthreads();  // every thread is done with the previous slab (or tile)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      sm.x[kl][staged_lane(q)] = rx[q];
      sm.y[kl][staged_lane(q)] = ry[q];
    }
    __syncthreads();
    fetch(xs, k0 + kChunk + kl, depth, rx);
    fetch(ys, k0 + kChunk + kl, depth, ry);
    consume();
  }
}

// acc[m][n] = sum_k X[lane ty*4+m][k] * Y[lane tx*4+n][k].
template <typename scalar_t>
__device__ __forceinline__ void tile_gemm(GemmTiles<scalar_t>& sm, const StagedRows<scalar_t>& xs,
                                          const StagedRows<scalar_t>& ys, int64_t depth,
                                          scalar_t (&acc)[kMicro][kMicro]) {
  const int tx = static_cast<int>(threadIdx.x) % kThreadsPerSide;
  const int ty = static_cast<int>(threadIdx.x) / kThreadsPerSide;
#pragma unroll
  for (int m = 0; m < kMicro; ++m)
#pragma unroll
    for (int n = 0; n < kMicro; ++n) acc[m][n] = 0;
  for_each_slab(sm, xs, ys, depth, [&] {
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      scalar_t a[kMicro], b[kMicro];
      load4(&sm.x[k][ty * kMicro], a);
      load4(&sm.y[k][tx * kMicro], b);
#pragma unroll
      for (int m = 0; m < kMicro; ++m)
#pragma unroll
        for (int n = 0; n < kMicro; ++n) acc[m][n] = fma(a[m], b[n], acc[m][n]);
    }
  });
}

// Full mode: sm.s[rl][cl] = A[r0 + rl] . B[c0 + cl] for the kSmallS x kSmallS
// position rows a tile can hold (rows past the tile's rcount come out zero).
// Thread owns entries (warp + 8q, lane): a broadcast and a conflict-free read per FMA.
template <typename scalar_t>
__device__ __forceinline__ void small_s_gemm(GemmTiles<scalar_t>& sm,
                                             const StagedRows<scalar_t>& xs,
                                             const StagedRows<scalar_t>& ys, int64_t depth) {
  const int sc = static_cast<int>(threadIdx.x) % 32;
  const int sr = static_cast<int>(threadIdx.x) / 32;
  scalar_t s[4] = {0, 0, 0, 0};
  for_each_slab(sm, xs, ys, depth, [&] {
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      const scalar_t b = sm.y[k][sc];
#pragma unroll
      for (int q = 0; q < 4; ++q) s[q] = fma(sm.x[k][sr + 8 * q], b, s[q]);
    }
  });
  // sm.s is not part of the slabs and its previous readers (the last layer's
  // accumulation) finished before this layer's first slab barrier.
#pragma unroll
  for (int q = 0; q < 4; ++q) sm.s[sr + 8 * q][sc] = s[q];
}

// tiles::lane_of, without its division by ob where ob is 1.
template <int kMode>
__device__ __forceinline__ bool lane_of(const tiles::TileSide& side, const tiles::TileSpan& span,
                                        int lane, int64_t* r, int64_t* o) {
  if constexpr (kMode == tiles::kFull) {
    return tiles::lane_of(side, span, lane, r, o);
  } else {
    *r = span.r0 + lane;
    *o = 0;
    return lane < span.rcount;
  }
}

// Rows of one operand for the lanes this thread stages. For S in full mode the
// lanes are position rows (rl < rcount <= kSmallS); otherwise lanes follow the
// tile layout and `g` selects the U operand.
template <typename scalar_t, int kMode>
__device__ __forceinline__ StagedRows<scalar_t> staged_rows(const scalar_t* base,
                                                            const tiles::TileSide& side,
                                                            const tiles::TileSpan& span,
                                                            const tiles::Plan& plan, int64_t z,
                                                            int64_t a_dim, int64_t g_dim,
                                                            bool g) {
  StagedRows<scalar_t> rows;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int lane = staged_lane(q);
    int64_t r, o;
    bool valid;
    if (kMode == tiles::kFull && !g) {
      r = span.r0 + lane;
      o = 0;
      valid = lane < span.rcount;
    } else {
      valid = lane_of<kMode>(side, span, lane, &r, &o);
    }
    const int64_t offset =
        g ? tiles::g_row_offset(kMode, r, o, z, plan.outputs, g_dim) : r * a_dim;
    rows.row[q] = valid ? base + offset : nullptr;
  }
  return rows;
}

template <typename scalar_t, int kMode>
__global__ void __launch_bounds__(kThreads, Budget<scalar_t>::kBlocksPerSM)
gram_hadamard_kernel(scalar_t* __restrict__ out, const __grid_constant__ LayerBatch<scalar_t> batch,
                     const __grid_constant__ tiles::Plan plan) {
  __shared__ __align__(16) SharedTiles<scalar_t> sm;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kThreadsPerSide;
  const int ty = tid / kThreadsPerSide;

  // Grid-stride over work items: the grid is capped at INT_MAX blocks.
  for (int64_t w = blockIdx.x; w < plan.work; w += gridDim.x) {
    int64_t x, y, z;
    if (!tiles::work_item(plan, w, &x, &y, &z)) break;  // not reached: w < plan.work
    const tiles::TileSpan rspan = tiles::tile_span(plan.rows, x);
    const tiles::TileSpan cspan = tiles::tile_span(plan.cols, y);

    scalar_t acc[kMicro][kMicro];
#pragma unroll
    for (int m = 0; m < kMicro; ++m)
#pragma unroll
      for (int n = 0; n < kMicro; ++n) acc[m][n] = 0;

    for (int l = 0; l < batch.count; ++l) {
      const LayerOperands<scalar_t>& op = batch.layer[l];
      const int64_t depth = tiles::g_depth(kMode, plan.outputs, op.g_dim);
      // Rows the tile reads: left (row tiles) or right (column tiles), A or G.
      auto rows_of = [&](const scalar_t* base, bool left, bool g) {
        return staged_rows<scalar_t, kMode>(base, left ? plan.rows : plan.cols,
                                            left ? rspan : cspan, plan, z, op.a_dim, op.g_dim, g);
      };
      scalar_t u[kMicro][kMicro];
      if constexpr (kMode == tiles::kFull) {
        small_s_gemm(sm.gemm, rows_of(op.a1, true, false), rows_of(op.a2, false, false), op.a_dim);
        tile_gemm(sm.gemm, rows_of(op.g1, true, true), rows_of(op.g2, false, true), depth, u);
        __syncthreads();  // sm.s complete (the U loop has barriers only when depth > 0)
#pragma unroll
        for (int m = 0; m < kMicro; ++m) {
          const int rl = (ty * kMicro + m) / plan.rows.ob;
#pragma unroll
          for (int n = 0; n < kMicro; ++n) {
            const int cl = (tx * kMicro + n) / plan.cols.ob;
            acc[m][n] = fma(sm.gemm.s[rl][cl], u[m][n], acc[m][n]);
          }
        }
      } else {
        scalar_t s[kMicro][kMicro];
        tile_gemm(sm.gemm, rows_of(op.a1, true, false), rows_of(op.a2, false, false), op.a_dim, s);
        if constexpr (Budget<scalar_t>::kStashS) {
          // Thread-private slots (consecutive threads, consecutive words): no
          // barrier and no bank conflicts. The result tile that shares this
          // memory is fenced by barriers on both sides.
#pragma unroll
          for (int m = 0; m < kMicro; ++m)
#pragma unroll
            for (int n = 0; n < kMicro; ++n) sm.gemm.stash[m * kMicro + n][tid] = s[m][n];
        }
        tile_gemm(sm.gemm, rows_of(op.g1, true, true), rows_of(op.g2, false, true), depth, u);
#pragma unroll
        for (int m = 0; m < kMicro; ++m)
#pragma unroll
          for (int n = 0; n < kMicro; ++n) {
            const scalar_t smn =
                Budget<scalar_t>::kStashS ? sm.gemm.stash[m * kMicro + n][tid] : s[m][n];
            acc[m][n] = fma(smn, u[m][n], acc[m][n]);
          }
      }
    }

    // Stage the tile in shared memory so that out is read and written along
    // its contiguous axis (and, for mirror images, along the transposed one).
    __syncthreads();  // the result tile overwrites the GEMM buffers
#pragma unroll
    for (int m = 0; m < kMicro; ++m)
#pragma unroll
      for (int n = 0; n < kMicro; ++n) sm.result[ty * kMicro + m][tx * kMicro + n] = acc[m][n];
    __syncthreads();

    const bool mirror = plan.symmetric && x != y;
    const int64_t T = plan.positions;
    if (T == 1) {
      // A position row is a sample. Each thread's column lane is the same for
      // all its elements (e % kLanes with e stepping by kThreads).
      for (int e = tid; e < kLanes * kLanes; e += kThreads) {
        const int lr = e / kLanes, lc = e % kLanes;
        int64_t i, o, j, p;
        if (!lane_of<kMode>(plan.rows, rspan, lr, &i, &o) ||
            !lane_of<kMode>(plan.cols, cspan, lc, &j, &p)) {
          continue;
        }
        out[tiles::out_element(kMode, i, j, o, p, z, plan.n2, plan.outputs)] += sm.result[lr][lc];
      }
      if (mirror) {
        // Consecutive threads take consecutive row lanes: the mirror's contiguous axis.
        for (int e = tid; e < kLanes * kLanes; e += kThreads) {
          const int lc = e / kLanes, lr = e % kLanes;
          int64_t i, o, j, p;
          if (!lane_of<kMode>(plan.rows, rspan, lr, &i, &o) ||
              !lane_of<kMode>(plan.cols, cspan, lc, &j, &p)) {
            continue;
          }
          out[tiles::out_element(kMode, j, i, p, o, z, plan.n2, plan.outputs)] += sm.result[lr][lc];
        }
      }
    } else {
      scalar_t* tile = &sm.result[0][0];
      const int row_keys = tiles::span_samples(rspan, T) * plan.rows.ob;
      const int col_keys = tiles::span_samples(cspan, T) * plan.cols.ob;
      for (int e = tid; e < kLanes * col_keys; e += kThreads) {
        tiles::reduce_columns(tile, kTileLd, plan.cols, cspan, T, e / col_keys, e % col_keys);
      }
      __syncthreads();
      const int64_t i0 = tiles::span_first_sample(rspan, T);
      const int64_t j0 = tiles::span_first_sample(cspan, T);
      for (int e = tid; e < row_keys * col_keys; e += kThreads) {
        const int kr = e / col_keys, kc = e % col_keys;
        const int ol = kr % plan.rows.ob, pl = kc % plan.cols.ob;
        if (ol >= rspan.ocount || pl >= cspan.ocount) continue;
        const scalar_t sum =
            tiles::reduce_rows(tile, kTileLd, plan.rows, rspan, plan.cols, cspan, T, kr, kc);
        const int64_t i = i0 + kr / plan.rows.ob, j = j0 + kc / plan.cols.ob;
        const int64_t o = rspan.o0 + ol, p = cspan.o0 + pl;
        atomicAdd(out + tiles::out_element(kMode, i, j, o, p, z, plan.n2, plan.outputs), sum);
        if (mirror) {
          atomicAdd(out + tiles::out_element(kMode, j, i, p, o, z, plan.n2, plan.outputs), sum);
        }
      }
    }
    __syncthreads();  // the next work item's slabs overwrite the result tile
  }
}

struct LaunchConfig {
  tiles::Plan plan;
  dim3 grid;
  dim3 block;
};

// The single place launch parameters are computed. A 1-D grid over work items
// (tile pairs, times O in diagonal mode) keeps any N within launch limits; the
// kernel grid-strides past INT_MAX items.
LaunchConfig launch_config(const GramProblem& p, int64_t positions, bool symmetric) {
  LaunchConfig config;
  config.plan = tiles::make_plan(static_cast<int>(p.output), p.n1, p.n2, positions, p.outputs,
                                 symmetric);
  const int64_t blocks = std::min<int64_t>(config.plan.work, INT_MAX);
  config.grid = dim3(static_cast<unsigned>(blocks));
  config.block = dim3(kThreads);
  return config;
}

template <typename scalar_t>
void launch_batch(const LaunchConfig& config, const LayerBatch<scalar_t>& batch, scalar_t* out,
                  cudaStream_t stream) {
  switch (config.plan.mode) {
    case tiles::kTrace:
      gram_hadamard_kernel<scalar_t, tiles::kTrace>
          <<<config.grid, config.block, 0, stream>>>(out, batch, config.plan);
      break;
    case tiles::kDiagonal:
      gram_hadamard_kernel<scalar_t, tiles::kDiagonal>
          <<<config.grid, config.block, 0, stream>>>(out, batch, config.plan);
      break;
    default:
      gram_hadamard_kernel<scalar_t, tiles::kFull>
          <<<config.grid, config.block, 0, stream>>>(out, batch, config.plan);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gram_hadamard_accumulate_cuda(at::Tensor out, at::TensorList a1, at::TensorList a2,
                                   at::TensorList g1, at::TensorList g2, c10::string_view output,
                                   bool symmetric) {
  const GramProblem problem = check_gram_hadamard_inputs(out, a1, a2, g1, g2, output, symmetric);
  TORCH_CHECK(out.is_cuda(), "gram_hadamard_accumulate_ (CUDA kernel): out is on ", out.device());
  if (problem.n1 == 0 || problem.n2 == 0 || problem.outputs <= 0) return;

  // Layers whose S or U is empty contribute nothing; the rest are grouped by T,
  // since one launch's tiles are laid out in one row space.
  std::map<int64_t, std::vector<size_t>> groups;
  for (size_t l = 0; l < problem.layers.size(); ++l) {
    const GramLayer& layer = problem.layers[l];
    if (layer.positions > 0 && layer.a_dim > 0 && layer.g_dim > 0) {
      groups[layer.positions].push_back(l);
    }
  }
  if (groups.empty()) return;

  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor target = out.is_contiguous() ? out : out.contiguous();
  // Kept alive until every launch is queued; the caching allocator orders any
  // reuse of their memory after the kernels on this stream.
  std::vector<at::Tensor> operands;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gram_hadamard_accumulate_cuda", [&] {
    scalar_t* out_data = target.mutable_data_ptr<scalar_t>();
    for (const auto& [positions, layers] : groups) {
      const LaunchConfig config = launch_config(problem, positions, symmetric);
      if (config.plan.work == 0) continue;
      for (size_t first = 0; first < layers.size(); first += kMaxLayers) {
        LayerBatch<scalar_t> batch{};
        batch.count = static_cast<int>(std::min<size_t>(kMaxLayers, layers.size() - first));
        for (int b = 0; b < batch.count; ++b) {
          const size_t l = layers[first + b];
          const size_t base = operands.size();
          operands.push_back(a1[l].contiguous());
          operands.push_back(a2[l].contiguous());
          operands.push_back(g1[l].contiguous());
          operands.push_back(g2[l].contiguous());
          batch.layer[b] = LayerOperands<scalar_t>{operands[base].const_data_ptr<scalar_t>(),
                                                   operands[base + 1].const_data_ptr<scalar_t>(),
                                                   operands[base + 2].const_data_ptr<scalar_t>(),
                                                   operands[base + 3].const_data_ptr<scalar_t>(),
                                                   problem.layers[l].a_dim,
                                                   problem.layers[l].g_dim};
        }
        launch_batch(config, batch, out_data, stream);
      }
    }
  });
  if (!out.is_same(target)) out.copy_(target);
}

}  // namespace

TORCH_LIBRARY_IMPL(lazykernel, CUDA, m) {
  m.impl("gram_hadamard_accumulate_", &gram_hadamard_accumulate_cuda);
}

}  // namespace lazykernel
