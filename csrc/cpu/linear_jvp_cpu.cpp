// CPU kernel of linear_jvp (semantics in ../linear_jvp.h).
//
// Bytes and FLOPs: with an input tangent the work is one GEMM of [2M, K] x [K, D]
// (x and ẋ against W, W read once) and one of [M, K] x [K, D] (x against Ẇ,
// accumulated into the tangent rows), 6·M·K·D FLOPs, the minimum for the three
// products. The biases are written into the output first and the GEMMs
// accumulate onto them (beta = 1), which saves a separate pass over the output.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../linear_jvp.h"

namespace lazykernel {

namespace {

void fill_rows(at::Tensor rows, const std::optional<at::Tensor>& vector) {
  if (vector.has_value()) {
    rows.copy_(vector->unsqueeze(0).expand_as(rows));
  } else {
    rows.zero_();
  }
}

at::Tensor linear_jvp_cpu(const at::Tensor& xs, const at::Tensor& weight,
                          const std::optional<at::Tensor>& weight_dot,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& bias_dot) {
  const LinearJvpProblem p = check_linear_jvp_inputs(xs, weight, weight_dot, bias, bias_dot);
  at::Tensor out = at::empty({2, p.rows, p.out_dim}, xs.options());
  if (p.rows == 0) return out;
  fill_rows(out[0], bias);
  fill_rows(out[1], bias_dot);
  const at::Tensor inputs = xs.contiguous();
  const at::Tensor w_t = weight.t();
  const at::Tensor x = inputs[0];
  if (p.stacked == 2) {
    out.view({2 * p.rows, p.out_dim}).addmm_(inputs.view({2 * p.rows, p.in_dim}), w_t);
  } else {
    out[0].addmm_(x, w_t);
  }
  if (weight_dot.has_value()) {
    out[1].addmm_(x, weight_dot->t());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lazykernel, CPU, m) {
  m.impl("linear_jvp", &linear_jvp_cpu);
}

}  // namespace lazykernel
