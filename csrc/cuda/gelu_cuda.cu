// GELU forward with a fused bias and GELU backward from the pre-activation on CUDA (math: csrc/common/ckpt_math.h).
//
// bias_gelu_kernel(x (..., H), bias (H,)?) -> gelu(x + bias);  gelu_bwd_kernel(da, u) -> da * gelu'(u).
// Grid-stride loops over the flat tensor in packs of V elements (16-byte accesses when aligned and the pack never
// straddles a row of H), fp32 math (fp64 for fp64 tensors), launched on the current stream.
#include <torch/library.h>

#include <string>

#include "../common/ckpt_math.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t packs) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((packs + kThreads - 1) / kThreads, 65536)));
}

template <typename T, int V, bool kTanh>
__global__ void bias_gelu_kernel(const T* __restrict__ x, const acc_type<T>* __restrict__ bias, T* __restrict__ out,
                                 int64_t numel, int64_t h) {
  using acc_t = acc_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel; i += stride) {
    const Pack<T, V> p = load_pack<T, V>(x + i);
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t u = static_cast<acc_t>(p.v[k]) + (bias ? bias[(i + k) % h] : acc_t(0));
      o.v[k] = static_cast<T>(math::gelu<acc_t>(u, kTanh));
    }
    store_pack<T, V>(out + i, o);
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
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t h = x.dim() == 0 ? 1 : x.size(-1);
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->numel() == h), "bias_gelu_kernel: bias must be (H,)");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = has_bias ? as_contig(*bias, acc_dtype(x.scalar_type())) : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), xc.options());
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int V = kPack<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc_t* bp = has_bias ? bc.const_data_ptr<acc_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vec = packable<scalar_t>(numel, {xp, op}) && (!has_bias || h % V == 0);
    auto launch = [&](auto kernel, int v) {
      kernel<<<grid_for(numel / v), kThreads, 0, stream>>>(xp, bp, op, numel, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (tanh_form) {
      vec ? launch(bias_gelu_kernel<scalar_t, V, true>, V) : launch(bias_gelu_kernel<scalar_t, 1, true>, 1);
    } else {
      vec ? launch(bias_gelu_kernel<scalar_t, V, false>, V) : launch(bias_gelu_kernel<scalar_t, 1, false>, 1);
    }
  });
  return out;
}

at::Tensor gelu_bwd_cuda(const at::Tensor& da, const at::Tensor& u, c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  TORCH_CHECK(da.sizes() == u.sizes(), "gelu_bwd_kernel: da and u must have the same shape");
  const c10::cuda::CUDAGuard guard(u.device());
  const bool da_same = da.scalar_type() == u.scalar_type();
  const at::Tensor uc = u.contiguous();
  const at::Tensor dac = da_same ? da.contiguous() : as_contig(da, acc_dtype(u.scalar_type()));
  at::Tensor out = at::empty(u.sizes(), uc.options());
  const int64_t numel = u.numel();
  if (numel == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "gelu_bwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    auto run = [&](auto d_tag) {
      using D = typename decltype(d_tag)::type;
      constexpr int V = kPack<scalar_t> < kPack<D> ? kPack<scalar_t> : kPack<D>;
      const D* dp = dac.const_data_ptr<D>();
      const scalar_t* up = uc.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const bool vec = packable<scalar_t>(numel, {up, op}) && packable<D>(numel, {dp}) && numel % V == 0;
      auto launch = [&](auto kernel, int v) {
        kernel<<<grid_for(numel / v), kThreads, 0, stream>>>(dp, up, op, numel);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (tanh_form) {
        vec ? launch(gelu_bwd_kernel<scalar_t, D, V, true>, V) : launch(gelu_bwd_kernel<scalar_t, D, 1, true>, 1);
      } else {
        vec ? launch(gelu_bwd_kernel<scalar_t, D, V, false>, V) : launch(gelu_bwd_kernel<scalar_t, D, 1, false>, 1);
      }
    };
    da_same ? run(TypeTag<scalar_t>{}) : run(TypeTag<acc_t>{});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("bias_gelu_kernel", &bias_gelu_cuda);
  m.impl("gelu_bwd_kernel", &gelu_bwd_cuda);
}

}  // namespace cuda
}  // namespace ckpt_ext
