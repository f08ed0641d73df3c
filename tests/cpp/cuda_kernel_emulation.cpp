// CPU emulation of gram_hadamard_cuda.cu's loop nest.
//
// Drives the same tiles:: helpers the kernel calls through the kernel's loops
// (work items, tile spans, lanes, staged rows, the small S of full tiles, the
// per-sample reductions and mirrored writes) for random problems of every mode,
// positions, outputs and symmetry, and compares with a naive loop over the
// definition. It also checks the kernel's invariants: lane counts, small-S
// indices in range, and no two plain (non-atomic) adds to one element of out
// within a launch. Usage: cuda_kernel_emulation [trials]; exit status 0 means
// every trial matched.
#include "cuda/gram_hadamard_tiles.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <set>
#include <vector>

using namespace lazykernel::tiles;

constexpr int kThreads = 256, kChunk = 16, kMicro = 4, kTileLd = kLanes + 1;

struct Layer {
  int64_t T, K, D;
  std::vector<double> A1, A2, G1, G2;
};

static int g_fail = 0;
#define CHECK(c, ...)                       \
  do {                                      \
    if (!(c)) {                             \
      if (g_fail < 20) {                    \
        std::printf("FAIL %s: ", #c);       \
        std::printf(__VA_ARGS__);           \
        std::printf("\n");                  \
      }                                     \
      ++g_fail;                             \
    }                                       \
  } while (0)

// staged_rows(): row offset (in elements) of staged lane, or -1.
static int64_t staged(int mode, const Plan& plan, const TileSide& side, const TileSpan& span,
                      int lane, int64_t z, int64_t K, int64_t D, bool g) {
  int64_t r, o;
  bool valid;
  if (mode == kFull && !g) {
    r = span.r0 + lane;
    o = 0;
    valid = lane < span.rcount;
  } else {
    valid = lane_of(side, span, lane, &r, &o);
  }
  const int64_t off = g ? g_row_offset(mode, r, o, z, plan.outputs, D) : r * K;
  return valid ? off : -1;
}

// tile_gemm as the kernel stages it: acc[lr][lc] over lanes, staged lanes lane0+16q.
// Stages one kChunk-wide slab of both operands as the kernel's threads do:
// thread tid loads k = tid % kChunk of lanes tid / kChunk + kChunk * q.
static void stage_slabs(const std::vector<double>& X, const std::vector<double>& Y,
                        const int64_t (&xoff)[kLanes], const int64_t (&yoff)[kLanes], int64_t depth,
                        int64_t k0, double (&xs)[kChunk][kLanes + 4], double (&ys)[kChunk][kLanes + 4]) {
  for (int tid = 0; tid < kThreads; ++tid) {
    const int kl = tid % kChunk;
    for (int q = 0; q < 4; ++q) {
      const int lane = tid / kChunk + kChunk * q;
      const int64_t k = k0 + kl;
      xs[kl][lane] = (k < depth && xoff[lane] >= 0) ? X[xoff[lane] + k] : 0.0;
      ys[kl][lane] = (k < depth && yoff[lane] >= 0) ? Y[yoff[lane] + k] : 0.0;
    }
  }
}

static void tile_gemm(const std::vector<double>& X, const std::vector<double>& Y,
                      const int64_t (&xoff)[kLanes], const int64_t (&yoff)[kLanes], int64_t depth,
                      double (&acc)[kLanes][kLanes]) {
  for (auto& row : acc)
    for (auto& v : row) v = 0;
  double xs[kChunk][kLanes + 4], ys[kChunk][kLanes + 4];
  for (int64_t k0 = 0; k0 < depth; k0 += kChunk) {
    stage_slabs(X, Y, xoff, yoff, depth, k0, xs, ys);
    for (int tid = 0; tid < kThreads; ++tid) {
      const int tx = tid % 16, ty = tid / 16;
      for (int k = 0; k < kChunk; ++k)
        for (int m = 0; m < kMicro; ++m)
          for (int n = 0; n < kMicro; ++n)
            acc[ty * kMicro + m][tx * kMicro + n] += xs[k][ty * kMicro + m] * ys[k][tx * kMicro + n];
    }
  }
}

static void small_s(const std::vector<double>& X, const std::vector<double>& Y,
                    const int64_t (&xoff)[kLanes], const int64_t (&yoff)[kLanes], int64_t depth,
                    double (&s)[kSmallS][kSmallS + 1]) {
  double xs[kChunk][kLanes + 4], ys[kChunk][kLanes + 4];
  double acc[kThreads][4] = {};
  for (int64_t k0 = 0; k0 < depth; k0 += kChunk) {
    stage_slabs(X, Y, xoff, yoff, depth, k0, xs, ys);
    for (int tid = 0; tid < kThreads; ++tid) {
      const int sc = tid % 32, sr = tid / 32;
      for (int k = 0; k < kChunk; ++k)
        for (int q = 0; q < 4; ++q) acc[tid][q] += xs[k][sr + 8 * q] * ys[k][sc];
    }
  }
  std::set<std::pair<int, int>> seen;
  for (int tid = 0; tid < kThreads; ++tid)
    for (int q = 0; q < 4; ++q) {
      const int sc = tid % 32, sr = tid / 32 + 8 * q;
      s[sr][sc] = acc[tid][q];
      seen.insert({sr, sc});
    }
  CHECK(seen.size() == size_t(kSmallS * kSmallS), "small S coverage");
}

// One launch of the kernel over `layers` (all with the same T).
static void launch(int mode_in, int64_t n1, int64_t n2, int64_t O, bool symmetric,
                   const std::vector<const Layer*>& layers, std::vector<double>& out) {
  const int64_t T = layers[0]->T;
  const Plan plan = make_plan(mode_in, n1, n2, T, O, symmetric);
  const int mode = plan.mode;
  if (mode == kFull) CHECK(plan.rows.ob >= 2 && plan.rows.rb <= kSmallS, "full ob %d", plan.rows.ob);
  CHECK(plan.rows.rb * plan.rows.ob <= kLanes, "lanes");
  // element -> writer of a non-atomic add in this launch
  std::map<int64_t, int64_t> writer;
  // emulate a grid smaller than the work to exercise the grid-stride loop
  const int64_t grid = std::max<int64_t>(1, plan.work / 2 + 1);
  for (int64_t b = 0; b < grid; ++b)
    for (int64_t w = b; w < plan.work; w += grid) {
      int64_t x, y, z;
      CHECK(work_item(plan, w, &x, &y, &z), "work_item false");
      CHECK(x >= 0 && x < plan.rows.tiles && y >= 0 && y < plan.cols.tiles && z < plan.z, "work item");
      if (symmetric) CHECK(x <= y, "triangle");
      const TileSpan rs = tile_span(plan.rows, x), cs = tile_span(plan.cols, y);
      CHECK(rs.rcount >= 1 && rs.ocount >= 1 && cs.rcount >= 1 && cs.ocount >= 1, "empty tile");
      double acc[kLanes][kLanes] = {};
      for (const Layer* L : layers) {
        const int64_t depth = g_depth(mode, plan.outputs, L->D);
        int64_t ao1[kLanes], ao2[kLanes], go1[kLanes], go2[kLanes];
        for (int lane = 0; lane < kLanes; ++lane) {
          ao1[lane] = staged(mode, plan, plan.rows, rs, lane, z, L->K, L->D, false);
          ao2[lane] = staged(mode, plan, plan.cols, cs, lane, z, L->K, L->D, false);
          go1[lane] = staged(mode, plan, plan.rows, rs, lane, z, L->K, L->D, true);
          go2[lane] = staged(mode, plan, plan.cols, cs, lane, z, L->K, L->D, true);
        }
        static double u[kLanes][kLanes];
        if (mode == kFull) {
          static double s[kSmallS][kSmallS + 1];
          small_s(L->A1, L->A2, ao1, ao2, L->K, s);
          tile_gemm(L->G1, L->G2, go1, go2, depth, u);
          for (int lr = 0; lr < kLanes; ++lr)
            for (int lc = 0; lc < kLanes; ++lc) {
              const int rl = lr / plan.rows.ob, cl = lc / plan.cols.ob;
              CHECK(rl < kSmallS && cl < kSmallS, "small S index");
              acc[lr][lc] += s[rl][cl] * u[lr][lc];
            }
        } else {
          static double s[kLanes][kLanes];
          tile_gemm(L->A1, L->A2, ao1, ao2, L->K, s);
          tile_gemm(L->G1, L->G2, go1, go2, depth, u);
          for (int lr = 0; lr < kLanes; ++lr)
            for (int lc = 0; lc < kLanes; ++lc) acc[lr][lc] += s[lr][lc] * u[lr][lc];
        }
      }
      static double tile[kLanes * kTileLd];
      for (int lr = 0; lr < kLanes; ++lr)
        for (int lc = 0; lc < kLanes; ++lc) tile[lr * kTileLd + lc] = acc[lr][lc];
      const bool mirror = plan.symmetric && x != y;
      auto lane_k = [&](const TileSide& side, const TileSpan& span, int lane, int64_t* r, int64_t* o) {
        if (mode == kFull) return lane_of(side, span, lane, r, o);
        *r = span.r0 + lane; *o = 0; return lane < span.rcount;
      };
      if (T == 1) {
        for (int pass = 0; pass < (mirror ? 2 : 1); ++pass)
          for (int e = 0; e < kLanes * kLanes; ++e) {
            const int lr = pass ? e % kLanes : e / kLanes, lc = pass ? e / kLanes : e % kLanes;
            int64_t i, o, j, p;
            if (!lane_k(plan.rows, rs, lr, &i, &o) || !lane_k(plan.cols, cs, lc, &j, &p)) continue;
            const int64_t el = pass ? out_element(mode, j, i, p, o, z, plan.n2, plan.outputs)
                                    : out_element(mode, i, j, o, p, z, plan.n2, plan.outputs);
            CHECK(el >= 0 && el < int64_t(out.size()), "out of bounds");
            auto [it, fresh] = writer.emplace(el, w);
            CHECK(fresh, "two plain adds to element %lld (items %lld, %lld)", (long long)el,
                  (long long)it->second, (long long)w);
            out[el] += tile[lr * kTileLd + lc];
          }
      } else {
        const int row_keys = span_samples(rs, T) * plan.rows.ob;
        const int col_keys = span_samples(cs, T) * plan.cols.ob;
        CHECK(row_keys <= kLanes && col_keys <= kLanes, "keys %d %d", row_keys, col_keys);
        // step 1: items must touch disjoint cells
        std::vector<int> touched(kLanes * kTileLd, -1);
        for (int e = 0; e < kLanes * col_keys; ++e) {
          const int lr = e / col_keys, kc = e % col_keys;
          const int lj = kc / plan.cols.ob, pl = kc % plan.cols.ob;
          int b0, e0;
          sample_rows(cs, T, lj, &b0, &e0);
          CHECK(b0 < e0, "empty column key");
          for (int cl = b0; cl < e0; ++cl) {
            int& t = touched[lr * kTileLd + cl * plan.cols.ob + pl];
            CHECK(t == -1, "step-1 overlap");
            t = e;
          }
          reduce_columns(tile, kTileLd, plan.cols, cs, T, lr, kc);
        }
        const int64_t i0 = span_first_sample(rs, T), j0 = span_first_sample(cs, T);
        for (int e = 0; e < row_keys * col_keys; ++e) {
          const int kr = e / col_keys, kc = e % col_keys;
          const int ol = kr % plan.rows.ob, pl = kc % plan.cols.ob;
          if (ol >= rs.ocount || pl >= cs.ocount) continue;
          const double sum = reduce_rows(tile, kTileLd, plan.rows, rs, plan.cols, cs, T, kr, kc);
          const int64_t i = i0 + kr / plan.rows.ob, j = j0 + kc / plan.cols.ob;
          const int64_t o = rs.o0 + ol, p = cs.o0 + pl;
          CHECK(i < n1 && j < n2 && o < O && p < O, "key range");
          const int64_t d = out_element(mode, i, j, o, p, z, plan.n2, plan.outputs);
          CHECK(d >= 0 && d < int64_t(out.size()), "oob");
          out[d] += sum;
          if (mirror) {
            const int64_t mi = out_element(mode, j, i, p, o, z, plan.n2, plan.outputs);
            CHECK(mi >= 0 && mi < int64_t(out.size()), "oob m");
            out[mi] += sum;
          }
        }
      }
    }
}

static int check_problem(std::mt19937& rng, int mode, int trial) {
  std::uniform_real_distribution<double> uniform(-1, 1);
  const bool symmetric = rng() % 2;
  const int64_t n1 = 1 + rng() % (trial % 4 == 0 ? 150 : 40);
  const int64_t n2 = symmetric ? n1 : 1 + rng() % 100;
  int64_t O;
  switch (rng() % 4) {
    case 0: O = 1; break;
    case 1: O = 2 + rng() % 4; break;
    case 2: O = 6 + rng() % 30; break;
    default: O = 33 + rng() % 40; break;  // > 32, > 64 (chunked outputs)
  }
  if (O > 12 && n1 * n2 > 400) O = 2 + rng() % 11;  // keep the naive loop quick
  const int nl = 1 + rng() % 5;
  const int64_t Ts[] = {1, 1, 2, 3, 5, 64, 70};
  std::vector<Layer> layers(nl);
  for (auto& L : layers) {
    L.T = Ts[rng() % 7];
    if (L.T > 5 && n1 * n2 * O * O > 3000) L.T = 1 + rng() % 3;
    L.K = (rng() % 8 == 0) ? 0 : 1 + rng() % 20;
    L.D = (rng() % 8 == 0) ? 0 : 1 + rng() % 20;
    L.A1.resize(n1 * L.T * L.K);
    L.A2.resize(n2 * L.T * L.K);
    L.G1.resize(n1 * L.T * O * L.D);
    L.G2.resize(n2 * L.T * O * L.D);
    for (auto* v : {&L.A1, &L.A2, &L.G1, &L.G2})
      for (auto& q : *v) q = uniform(rng);
    if (symmetric) L.A2 = L.A1, L.G2 = L.G1;
  }
  const int64_t cell = mode == kTrace ? 1 : mode == kDiagonal ? O : O * O;
  std::vector<double> out(n1 * n2 * cell);
  for (auto& q : out) q = uniform(rng);
  std::vector<double> expected = out;
  for (const auto& L : layers)
    for (int64_t i = 0; i < n1; i++)
      for (int64_t j = 0; j < n2; j++)
        for (int64_t t = 0; t < L.T; t++)
          for (int64_t s = 0; s < L.T; s++) {
            double S = 0;
            for (int64_t k = 0; k < L.K; k++)
              S += L.A1[(i * L.T + t) * L.K + k] * L.A2[(j * L.T + s) * L.K + k];
            for (int64_t o = 0; o < O; o++)
              for (int64_t p = 0; p < O; p++) {
                if (mode != kFull && o != p) continue;
                double U = 0;
                for (int64_t d = 0; d < L.D; d++)
                  U += L.G1[((i * L.T + t) * O + o) * L.D + d] * L.G2[((j * L.T + s) * O + p) * L.D + d];
                const int64_t index = mode == kTrace      ? i * n2 + j
                                      : mode == kDiagonal ? (i * n2 + j) * O + o
                                                          : ((i * n2 + j) * O + o) * O + p;
                expected[index] += S * U;
              }
          }
  // host side of gram_hadamard_accumulate_cuda: skip empty layers, group by T, chunk
  const size_t max_layers = 2;
  std::map<int64_t, std::vector<const Layer*>> groups;
  for (const auto& L : layers)
    if (L.T > 0 && L.K > 0 && L.D > 0) groups[L.T].push_back(&L);
  for (auto& [T, g] : groups) {
    const Plan plan = make_plan(mode, n1, n2, T, O, symmetric);
    if (plan.work == 0) continue;
    for (size_t first = 0; first < g.size(); first += max_layers) {
      std::vector<const Layer*> batch(g.begin() + first,
                                      g.begin() + std::min(g.size(), first + max_layers));
      launch(mode, n1, n2, O, symmetric, batch, out);
    }
  }
  double error = 0, scale = 1e-30;
  for (size_t q = 0; q < out.size(); q++) {
    error = std::max(error, std::fabs(out[q] - expected[q]));
    scale = std::max(scale, std::fabs(expected[q]));
  }
  if (error > 1e-10 * scale) {
    std::printf("MISMATCH mode %d n1 %lld n2 %lld O %lld sym %d layers", mode, (long long)n1,
                (long long)n2, (long long)O, symmetric);
    for (auto& L : layers) std::printf(" (T%lld K%lld D%lld)", (long long)L.T, (long long)L.K, (long long)L.D);
    std::printf(": err %g\n", error);
    return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
  const int trials = argc > 1 ? std::atoi(argv[1]) : 300;
  std::mt19937 rng(12345);
  int failures = 0;
  for (int trial = 0; trial < trials; ++trial) failures += check_problem(rng, trial % 3, trial);
  // choose_outputs_per_tile and plan sanity for big sizes
  for (int64_t O = 2; O <= 300; ++O) {
    const int ob = choose_outputs_per_tile(O);
    CHECK(ob >= 2 && ob <= 64 && ob <= O, "ob %d for O %lld", ob, (long long)O);
  }
  const Plan big = make_plan(kFull, 200000, 200000, 1000, 10, true);
  CHECK(big.work > 0 && big.rows.tiles == ceil_div(200000LL * 1000, big.rows.rb) * big.rows.output_chunks, "big");
  std::printf("%d trials, %d mismatches, %d check failures\n", trials, failures, g_fail);
  return failures || g_fail;
}
