// Shared declarations of the fused Hadamard-Gram accumulate op.
//
// For a list of L parameter groups ("layers") the op adds, in place,
//
//   trace:    out[i,j]     += sum_l sum_{t,s} (a1_l[i,t] . a2_l[j,s]) * sum_o (g1_l[i,t,o] . g2_l[j,s,o])
//   diagonal: out[i,j,o]   += sum_l sum_{t,s} (a1_l[i,t] . a2_l[j,s]) * (g1_l[i,t,o] . g2_l[j,s,o])
//   full:     out[i,j,o,p] += sum_l sum_{t,s} (a1_l[i,t] . a2_l[j,s]) * (g1_l[i,t,o] . g2_l[j,s,p])
//
// with a1_l: [N1, T_l, K_l], a2_l: [N2, T_l, K_l], g1_l: [N1, T_l, O, D_l],
// g2_l: [N2, T_l, O, D_l]. This is the NTK term of a linear map applied at T_l
// positions (DESIGN.md, "structured rule for a linear map"); a generic
// parameter group is the special case T = K = 1, a = 1, g = per-sample Jacobian.
//
// `symmetric` promises a1 == a2 and g1 == g2 (so N1 == N2): the kernels may then
// compute only tiles with i-block <= j-block and mirror them. The checks hold
// the op to that promise (the same tensors, or else equal values).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace lazykernel {

enum class GramOutput { Trace = 0, Diagonal = 1, Full = 2 };

struct GramLayer {
  int64_t positions;  // T
  int64_t a_dim;      // K
  int64_t g_dim;      // D
};

struct GramProblem {
  GramOutput output;
  int64_t n1;
  int64_t n2;
  int64_t outputs;  // O
  std::vector<GramLayer> layers;
};

GramOutput parse_gram_output(c10::string_view output);

// Checks every argument of the op (dtypes, devices, ranks, matching sizes,
// the shape of `out`, memory shared with `out`, operands that require grad,
// the promise of `symmetric`) and returns the sizes. Throws c10::Error with a message
// that names the offending argument, what was expected and what was given.
GramProblem check_gram_hadamard_inputs(
    const at::Tensor& out,
    at::TensorList a1,
    at::TensorList a2,
    at::TensorList g1,
    at::TensorList g2,
    c10::string_view output,
    bool symmetric);

}  // namespace lazykernel
