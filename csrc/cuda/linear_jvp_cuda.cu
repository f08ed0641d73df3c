// CUDA kernel of linear_jvp (semantics in ../linear_jvp.h).
//
// A small kernel writes b and ḃ into the two halves of the output; the products
// then run as cuBLAS GEMMs on the current stream that accumulate onto it
// (beta = 1): one GEMM of [2M, K] x [K, D] multiplies x and ẋ by W, reading W
// once, and one of [M, K] x [K, D] adds x Ẇᵀ to the tangent half. Nothing
// synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../linear_jvp.h"

namespace lazykernel {

namespace {

constexpr int kFillThreads = 256;

// out: [2, M, D] contiguous. Row r of half h gets bias_h (or zeros when absent).
template <typename scalar_t>
__global__ void fill_bias_rows_kernel(scalar_t* __restrict__ out,
                                      const scalar_t* __restrict__ bias,
                                      const scalar_t* __restrict__ bias_dot, int64_t rows,
                                      int64_t out_dim) {
  const int64_t half = rows * out_dim;
  const int64_t total = 2 * half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t* source = i < half ? bias : bias_dot;
    out[i] = source == nullptr ? scalar_t(0) : source[i % out_dim];
  }
}

struct FillLaunch {
  dim3 grid;
  dim3 block;
};

FillLaunch fill_launch(int64_t elements) {
  const int64_t wanted = (elements + kFillThreads - 1) / kFillThreads;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 8));
  return FillLaunch{dim3(static_cast<unsigned int>(blocks)), dim3(kFillThreads)};
}

at::Tensor linear_jvp_cuda(const at::Tensor& xs, const at::Tensor& weight,
                           const std::optional<at::Tensor>& weight_dot,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& bias_dot) {
  const LinearJvpProblem p = check_linear_jvp_inputs(xs, weight, weight_dot, bias, bias_dot);
  const c10::cuda::CUDAGuard guard(xs.device());
  at::Tensor out = at::empty({2, p.rows, p.out_dim}, xs.options());
  if (p.rows == 0) return out;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor b_dot = bias_dot.has_value() ? bias_dot->contiguous() : at::Tensor();
  const FillLaunch launch = fill_launch(out.numel());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "linear_jvp_fill_bias_rows", [&] {
    fill_bias_rows_kernel<scalar_t><<<launch.grid, launch.block, 0, stream>>>(
        out.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
        b_dot.defined() ? b_dot.data_ptr<scalar_t>() : nullptr, p.rows, p.out_dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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

TORCH_LIBRARY_IMPL(lazykernel, CUDA, m) {
  m.impl("linear_jvp", &linear_jvp_cuda);
}

}  // namespace lazykernel
