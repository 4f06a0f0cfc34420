// RMSNorm forward and backward on CUDA (reference.rms_norm_fwd / rms_norm_bwd), Hugging Face's cast order, fp32
// statistics (fp64 for fp64 x). Same dtype rules as csrc/cpu/rms_norm_cpu.cpp; shapes checked in llama_host.h.
//
// Forward  x (N, d) -> y (N, d) in promote(x, w), rstd (N,): one block per row; Σx² by one block reduction, then
//          n = x rstd rounded to x.dtype, y = w n.
// Backward dy, x (N, d) -> dx (+ dresidual), dweight (d,), y if emit_y: block k of a fixed grid of G = min(N, 512)
//          blocks owns rows k, k + G, ...; per row c1 = Σ dy w x̂ / d (one block reduction), dx = rstd (dy w - x̂ c1).
//          Each thread owns fixed columns (at most kRegChunks packs of V), so its dweight partial Σ dy n lives in
//          registers over all of its rows and is written once; a second kernel sums the G partial rows per column in
//          order: deterministic, no atomics. Rows wider than kRegChunks * 512 * V accumulate in the block's global
//          partial row instead (same order, same result).
// Row streams are read in 16-byte packs when aligned (Pack<T, V>); y is written as T, or as acc_t (an fp32 weight
// with 16-bit x) element by element; any other output dtype is cast once from acc_t.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/llama_host.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {
namespace {


template <typename T, int V>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_fwd_kernel(const T* __restrict__ x, const acc_type<T>* __restrict__ w, void* __restrict__ y, bool y_acc,
                        acc_type<T>* __restrict__ rstd, int64_t d, double eps) {
  using acc_t = acc_type<T>;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  const acc_t r = row_rstd<T, V>(xr, d, acc_t(0), eps);
  for (int64_t j = threadIdx.x * V; j < d; j += step) {
    const Pack<T, V> p = load_pack<T, V>(xr + j);
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t v = w[j + k] * static_cast<acc_t>(static_cast<T>(static_cast<acc_t>(p.v[k]) * r));
      if (y_acc) {
        static_cast<acc_t*>(y)[row * d + j + k] = v;
      } else {
        out.v[k] = static_cast<T>(v);
      }
    }
    if (!y_acc) store_pack<T, V>(static_cast<T*>(y) + row * d + j, out);
  }
  if (threadIdx.x == 0) rstd[row] = r;
}

// G is the dtype of dy and dresidual: T, or acc_t when either came in another dtype (then both were widened).
template <typename T, typename G, int V>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_bwd_kernel(const G* __restrict__ dy, const T* __restrict__ x, const acc_type<T>* __restrict__ rstd,
                        const acc_type<T>* __restrict__ w, const G* __restrict__ dres, T* __restrict__ dx,
                        void* __restrict__ y, bool y_acc, acc_type<T>* __restrict__ partials, int64_t n, int64_t d,
                        bool in_registers) {
  using acc_t = acc_type<T>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  acc_t* pglobal = partials + blockIdx.x * d;
  acc_t preg[kRegChunks][V];
#pragma unroll
  for (int c = 0; c < kRegChunks; ++c) {
#pragma unroll
    for (int k = 0; k < V; ++k) preg[c][k] = acc_t(0);
  }
  if (!in_registers) {
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) pglobal[j] = acc_t(0);
  }
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* xr = x + row * d;
    const G* dyr = dy + row * d;
    const acc_t r = rstd[row];
    acc_t sgx = 0, unused = 0;
    for (int64_t j = threadIdx.x * V; j < d; j += step) {
      const Pack<T, V> xp = load_pack<T, V>(xr + j);
      const Pack<G, V> gp = load_pack<G, V>(dyr + j);
#pragma unroll
      for (int k = 0; k < V; ++k) sgx += static_cast<acc_t>(gp.v[k]) * w[j + k] * static_cast<acc_t>(xp.v[k]);
    }
    block_sum2(sgx, unused);
    const acc_t c1 = sgx * r / static_cast<acc_t>(d);
    // dx, y and the dweight contribution of the pack at column j, accumulated into acc[0 .. V).
    const G* dres_row = dres ? dres + row * d : nullptr;
    auto pack = [&](int64_t j, acc_t* acc) {
      const NormBwdPacks<T, G, V> in = load_norm_bwd_packs<T, G, V>(xr, dyr, dres_row, j);
      Pack<T, V> dxp, yp;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t xhat = static_cast<acc_t>(in.x.v[k]) * r, dyv = static_cast<acc_t>(in.dy.v[k]);
        acc_t v = (dyv * w[j + k] - xhat * c1) * r;
        if (dres) v += static_cast<acc_t>(in.res.v[k]);
        dxp.v[k] = static_cast<T>(v);
        const acc_t nv = static_cast<acc_t>(static_cast<T>(xhat));
        acc[k] += dyv * nv;
        if (y != nullptr && y_acc) static_cast<acc_t*>(y)[row * d + j + k] = w[j + k] * nv;
        yp.v[k] = static_cast<T>(w[j + k] * nv);
      }
      store_pack<T, V>(dx + row * d + j, dxp);
      if (y != nullptr && !y_acc) store_pack<T, V>(static_cast<T*>(y) + row * d + j, yp);
    };
    owned_packs<V>(
        d, in_registers, [&](int64_t j, int c) { pack(j, preg[c]); }, [&](int64_t j) { pack(j, pglobal + j); });
  }
  if (in_registers) {
    auto flush = [&](int64_t j, int c) {
#pragma unroll
      for (int k = 0; k < V; ++k) pglobal[j + k] = preg[c][k];
    };
    owned_packs<V>(d, true, flush, [](int64_t) {});
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  host::check_rms_norm_fwd(x, weight);
  const int64_t n = x.size(0), d = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xt = x.scalar_type(), acc = acc_dtype(xt), od = c10::promoteTypes(xt, weight.scalar_type());
  const at::Tensor xc = x.contiguous(), w = as_contig(weight, acc);
  const bool y_acc = od != xt;
  at::Tensor y = at::empty({n, d}, xc.options().dtype(y_acc ? acc : xt));
  at::Tensor rstd = at::empty({n}, xc.options().dtype(acc));
  if (n > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "rms_norm_fwd_kernel", [&] {
      using acc_t = acc_type<scalar_t>;
      constexpr int V = kPack<scalar_t>;
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      void* yp = y.mutable_data_ptr();
      const bool vec = packable<scalar_t>(d, {xp, y_acc ? nullptr : yp});
      auto launch = [&](auto kernel, int v) {
        kernel<<<static_cast<unsigned>(n), row_threads(d, v), 0, stream>>>(
            xp, w.const_data_ptr<acc_t>(), yp, y_acc, rstd.mutable_data_ptr<acc_t>(), d, eps);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      vec ? launch(rms_norm_fwd_kernel<scalar_t, V>, V) : launch(rms_norm_fwd_kernel<scalar_t, 1>, 1);
    });
  }
  return {y.scalar_type() == od ? y : y.to(od), rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& rstd, const at::Tensor& weight,
                                                                 const std::optional<at::Tensor>& dresidual,
                                                                 bool emit_y) {
  const bool has_res = host::check_rms_norm_bwd(dy, x, rstd, weight, dresidual);
  const int64_t n = x.size(0), d = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xt = x.scalar_type(), acc = acc_dtype(xt), od = c10::promoteTypes(xt, weight.scalar_type());
  const NormGrads grads = norm_grads(dy, x, dresidual, has_res);
  const at::Tensor xc = x.contiguous();
  const at::Tensor r = as_contig(rstd, acc), w = as_contig(weight, acc);
  const bool y_acc = od != xt;
  at::Tensor dx = at::empty({n, d}, xc.options());
  at::Tensor y = emit_y ? at::empty({n, d}, xc.options().dtype(y_acc ? acc : xt)) : at::empty({0}, xc.options());
  const int64_t blocks = norm_bwd_blocks(n);
  at::Tensor partials = at::zeros({blocks, d}, xc.options().dtype(acc));
  at::Tensor dweight = at::empty({d}, xc.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "rms_norm_bwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    if (n > 0 && d > 0) {
      with_norm_grads<scalar_t>(grads, [&](auto g_tag, const auto* dyp, const auto* rp) {
        using G = typename decltype(g_tag)::type;
        constexpr int V = kPack2<scalar_t, G>;
        const scalar_t* xp = xc.const_data_ptr<scalar_t>();
        scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
        void* yp = emit_y ? y.mutable_data_ptr() : nullptr;
        const bool vec = packable<scalar_t>(d, {xp, dxp, y_acc ? nullptr : yp}) && packable<G>(d, {dyp, rp});
        auto launch = [&](auto kernel, int v) {
          launch_norm_bwd(kernel, blocks, n, d, v, stream, dyp, xp, r.const_data_ptr<acc_t>(),
                          w.const_data_ptr<acc_t>(), rp, dxp, yp, y_acc, partials.mutable_data_ptr<acc_t>());
        };
        vec ? launch(rms_norm_bwd_kernel<scalar_t, G, V>, V) : launch(rms_norm_bwd_kernel<scalar_t, G, 1>, 1);
      });
    }
    sum_partials<acc_t>(partials, blocks, d, dweight, 1, stream);
  });
  if (emit_y && y.scalar_type() != od) y = y.to(od);
  return {dx, dweight.to(weight.scalar_type()), y};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("rms_norm_fwd_kernel", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd_kernel", &rms_norm_bwd_cuda);
}

}  // namespace cuda
}  // namespace ckpt_ext
