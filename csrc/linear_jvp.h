// Shared declarations of the fused forward + tangent op of a linear map.
//
// For xs: [S, M, K] with S = 2 (xs[0] = x, xs[1] = ẋ) or S = 1 (x only; its
// tangent is zero), weight W: [D, K], optional Ẇ: [D, K], b: [D], ḃ: [D], the op
// returns out: [2, M, D] with
//
//   out[0] = x Wᵀ + b
//   out[1] = ẋ Wᵀ + x Ẇᵀ + ḃ        (terms whose operand is absent are zero)
//
// i.e. the value and the forward-mode derivative of y = x Wᵀ + b along
// (ẋ, Ẇ, ḃ). Keeping x and ẋ in one buffer lets the kernels multiply both by W
// in one GEMM of 2M rows, so W (the large operand) is read once for the two.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace lazykernel {

struct LinearJvpProblem {
  int64_t stacked;  // S: 2 with an input tangent, 1 without
  int64_t rows;     // M
  int64_t in_dim;   // K
  int64_t out_dim;  // D
};

// Checks ranks, sizes, dtypes and devices of every argument; throws c10::Error
// naming the offending argument, what was expected and what was given.
LinearJvpProblem check_linear_jvp_inputs(const at::Tensor& xs, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& weight_dot,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& bias_dot);

}  // namespace lazykernel
