// Argument checks of linear_jvp shared by the CPU and CUDA kernels.
#include <sstream>
#include <string>

#include "linear_jvp.h"

namespace lazykernel {

namespace {

std::string sizes_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_like_weight(const at::Tensor& t, const char* name, const at::Tensor& weight,
                       int64_t dim, int64_t expected_dim) {
  TORCH_CHECK(t.dim() == dim, "linear_jvp: ", name, " must have ", dim,
              " dimension(s), got shape ", sizes_of(t));
  TORCH_CHECK(t.size(0) == expected_dim, "linear_jvp: ", name, " must have ", expected_dim,
              " rows like weight [D, K] = ", sizes_of(weight), ", got shape ", sizes_of(t));
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), "linear_jvp: ", name, " has dtype ",
              t.scalar_type(), " but weight has dtype ", weight.scalar_type(),
              "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == weight.device(), "linear_jvp: ", name, " is on ", t.device(),
              " but weight is on ", weight.device());
}

}  // namespace

LinearJvpProblem check_linear_jvp_inputs(const at::Tensor& xs, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& weight_dot,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& bias_dot) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "linear_jvp: weight must be float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "linear_jvp: weight must be [D, K], got shape ",
              sizes_of(weight));
  TORCH_CHECK(xs.dim() == 3 && (xs.size(0) == 1 || xs.size(0) == 2),
              "linear_jvp: xs must be [2, M, K] (input and its tangent) or [1, M, K] "
              "(input only), got shape ", sizes_of(xs));
  TORCH_CHECK(xs.size(2) == weight.size(1), "linear_jvp: xs has K = ", xs.size(2),
              " features but weight [D, K] is ", sizes_of(weight));
  TORCH_CHECK(xs.scalar_type() == weight.scalar_type(), "linear_jvp: xs has dtype ",
              xs.scalar_type(), " but weight has dtype ", weight.scalar_type(),
              "; all tensors must share one dtype");
  TORCH_CHECK(xs.device() == weight.device(), "linear_jvp: xs is on ", xs.device(),
              " but weight is on ", weight.device());
  const int64_t d = weight.size(0);
  if (weight_dot.has_value()) {
    check_like_weight(*weight_dot, "weight_dot", weight, 2, d);
    TORCH_CHECK(weight_dot->size(1) == weight.size(1), "linear_jvp: weight_dot must have "
                "the shape of weight ", sizes_of(weight), ", got ", sizes_of(*weight_dot));
  }
  if (bias.has_value()) check_like_weight(*bias, "bias", weight, 1, d);
  if (bias_dot.has_value()) check_like_weight(*bias_dot, "bias_dot", weight, 1, d);
  return LinearJvpProblem{xs.size(0), xs.size(1), xs.size(2), d};
}

}  // namespace lazykernel
