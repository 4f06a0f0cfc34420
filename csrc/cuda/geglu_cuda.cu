// GeGLU on CUDA (reference.geglu_fwd / geglu_bwd: the Gemma / ModernBERT MLP). Math: csrc/common/ckpt_math.h
// (math::geglu / geglu_and_grad: the tanh-form GELU, fp32, fp64 for fp64).
//
// geglu_fwd_kernel(g (N, F), u (N, F))      -> h = gelu_tanh(g) u (N, F) in g.dtype
// geglu_bwd_kernel(dh (N, F), g, u)          -> dg = dh u gelu_tanh'(g) in g.dtype, du = dh gelu_tanh(g) in u.dtype
// Flat grid-stride loops in 16-byte packs (Pack<T, V>) when g, u (and dh) share one dtype and are aligned; mixed
// dtypes are widened to acc_t first and the outputs cast once. Outputs are fresh tensors, on the current stream.
#include <torch/library.h>

#include <tuple>

#include "../common/ckpt_math.h"
#include "../common/llama_host.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// h = gelu_tanh(g) u over numel values in packs of V.
template <typename T, int V>
__global__ void geglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ h, int64_t numel) {
  using acc_t = acc_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel; i += stride) {
    const Pack<T, V> gp = load_pack<T, V>(g + i), up = load_pack<T, V>(u + i);
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      o.v[k] = static_cast<T>(math::geglu<acc_t>(static_cast<acc_t>(gp.v[k]), static_cast<acc_t>(up.v[k])));
    }
    store_pack<T, V>(h + i, o);
  }
}

// dg, du of h = gelu_tanh(g) u given dh, over numel values in packs of V.
template <typename T, int V>
__global__ void geglu_bwd_kernel(const T* __restrict__ dh, const T* __restrict__ g, const T* __restrict__ u,
                                 T* __restrict__ dg, T* __restrict__ du, int64_t numel) {
  using acc_t = acc_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel; i += stride) {
    const Pack<T, V> dp = load_pack<T, V>(dh + i), gp = load_pack<T, V>(g + i), up = load_pack<T, V>(u + i);
    Pack<T, V> dgo, duo;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t dgv, duv;
      math::geglu_and_grad<acc_t>(static_cast<acc_t>(dp.v[k]), static_cast<acc_t>(gp.v[k]),
                                  static_cast<acc_t>(up.v[k]), &dgv, &duv);
      dgo.v[k] = static_cast<T>(dgv);
      duo.v[k] = static_cast<T>(duv);
    }
    store_pack<T, V>(dg + i, dgo);
    store_pack<T, V>(du + i, duo);
  }
}

at::Tensor geglu_fwd_cuda(const at::Tensor& g, const at::Tensor& u) {
  host::check_swiglu("geglu_fwd_kernel", g, u);
  const c10::cuda::CUDAGuard guard(g.device());
  const auto dt = g.scalar_type(), ct = u.scalar_type() == dt ? dt : acc_dtype(dt);
  const at::Tensor gc = as_contig(g, ct), uc = as_contig(u, ct);
  at::Tensor h = at::empty(g.sizes(), gc.options());
  const int64_t numel = g.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ct, "geglu_fwd_kernel", [&] {
      constexpr int V = kPack<scalar_t>;
      const scalar_t *gp = gc.const_data_ptr<scalar_t>(), *up = uc.const_data_ptr<scalar_t>();
      scalar_t* hp = h.mutable_data_ptr<scalar_t>();
      const auto stream = c10::cuda::getCurrentCUDAStream();
      if (packable<scalar_t>(numel, {gp, up, hp})) {
        geglu_fwd_kernel<scalar_t, V><<<flat_grid(numel / V, kThreads), kThreads, 0, stream>>>(gp, up, hp, numel);
      } else {
        geglu_fwd_kernel<scalar_t, 1><<<flat_grid(numel, kThreads), kThreads, 0, stream>>>(gp, up, hp, numel);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return h.scalar_type() == dt ? h : h.to(dt);
}

std::tuple<at::Tensor, at::Tensor> geglu_bwd_cuda(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  host::check_swiglu("geglu_bwd_kernel", g, u);
  TORCH_CHECK(dh.sizes() == g.sizes(), "geglu_bwd_kernel: dh must be (N, F) like g, got ", dh.sizes());
  const c10::cuda::CUDAGuard guard(g.device());
  const auto dt = g.scalar_type();
  const bool same = u.scalar_type() == dt && dh.scalar_type() == dt;
  const auto ct = same ? dt : acc_dtype(dt);
  const at::Tensor gc = as_contig(g, ct), uc = as_contig(u, ct), dhc = as_contig(dh, ct);
  at::Tensor dg = at::empty(g.sizes(), gc.options()), du = at::empty(g.sizes(), gc.options());
  const int64_t numel = g.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ct, "geglu_bwd_kernel", [&] {
      constexpr int V = kPack<scalar_t>;
      const scalar_t *gp = gc.const_data_ptr<scalar_t>(), *up = uc.const_data_ptr<scalar_t>();
      const scalar_t* dp = dhc.const_data_ptr<scalar_t>();
      scalar_t *dgp = dg.mutable_data_ptr<scalar_t>(), *dup = du.mutable_data_ptr<scalar_t>();
      const auto stream = c10::cuda::getCurrentCUDAStream();
      if (packable<scalar_t>(numel, {gp, up, dp, dgp, dup})) {
        geglu_bwd_kernel<scalar_t, V><<<flat_grid(numel / V, kThreads), kThreads, 0, stream>>>(dp, gp, up, dgp, dup,
                                                                                                numel);
      } else {
        geglu_bwd_kernel<scalar_t, 1><<<flat_grid(numel, kThreads), kThreads, 0, stream>>>(dp, gp, up, dgp, dup,
                                                                                            numel);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dg.scalar_type() == dt ? dg : dg.to(dt), du.scalar_type() == u.scalar_type() ? du : du.to(u.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("geglu_fwd_kernel", &geglu_fwd_cuda);
  m.impl("geglu_bwd_kernel", &geglu_bwd_cuda);
}

}  // namespace cuda
}  // namespace ckpt_ext
