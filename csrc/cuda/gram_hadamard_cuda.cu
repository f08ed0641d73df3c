// CUDA kernel of gram_hadamard_accumulate_ (semantics in ../gram_hadamard.h).
//
// One launch per layer. Each thread block owns a BM x BN tile of the layer's
// row space x column space (see gram_hadamard_tiles.cuh), computes the tile of
// S = A Bᵀ and then of U = G Hᵀ with the classic shared-memory GEMM scheme
// (BK-wide slabs of both operands staged in shared memory, loads coalesced
// along the contiguous K axis, a TM x TN register micro-tile per thread), and
// adds S∘U straight into `out`. No temporary of the size of the output or of
// a Gram matrix is ever allocated. With T = 1 every (r, c) owns one element of
// out, so plain adds suffice (launches on one stream are ordered); with T > 1
// positions of one sample pair share an element and atomics are used.
//
// The full mode recomputes S for each of the O rows of a sample (an O² excess
// on the cheaper of the two GEMMs); the diagonal mode recomputes S per output.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../gram_hadamard.h"
#include "gram_hadamard_tiles.cuh"

namespace lazykernel {

namespace {

// 64 x 64 tiles, 16-wide K slabs, 256 threads each computing 4 x 4 outputs:
// a 4 x 4 register tile gives 8 shared-memory loads per 16 FMAs, and two
// 16 x 64 slabs (8 KiB in float32, 16 KiB in float64) leave room for several
// resident blocks per SM.
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 16;
constexpr int TM = 4;
constexpr int TN = 4;
constexpr int THREADS = (BM / TM) * (BN / TN);
static_assert(THREADS == 256, "the loaders assume 256 threads");
static_assert(BM * BK == 4 * THREADS && BN * BK == 4 * THREADS, "each thread loads 4 elements per slab");

// One operand of a GEMM over the row space: element (r, k) is
// data[(r / row_div) * stride + offset + k] for k < depth.
template <typename scalar_t>
struct Operand {
  const scalar_t* data;
  int64_t stride;
  int64_t offset;
  int64_t row_div;
};

struct LayerGeometry {
  int64_t rows;        // size of the row space (left)
  int64_t cols;        // size of the column space (right)
  int64_t row_tiles;
  int64_t col_tiles;
  int64_t positions;   // T
  int64_t outputs;     // O
  int64_t n2;
  int mode;
  bool symmetric;
  bool atomic;
};

template <typename scalar_t>
__device__ __forceinline__ void load_slab(const Operand<scalar_t>& op, int64_t rows, int64_t row0,
                                          int64_t k0, int64_t depth, scalar_t (*slab)[BM + 1]) {
  // 16 consecutive threads read 16 consecutive k of one row: coalesced along K.
#pragma unroll
  for (int step = 0; step < 4; ++step) {
    const int linear = threadIdx.x + step * THREADS;
    const int local_row = linear / BK;
    const int local_k = linear % BK;
    const int64_t r = row0 + local_row;
    const int64_t k = k0 + local_k;
    scalar_t value = 0;
    if (r < rows && k < depth) {
      value = op.data[(r / op.row_div) * op.stride + op.offset + k];
    }
    slab[local_k][local_row] = value;
  }
}

// acc[i][j] = sum_k X[row0 + ty*TM + i, k] * Y[col0 + tx*TN + j, k]
template <typename scalar_t>
__device__ __forceinline__ void tile_gemm(const Operand<scalar_t>& x, const Operand<scalar_t>& y,
                                          int64_t depth, const LayerGeometry& geo, int64_t row0,
                                          int64_t col0, scalar_t (*xs)[BM + 1],
                                          scalar_t (*ys)[BN + 1], scalar_t acc[TM][TN]) {
  const int ty = threadIdx.x / (BN / TN);
  const int tx = threadIdx.x % (BN / TN);
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0;
  for (int64_t k0 = 0; k0 < depth; k0 += BK) {
    load_slab(x, geo.rows, row0, k0, depth, xs);
    load_slab(y, geo.cols, col0, k0, depth, ys);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      scalar_t a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = xs[kk][ty * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = ys[kk][tx * TN + j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS)
gram_hadamard_layer_kernel(scalar_t* __restrict__ out, Operand<scalar_t> a1, Operand<scalar_t> a2,
                           int64_t a_depth, Operand<scalar_t> g1, Operand<scalar_t> g2,
                           int64_t g_depth, int64_t g_output_stride, LayerGeometry geo) {
  int64_t row_tile, col_tile;
  if (!tiles::tile_of_block(blockIdx.x, geo.row_tiles, geo.col_tiles, geo.symmetric, &row_tile,
                            &col_tile)) {
    return;
  }
  __shared__ scalar_t xs[BK][BM + 1];
  __shared__ scalar_t ys[BK][BN + 1];
  const int64_t row0 = row_tile * BM;
  const int64_t col0 = col_tile * BN;
  const int64_t o = blockIdx.z;  // output of the diagonal mode, else 0
  g1.offset += o * g_output_stride;
  g2.offset += o * g_output_stride;

  scalar_t s[TM][TN];
  scalar_t u[TM][TN];
  tile_gemm(a1, a2, a_depth, geo, row0, col0, xs, ys, s);
  tile_gemm(g1, g2, g_depth, geo, row0, col0, xs, ys, u);

  const int ty = threadIdx.x / (BN / TN);
  const int tx = threadIdx.x % (BN / TN);
  const bool mirror = geo.symmetric && row_tile != col_tile;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t r = row0 + ty * TM + i;
    if (r >= geo.rows) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t c = col0 + tx * TN + j;
      if (c >= geo.cols) continue;
      const scalar_t value = s[i][j] * u[i][j];
      const tiles::OutIndex index =
          tiles::out_index(geo.mode, r, c, geo.positions, geo.outputs, geo.n2, o);
      if (geo.atomic) {
        atomicAdd(out + index.direct, value);
        if (mirror) atomicAdd(out + index.mirrored, value);
      } else {
        out[index.direct] += value;
        if (mirror) out[index.mirrored] += value;
      }
    }
  }
}

struct Launch {
  dim3 grid;
  dim3 block;
};

// The single place launch parameters are computed: a 1-D grid over tile pairs
// (so no row count can exceed a grid dimension's limit) and, for the diagonal
// mode, one z slice per output.
Launch launch_for(const LayerGeometry& geo, int64_t z) {
  const int64_t pairs = tiles::tile_pairs(geo.row_tiles, geo.col_tiles, geo.symmetric);
  TORCH_CHECK(pairs <= static_cast<int64_t>(INT32_MAX),
              "gram_hadamard_accumulate_ (CUDA): ", pairs, " tiles exceed one launch; split the inputs");
  TORCH_CHECK(z <= 65535, "gram_hadamard_accumulate_ (CUDA): diagonal mode supports at most 65535 outputs, got ", z);
  return {dim3(static_cast<unsigned>(pairs), 1, static_cast<unsigned>(z)), dim3(THREADS)};
}

template <typename scalar_t>
void launch_layer(const GramProblem& p, const GramLayer& layer, at::Tensor& out, const at::Tensor& A1,
                  const at::Tensor& A2, const at::Tensor& G1, const at::Tensor& G2, bool symmetric,
                  cudaStream_t stream) {
  const int64_t T = layer.positions;
  const int64_t O = p.outputs;
  const bool full = p.output == GramOutput::Full;
  const int64_t row_mult = full ? T * O : T;
  LayerGeometry geo;
  geo.rows = p.n1 * row_mult;
  geo.cols = p.n2 * row_mult;
  geo.row_tiles = (geo.rows + BM - 1) / BM;
  geo.col_tiles = (geo.cols + BN - 1) / BN;
  geo.positions = T;
  geo.outputs = O;
  geo.n2 = p.n2;
  geo.mode = static_cast<int>(p.output);
  geo.symmetric = symmetric;
  geo.atomic = T > 1;
  if (geo.rows == 0 || geo.cols == 0) return;

  const int64_t row_div = full ? O : 1;
  Operand<scalar_t> a1{A1.const_data_ptr<scalar_t>(), layer.a_dim, 0, row_div};
  Operand<scalar_t> a2{A2.const_data_ptr<scalar_t>(), layer.a_dim, 0, row_div};
  int64_t g_depth, g_stride, g_output_stride, z;
  if (p.output == GramOutput::Trace) {
    g_depth = O * layer.g_dim, g_stride = O * layer.g_dim, g_output_stride = 0, z = 1;
  } else if (p.output == GramOutput::Diagonal) {
    g_depth = layer.g_dim, g_stride = O * layer.g_dim, g_output_stride = layer.g_dim, z = O;
  } else {
    g_depth = layer.g_dim, g_stride = layer.g_dim, g_output_stride = 0, z = 1;
  }
  Operand<scalar_t> g1{G1.const_data_ptr<scalar_t>(), g_stride, 0, 1};
  Operand<scalar_t> g2{G2.const_data_ptr<scalar_t>(), g_stride, 0, 1};
  const Launch launch = launch_for(geo, z);
  gram_hadamard_layer_kernel<scalar_t><<<launch.grid, launch.block, 0, stream>>>(
      out.mutable_data_ptr<scalar_t>(), a1, a2, layer.a_dim, g1, g2, g_depth, g_output_stride, geo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gram_hadamard_accumulate_cuda(at::Tensor out, at::TensorList a1, at::TensorList a2,
                                   at::TensorList g1, at::TensorList g2, c10::string_view output,
                                   bool symmetric) {
  GramProblem problem = check_gram_hadamard_inputs(out, a1, a2, g1, g2, output, symmetric);
  TORCH_CHECK(out.is_cuda(), "gram_hadamard_accumulate_ (CUDA kernel): out is on ", out.device());
  if (problem.n1 == 0 || problem.n2 == 0 || problem.layers.empty()) return;
  const c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor target = out.is_contiguous() ? out : out.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gram_hadamard_accumulate_cuda", [&] {
    for (size_t l = 0; l < problem.layers.size(); ++l) {
      const GramLayer& layer = problem.layers[l];
      if (layer.a_dim == 0 || layer.g_dim == 0) continue;
      const at::Tensor A1 = a1[l].contiguous(), A2 = a2[l].contiguous();
      const at::Tensor G1 = g1[l].contiguous(), G2 = g2[l].contiguous();
      launch_layer<scalar_t>(problem, layer, target, A1, A2, G1, G2, symmetric, stream);
    }
  });
  if (!out.is_same(target)) out.copy_(target);
}

}  // namespace

TORCH_LIBRARY_IMPL(lazykernel, CUDA, m) {
  m.impl("gram_hadamard_accumulate_", &gram_hadamard_accumulate_cuda);
}

}  // namespace lazykernel
