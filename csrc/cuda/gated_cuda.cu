// The gated-MLP pointwise ops on CUDA, h = gate(g) u: SwiGLU (gate = silu, reference.swiglu_fwd / swiglu_bwd, Llama)
// and GeGLU (gate = tanh-form gelu, reference.geglu_fwd / geglu_bwd, Gemma / ModernBERT). Math: csrc/common/ckpt_math.h
// (math::gated / gated_and_grad on math::SiluGate / GeluTanhGate; fp32, fp64 for fp64).
//
// {swiglu,geglu}_fwd_kernel(g (N, F), u (N, F))  -> h = gate(g) u (N, F) in g.dtype
// {swiglu,geglu}_bwd_kernel(dh (N, F), g, u)      -> dg = dh u gate'(g) in g.dtype, du = dh gate(g) in u.dtype
// One implementation templated on the op (host::SwigluOp / GegluOp, llama_host.h: its gate and its names). Flat
// grid-stride loops in 16-byte packs (Pack<T, V>) when g, u (and dh) share one dtype and are aligned; mixed dtypes are
// widened to acc_t first and the outputs cast once. Outputs are fresh tensors, on the current stream. swiglu_cuda.cu's
// swiglu_linear_wgrad computes its h with swiglu_fwd_cuda.
#include <torch/library.h>

#include <tuple>

#include "../common/ckpt_math.h"
#include "../common/llama_host.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// h = gate(g) u over numel values in packs of V.
template <typename Gate, typename T, int V>
__global__ void gated_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ h, int64_t numel) {
  using acc_t = acc_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel; i += stride) {
    const Pack<T, V> gp = load_pack<T, V>(g + i), up = load_pack<T, V>(u + i);
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      o.v[k] = static_cast<T>(math::gated<Gate, acc_t>(static_cast<acc_t>(gp.v[k]), static_cast<acc_t>(up.v[k])));
    }
    store_pack<T, V>(h + i, o);
  }
}

// dg, du of h = gate(g) u given dh, over numel values in packs of V.
template <typename Gate, typename T, int V>
__global__ void gated_bwd_kernel(const T* __restrict__ dh, const T* __restrict__ g, const T* __restrict__ u,
                                 T* __restrict__ dg, T* __restrict__ du, int64_t numel) {
  using acc_t = acc_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < numel; i += stride) {
    const Pack<T, V> dp = load_pack<T, V>(dh + i), gp = load_pack<T, V>(g + i), up = load_pack<T, V>(u + i);
    Pack<T, V> dgo, duo;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t dgv, duv;
      math::gated_and_grad<Gate, acc_t>(static_cast<acc_t>(dp.v[k]), static_cast<acc_t>(gp.v[k]),
                                        static_cast<acc_t>(up.v[k]), &dgv, &duv);
      dgo.v[k] = static_cast<T>(dgv);
      duo.v[k] = static_cast<T>(duv);
    }
    store_pack<T, V>(dg + i, dgo);
    store_pack<T, V>(du + i, duo);
  }
}

template <typename Op>
at::Tensor gated_fwd_cuda(const at::Tensor& g, const at::Tensor& u) {
  host::check_swiglu(Op::kFwd, g, u);
  const c10::cuda::CUDAGuard guard(g.device());
  const auto dt = g.scalar_type(), ct = u.scalar_type() == dt ? dt : acc_dtype(dt);
  const at::Tensor gc = as_contig(g, ct), uc = as_contig(u, ct);
  at::Tensor h = at::empty(g.sizes(), gc.options());
  const int64_t numel = g.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ct, Op::kFwd, [&] {
      constexpr int V = kPack<scalar_t>;
      const scalar_t *gp = gc.const_data_ptr<scalar_t>(), *up = uc.const_data_ptr<scalar_t>();
      scalar_t* hp = h.mutable_data_ptr<scalar_t>();
      const auto stream = c10::cuda::getCurrentCUDAStream();
      if (packable<scalar_t>(numel, {gp, up, hp})) {
        gated_fwd_kernel<typename Op::Gate, scalar_t, V>
            <<<flat_grid(numel / V, kThreads), kThreads, 0, stream>>>(gp, up, hp, numel);
      } else {
        gated_fwd_kernel<typename Op::Gate, scalar_t, 1>
            <<<flat_grid(numel, kThreads), kThreads, 0, stream>>>(gp, up, hp, numel);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return h.scalar_type() == dt ? h : h.to(dt);
}

template <typename Op>
std::tuple<at::Tensor, at::Tensor> gated_bwd_cuda(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  host::check_gated_bwd<Op>(dh, g, u);
  const c10::cuda::CUDAGuard guard(g.device());
  const auto dt = g.scalar_type();
  const bool same = u.scalar_type() == dt && dh.scalar_type() == dt;
  const auto ct = same ? dt : acc_dtype(dt);
  const at::Tensor gc = as_contig(g, ct), uc = as_contig(u, ct), dhc = as_contig(dh, ct);
  at::Tensor dg = at::empty(g.sizes(), gc.options()), du = at::empty(g.sizes(), gc.options());
  const int64_t numel = g.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ct, Op::kBwd, [&] {
      constexpr int V = kPack<scalar_t>;
      const scalar_t *gp = gc.const_data_ptr<scalar_t>(), *up = uc.const_data_ptr<scalar_t>();
      const scalar_t* dp = dhc.const_data_ptr<scalar_t>();
      scalar_t *dgp = dg.mutable_data_ptr<scalar_t>(), *dup = du.mutable_data_ptr<scalar_t>();
      const auto stream = c10::cuda::getCurrentCUDAStream();
      if (packable<scalar_t>(numel, {gp, up, dp, dgp, dup})) {
        gated_bwd_kernel<typename Op::Gate, scalar_t, V>
            <<<flat_grid(numel / V, kThreads), kThreads, 0, stream>>>(dp, gp, up, dgp, dup, numel);
      } else {
        gated_bwd_kernel<typename Op::Gate, scalar_t, 1>
            <<<flat_grid(numel, kThreads), kThreads, 0, stream>>>(dp, gp, up, dgp, dup, numel);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dg.scalar_type() == dt ? dg : dg.to(dt), du.scalar_type() == u.scalar_type() ? du : du.to(u.scalar_type())};
}

}  // namespace

at::Tensor swiglu_fwd_cuda(const at::Tensor& g, const at::Tensor& u) {
  return gated_fwd_cuda<host::SwigluOp>(g, u);
}

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("swiglu_fwd_kernel", &gated_fwd_cuda<host::SwigluOp>);
  m.impl("swiglu_bwd_kernel", &gated_bwd_cuda<host::SwigluOp>);
  m.impl("geglu_fwd_kernel", &gated_fwd_cuda<host::GegluOp>);
  m.impl("geglu_bwd_kernel", &gated_bwd_cuda<host::GegluOp>);
}

}  // namespace cuda
}  // namespace ckpt_ext
