// CPU kernel of gram_hadamard_accumulate_ (semantics in ../gram_hadamard.h).
//
// The output is cut into tiles of samples. For each tile, every layer
// contributes two GEMMs on views of the inputs (S = A1 A2ᵀ, U = G1 G2ᵀ
// restricted to the tile) whose Hadamard product is reduced over positions into
// a tile accumulator. So the largest temporary is one tile's S and U per
// thread, never an N1 x N2 matrix per layer, and the GEMMs run at BLAS speed.
// With many tiles, at::parallel_for gives each thread whole tiles; with few,
// the tiles run in turn and BLAS and the reductions use all threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "../gram_hadamard.h"

namespace lazykernel {

namespace {

// Elements of the largest per-layer temporary (U) in one tile: 4M elements keeps a
// tile's working set (S, U, accumulator) at tens of MB per thread while the GEMMs
// stay large enough (hundreds of rows) to run near peak.
constexpr int64_t kTileElements = int64_t{1} << 22;

// Tile pairs are enumerated row by row (with symmetry only b2 >= b1) and found
// from their index, not listed: with one sample per tile (long sequences) a list
// would take 16 bytes per element of out.
struct TilePlan {
  int64_t tile;       // samples per tile, both axes
  int64_t tiles1;     // tiles along N1
  int64_t tiles2;     // tiles along N2
  bool symmetric;
  int64_t pairs;      // tile pairs to compute

  // Pair `task` of the enumeration, as (tile index 1, tile index 2).
  std::pair<int64_t, int64_t> pair(int64_t task) const {
    if (!symmetric) return {task / tiles2, task % tiles2};
    int64_t b1 = 0;
    while (task >= tiles2 - b1) task -= tiles2 - b1++;
    return {b1, b1 + task};
  }

  // The pair after `p` in the enumeration.
  std::pair<int64_t, int64_t> next(std::pair<int64_t, int64_t> p) const {
    if (++p.second < tiles2) return p;
    ++p.first;
    return {p.first, symmetric ? p.first : 0};
  }
};

// Rows a sample contributes to the largest GEMM of a layer.
int64_t rows_per_sample(const GramProblem& p, const GramLayer& layer) {
  return p.output == GramOutput::Full ? layer.positions * p.outputs : layer.positions;
}

TilePlan plan_tiles(const GramProblem& p, bool symmetric) {
  double budget_side = std::sqrt(static_cast<double>(kTileElements));
  if (p.output == GramOutput::Diagonal) {
    budget_side /= std::sqrt(static_cast<double>(std::max<int64_t>(p.outputs, 1)));
  }
  int64_t tile = std::max<int64_t>(p.n1, p.n2);
  for (const auto& layer : p.layers) {
    const int64_t rows = std::max<int64_t>(rows_per_sample(p, layer), 1);
    // Measured on 2 cores (MKL, one thread per tile): a single-threaded GEMM with
    // long rows (trace: inner dimension O*D) reaches its peak from about 256 rows
    // (65 % of it at 128), and about 640 rows suit the full mode (inner dimension
    // D). Smaller tiles let a symmetric problem skip more of the lower triangle
    // and give the threads more tiles, which wins below N = 1024: there 128 rows.
    const bool large = std::max<int64_t>(p.n1, p.n2) >= 1024;
    const int64_t target_rows = p.output == GramOutput::Full ? 640 : (large ? 256 : 128);
    const int64_t by_speed = std::max<int64_t>(1, target_rows / rows);
    const int64_t by_memory = std::max<int64_t>(1, static_cast<int64_t>(budget_side / rows));
    tile = std::min<int64_t>(tile, std::min(by_speed, by_memory));
  }
  tile = std::max<int64_t>(tile, 1);
  TilePlan plan{tile, (p.n1 + tile - 1) / tile, (p.n2 + tile - 1) / tile, symmetric, 0};
  plan.pairs = symmetric ? plan.tiles1 * (plan.tiles1 + 1) / 2 : plan.tiles1 * plan.tiles2;
  return plan;
}

// Runs fn(il) for every sample row of a tile. Inside the parallel loop over
// tiles this is a plain loop (at::parallel_for does not nest); when the tiles
// run one after another it spreads the rows over the threads. Each row writes
// only its own row of the tile accumulator, so rows never race.
template <typename Fn>
void for_each_sample(int64_t rows, const Fn& fn) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t il = begin; il < end; ++il) fn(il);
  });
}

// Adds one layer's contribution for samples [i0, i0+bi) x [j0, j0+bj) into the
// tile accumulator `acc`, laid out [bi, bj] (trace), [bi, bj, O] (diagonal) or
// [bi, bj, O, O] (full).
template <typename scalar_t>
void accumulate_layer_tile(const GramProblem& p, const GramLayer& layer, const at::Tensor& a1,
                           const at::Tensor& a2, const at::Tensor& g1, const at::Tensor& g2,
                           int64_t i0, int64_t bi, int64_t j0, int64_t bj, scalar_t* acc) {
  const int64_t T = layer.positions;
  const int64_t O = p.outputs;
  const int64_t rows1 = bi * T;
  const int64_t rows2 = bj * T;
  at::Tensor A1 = a1.view({p.n1 * T, layer.a_dim}).narrow(0, i0 * T, rows1);
  at::Tensor A2 = a2.view({p.n2 * T, layer.a_dim}).narrow(0, j0 * T, rows2);
  at::Tensor S = at::mm(A1, A2.t());
  const scalar_t* s = S.const_data_ptr<scalar_t>();

  if (p.output == GramOutput::Trace) {
    at::Tensor G1 = g1.view({p.n1 * T, O * layer.g_dim}).narrow(0, i0 * T, rows1);
    at::Tensor G2 = g2.view({p.n2 * T, O * layer.g_dim}).narrow(0, j0 * T, rows2);
    at::Tensor U = at::mm(G1, G2.t());
    const scalar_t* u = U.const_data_ptr<scalar_t>();
    for_each_sample(bi, [&](int64_t il) {
      scalar_t* acc_row = acc + il * bj;
      for (int64_t r = il * T; r < (il + 1) * T; ++r) {
        const scalar_t* s_row = s + r * rows2;
        const scalar_t* u_row = u + r * rows2;
        if (T == 1) {
          for (int64_t c = 0; c < rows2; ++c) acc_row[c] += s_row[c] * u_row[c];
        } else {
          for (int64_t jl = 0; jl < bj; ++jl) {
            scalar_t sum = 0;
            for (int64_t q = jl * T; q < (jl + 1) * T; ++q) sum += s_row[q] * u_row[q];
            acc_row[jl] += sum;
          }
        }
      }
    });
  } else if (p.output == GramOutput::Diagonal) {
    // [rows, O, D] -> [O, rows, D]: one batched GEMM gives every output's Gram.
    at::Tensor G1 = g1.view({p.n1 * T, O, layer.g_dim}).narrow(0, i0 * T, rows1).transpose(0, 1);
    at::Tensor G2 = g2.view({p.n2 * T, O, layer.g_dim}).narrow(0, j0 * T, rows2).transpose(0, 1);
    at::Tensor U = at::bmm(G1, G2.transpose(1, 2)).contiguous();
    const scalar_t* u = U.const_data_ptr<scalar_t>();
    for_each_sample(bi, [&](int64_t il) {
      for (int64_t o = 0; o < O; ++o) {
        scalar_t* acc_row = acc + il * bj * O + o;
        for (int64_t r = il * T; r < (il + 1) * T; ++r) {
          const scalar_t* s_row = s + r * rows2;
          const scalar_t* u_row = u + (o * rows1 + r) * rows2;
          for (int64_t jl = 0; jl < bj; ++jl) {
            scalar_t sum = 0;
            for (int64_t q = jl * T; q < (jl + 1) * T; ++q) sum += s_row[q] * u_row[q];
            acc_row[jl * O] += sum;
          }
        }
      }
    });
  } else {
    at::Tensor G1 = g1.view({p.n1 * T * O, layer.g_dim}).narrow(0, i0 * T * O, rows1 * O);
    at::Tensor G2 = g2.view({p.n2 * T * O, layer.g_dim}).narrow(0, j0 * T * O, rows2 * O);
    at::Tensor U = at::mm(G1, G2.t());
    const scalar_t* u = U.const_data_ptr<scalar_t>();
    const int64_t ld_u = rows2 * O;
    for_each_sample(bi, [&](int64_t il) {
      for (int64_t r = il * T; r < (il + 1) * T; ++r) {
        const scalar_t* s_row = s + r * rows2;
        for (int64_t o = 0; o < O; ++o) {
          const scalar_t* u_row = u + (r * O + o) * ld_u;
          for (int64_t q = 0; q < rows2; ++q) {
            const scalar_t sv = s_row[q];
            const scalar_t* u_block = u_row + q * O;
            scalar_t* acc_block = acc + ((il * bj + q / T) * O + o) * O;
            for (int64_t pp = 0; pp < O; ++pp) acc_block[pp] += sv * u_block[pp];
          }
        }
      }
    });
  }
}

template <typename scalar_t>
void gram_hadamard_cpu_impl(const GramProblem& p, at::Tensor& out, const std::vector<at::Tensor>& a1,
                            const std::vector<at::Tensor>& a2, const std::vector<at::Tensor>& g1,
                            const std::vector<at::Tensor>& g2, bool symmetric) {
  const TilePlan plan = plan_tiles(p, symmetric);
  // Elements of out per (i, j) pair.
  const int64_t cell = p.output == GramOutput::Trace      ? 1
                       : p.output == GramOutput::Diagonal ? p.outputs
                                                          : p.outputs * p.outputs;
  const bool full = p.output == GramOutput::Full;
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const int64_t count = plan.pairs;

  auto run_tiles = [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    std::vector<scalar_t> acc;
    std::pair<int64_t, int64_t> pair = plan.pair(begin);
    for (int64_t task = begin; task < end; ++task, pair = plan.next(pair)) {
      const int64_t i0 = pair.first * plan.tile;
      const int64_t j0 = pair.second * plan.tile;
      const int64_t bi = std::min(plan.tile, p.n1 - i0);
      const int64_t bj = std::min(plan.tile, p.n2 - j0);
      acc.assign(static_cast<size_t>(bi * bj * cell), scalar_t(0));
      for (size_t l = 0; l < p.layers.size(); ++l) {
        accumulate_layer_tile<scalar_t>(p, p.layers[l], a1[l], a2[l], g1[l], g2[l], i0, bi, j0,
                                        bj, acc.data());
      }
      for (int64_t il = 0; il < bi; ++il) {
        for (int64_t jl = 0; jl < bj; ++jl) {
          const scalar_t* src = acc.data() + (il * bj + jl) * cell;
          scalar_t* dst = out_data + ((i0 + il) * p.n2 + (j0 + jl)) * cell;
          for (int64_t k = 0; k < cell; ++k) dst[k] += src[k];
        }
      }
      // Off-diagonal tiles of a symmetric problem also fill their mirror image;
      // Θ(x_j, x_i) = Θ(x_i, x_j)ᵀ swaps the output axes of a full kernel.
      if (symmetric && i0 != j0) {
        for (int64_t il = 0; il < bi; ++il) {
          for (int64_t jl = 0; jl < bj; ++jl) {
            const scalar_t* src = acc.data() + (il * bj + jl) * cell;
            scalar_t* dst = out_data + ((j0 + jl) * p.n2 + (i0 + il)) * cell;
            if (full) {
              for (int64_t o = 0; o < p.outputs; ++o)
                for (int64_t q = 0; q < p.outputs; ++q)
                  dst[q * p.outputs + o] += src[o * p.outputs + q];
            } else {
              for (int64_t k = 0; k < cell; ++k) dst[k] += src[k];
            }
          }
        }
      }
    }
  };
  // Many tiles: one thread per tile, each GEMM single-threaded. Few tiles: one
  // tile at a time, so that BLAS and the row loops use every thread.
  if (count >= 2 * at::get_num_threads()) {
    at::parallel_for(0, count, 1, run_tiles);
  } else {
    run_tiles(0, count);
  }
}

void gram_hadamard_accumulate_cpu(at::Tensor out, at::TensorList a1, at::TensorList a2,
                                  at::TensorList g1, at::TensorList g2, c10::string_view output,
                                  bool symmetric) {
  GramProblem problem = check_gram_hadamard_inputs(out, a1, a2, g1, g2, output, symmetric);
  TORCH_CHECK(out.device().is_cpu(), "gram_hadamard_accumulate_ (CPU kernel): out is on ",
              out.device());
  if (problem.n1 == 0 || problem.n2 == 0 || problem.layers.empty()) return;

  std::vector<at::Tensor> A1, A2, G1, G2;
  for (size_t l = 0; l < problem.layers.size(); ++l) {
    A1.push_back(a1[l].contiguous());
    A2.push_back(a2[l].contiguous());
    G1.push_back(g1[l].contiguous());
    G2.push_back(g2[l].contiguous());
  }
  at::Tensor target = out.is_contiguous() ? out : out.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gram_hadamard_accumulate_cpu", [&] {
    gram_hadamard_cpu_impl<scalar_t>(problem, target, A1, A2, G1, G2, symmetric);
  });
  if (!out.is_same(target)) out.copy_(target);
}

}  // namespace

TORCH_LIBRARY_IMPL(lazykernel, CPU, m) {
  m.impl("gram_hadamard_accumulate_", &gram_hadamard_accumulate_cpu);
}

}  // namespace lazykernel
