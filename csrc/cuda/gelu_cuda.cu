// GELU forward with a fused bias and GELU backward from the pre-activation on CUDA (math: csrc/common/ckpt_math.h).
//
// bias_gelu_kernel(x (..., H), bias (H,)?) -> gelu(x + bias);  gelu_bwd_kernel(da, u) -> da * gelu'(u).
// Grid-stride loops in packs of V elements (16-byte accesses when aligned): bias_gelu over (rows, H) with a 2-D grid
// (rows on y, columns on x: the bias index is the column, no per-element i % H), gelu_bwd over the flat tensor;
// fp32 math (fp64 for fp64 tensors), launched on the current stream.
#include <torch/library.h>

#include <string>

#include "../common/ckpt_math.h"
#include "../common/ffn_host.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// x viewed as (rows, h): rows split over blockIdx.y (grid-stride), columns in packs over blockIdx.x/threadIdx.x, so the
// bias index is the column itself (no per-element 64-bit i % h). Without a bias the caller passes rows = 1, h = numel.
template <typename T, int V, bool kTanh>
__global__ void bias_gelu_kernel(const T* __restrict__ x, const acc_type<T>* __restrict__ bias, T* __restrict__ out,
                                 int64_t rows, int64_t h) {
  using acc_t = acc_type<T>;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const T* xr = x + row * h;
    T* outr = out + row * h;
    for (int64_t j = col0; j < h; j += col_step) {
      const Pack<T, V> p = load_pack<T, V>(xr + j);
      Pack<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t u = static_cast<acc_t>(p.v[k]) + (bias ? bias[j + k] : acc_t(0));
        o.v[k] = static_cast<T>(math::gelu<acc_t>(u, kTanh));
      }
      store_pack<T, V>(outr + j, o);
    }
  }
}

template <typename T, typename D, int V, bool kTanh>
__global__ void gelu_bwd_kernel(const D* __restrict__ da, const T* __restrict__ u, T* __restrict__ out,
                                int64_t numel) {
  using acc_t = acc_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel; i += stride) {
    const Pack<T, V> up = load_pack<T, V>(u + i);
    const Pack<D, V> dp = load_pack<D, V>(da + i);
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      o.v[k] = static_cast<T>(static_cast<acc_t>(dp.v[k]) * math::gelu_grad<acc_t>(static_cast<acc_t>(up.v[k]), kTanh));
    }
    store_pack<T, V>(out + i, o);
  }
}

at::Tensor bias_gelu_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  const host::BiasGeluArgs args = host::bias_gelu_args(x, bias);
  const int64_t numel = x.numel(), h = args.h;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  host::run_pointwise(args.pass, tanh_form, [&](const auto* xp, auto* op, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(op)>;
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
    constexpr bool kTanh = decltype(tanh_tag)::value;
    if constexpr (std::is_same_v<M, T>) {  // always: x is read in its own dtype
      constexpr int V = kPack<T>;
      const acc_type<T>* bp = args.bias.defined() ? args.bias.const_data_ptr<acc_type<T>>() : nullptr;
      const int64_t rows = bp != nullptr ? numel / h : 1, cols = bp != nullptr ? h : numel;
      const bool vec = packable<T>(cols, {xp, op});
      auto launch = [&](auto kernel, int v) {
        const unsigned gx = flat_grid(cols / v, kThreads);
        const dim3 grid(gx, static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, 65535))));
        kernel<<<grid, kThreads, 0, stream>>>(xp, bp, op, rows, cols);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      vec ? launch(bias_gelu_kernel<T, V, kTanh>, V) : launch(bias_gelu_kernel<T, 1, kTanh>, 1);
    }
  });
  return args.pass.out;
}

at::Tensor gelu_bwd_cuda(const at::Tensor& da, const at::Tensor& u, c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  const c10::cuda::CUDAGuard guard(u.device());
  const host::GeluBwdArgs args = host::gelu_bwd_args(da, u);
  const int64_t numel = u.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  host::run_pointwise(args.pass, tanh_form, [&](const auto* dp, auto* op, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(op)>;
    using D = std::remove_cv_t<std::remove_pointer_t<decltype(dp)>>;
    constexpr bool kTanh = decltype(tanh_tag)::value;
    constexpr int V = kPack<T> < kPack<D> ? kPack<T> : kPack<D>;
    const T* up = args.u.const_data_ptr<T>();
    const bool vec = packable<T>(numel, {up, op}) && packable<D>(numel, {dp}) && numel % V == 0;
    auto launch = [&](auto kernel, int v) {
      kernel<<<flat_grid(numel / v, kThreads), kThreads, 0, stream>>>(dp, up, op, numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    vec ? launch(gelu_bwd_kernel<T, D, V, kTanh>, V) : launch(gelu_bwd_kernel<T, D, 1, kTanh>, 1);
  });
  return args.pass.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("bias_gelu_kernel", &bias_gelu_cuda);
  m.impl("gelu_bwd_kernel", &gelu_bwd_cuda);
}

}  // namespace cuda
}  // namespace ckpt_ext
