// LayerNorm forward and backward on CUDA: one thread block per row, fp32 statistics (fp64 for fp64 x).
//
// Forward  x (N, d) -> y (N, d), mean (N,), rstd (N,):  two block reductions (Σx, then Σ(x - mean)²), as the CPU kernel.
// Backward dy, x (N, d) -> dx (+ dresidual), y if emit_y; x̂ rebuilt from mean/rstd; c1 = mean(g x̂), c2 = mean(g),
//          g = dy * w, dx = rstd (g - c2 - x̂ c1). dweight/dbias: block k of the grid owns rows k, k + G, k + 2G, ...
//          (G = gridDim.x, fixed by N). Each thread owns fixed columns (at most kRegChunks packs of V), so its fp32
//          dweight/dbias partials live in registers over all of its rows (row order) and are written once to the
//          block's partial row; a second kernel sums the G partials per column in order: deterministic, no atomics.
//          Rows wider than kRegChunks * 512 * V accumulate in the block's global partial row instead (same order).
// Row streams are read in 16-byte packs when aligned (Pack<T, V>); w, b, partials per element.
#include <torch/library.h>

#include "../common/ckpt_math.h"
#include "cuda_utils.cuh"

namespace ckpt_ext {
namespace cuda {
namespace {

template <typename T, int V>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, const acc_type<T>* __restrict__ w,
                                      const acc_type<T>* __restrict__ b, T* __restrict__ y,
                                      acc_type<T>* __restrict__ mean, acc_type<T>* __restrict__ rstd, int64_t d,
                                      double eps) {
  using acc_t = acc_type<T>;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  acc_t sum = 0, unused = 0;
  for (int64_t j = threadIdx.x * V; j < d; j += step) {
    const Pack<T, V> p = load_pack<T, V>(xr + j);
#pragma unroll
    for (int k = 0; k < V; ++k) sum += static_cast<acc_t>(p.v[k]);
  }
  block_sum2(sum, unused);
  const acc_t mu = sum / static_cast<acc_t>(d);
  const acc_t r = row_rstd<T, V>(xr, d, mu, eps);
  for (int64_t j = threadIdx.x * V; j < d; j += step) {
    const Pack<T, V> p = load_pack<T, V>(xr + j);
    Pack<T, V> out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = static_cast<T>((static_cast<acc_t>(p.v[k]) - mu) * r * w[j + k] + b[j + k]);
    store_pack<T, V>(yr + j, out);
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = r;
  }
}

// G is the dtype of dy and dresidual: T, or acc_t when either came in another dtype (then both were widened).
template <typename T, typename G, int V>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_bwd_kernel(const G* __restrict__ dy, const T* __restrict__ x, const acc_type<T>* __restrict__ mean,
                          const acc_type<T>* __restrict__ rstd, const acc_type<T>* __restrict__ w,
                          const acc_type<T>* __restrict__ b, const G* __restrict__ dres, T* __restrict__ dx,
                          T* __restrict__ y, acc_type<T>* __restrict__ partials, int64_t n, int64_t d,
                          bool in_registers) {
  using acc_t = acc_type<T>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  acc_t* pw = partials + blockIdx.x * d;
  acc_t* pb = partials + (gridDim.x + blockIdx.x) * d;
  acc_t rw[kRegChunks][V], rb[kRegChunks][V];
#pragma unroll
  for (int c = 0; c < kRegChunks; ++c) {
#pragma unroll
    for (int k = 0; k < V; ++k) rw[c][k] = rb[c][k] = acc_t(0);
  }
  if (!in_registers) {
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) pw[j] = pb[j] = acc_t(0);
  }
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* xr = x + row * d;
    const G* dyr = dy + row * d;
    const acc_t mu = mean[row], r = rstd[row];
    acc_t sgx = 0, sg = 0;
    for (int64_t j = threadIdx.x * V; j < d; j += step) {
      const Pack<T, V> xp = load_pack<T, V>(xr + j);
      const Pack<G, V> gp = load_pack<G, V>(dyr + j);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t xhat = (static_cast<acc_t>(xp.v[k]) - mu) * r;
        const acc_t g = static_cast<acc_t>(gp.v[k]) * w[j + k];
        sgx += g * xhat;
        sg += g;
      }
    }
    block_sum2(sgx, sg);
    const acc_t c1 = sgx / static_cast<acc_t>(d), c2 = sg / static_cast<acc_t>(d);
    // dx, y and the dweight/dbias contributions of the pack at column j, accumulated into aw/ab[0 .. V).
    const G* dres_row = dres ? dres + row * d : nullptr;
    auto pack = [&](int64_t j, acc_t* aw, acc_t* ab) {
      const NormBwdPacks<T, G, V> in = load_norm_bwd_packs<T, G, V>(xr, dyr, dres_row, j);
      Pack<T, V> dxp, yp;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t xhat = (static_cast<acc_t>(in.x.v[k]) - mu) * r;
        const acc_t dyv = static_cast<acc_t>(in.dy.v[k]);
        acc_t v = (dyv * w[j + k] - c2 - xhat * c1) * r;
        if (dres) v += static_cast<acc_t>(in.res.v[k]);
        dxp.v[k] = static_cast<T>(v);
        yp.v[k] = static_cast<T>(xhat * w[j + k] + b[j + k]);
        aw[k] += dyv * xhat;
        ab[k] += dyv;
      }
      store_pack<T, V>(dx + row * d + j, dxp);
      if (y) store_pack<T, V>(y + row * d + j, yp);
    };
    owned_packs<V>(
        d, in_registers, [&](int64_t j, int c) { pack(j, rw[c], rb[c]); }, [&](int64_t j) { pack(j, pw + j, pb + j); });
  }
  if (in_registers) {
    auto flush = [&](int64_t j, int c) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        pw[j + k] = rw[c][k];
        pb[j + k] = rb[c][k];
      }
    };
    owned_packs<V>(d, true, flush, [](int64_t) {});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.dim() == 2, "layer_norm_fwd_kernel: x must be (N, d), got ", x.sizes());
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(weight.numel() == d && bias.numel() == d, "layer_norm_fwd_kernel: weight and bias must be (d,)");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor xc = x.contiguous(), w = as_contig(weight, acc), b = as_contig(bias, acc);
  at::Tensor y = at::empty({n, d}, xc.options());
  at::Tensor mean = at::empty({n}, xc.options().dtype(acc)), rstd = at::empty({n}, xc.options().dtype(acc));
  if (n == 0) return {y, mean, rstd};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int V = kPack<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool vec = packable<scalar_t>(d, {xp, yp});
    auto launch = [&](auto kernel, int v) {
      kernel<<<static_cast<unsigned>(n), row_threads(d, v), 0, stream>>>(xp, w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), yp,
                                                   mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), d,
                                                   eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    vec ? launch(layer_norm_fwd_kernel<scalar_t, V>, V) : launch(layer_norm_fwd_kernel<scalar_t, 1>, 1);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& dresidual, bool emit_y) {
  const bool has_res = host::check_layer_norm_bwd(dy, x, mean, rstd, weight, bias, dresidual);
  const int64_t n = x.size(0), d = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xt = x.scalar_type(), acc = acc_dtype(xt);
  const NormGrads grads = norm_grads(dy, x, dresidual, has_res);
  const at::Tensor xc = x.contiguous();
  const at::Tensor m = as_contig(mean, acc), r = as_contig(rstd, acc);
  const at::Tensor w = as_contig(weight, acc), b = as_contig(bias, acc);
  at::Tensor dx = at::empty({n, d}, xc.options());
  at::Tensor y = emit_y ? at::empty({n, d}, xc.options()) : at::empty({0}, xc.options());
  const int64_t blocks = norm_bwd_blocks(n);
  at::Tensor partials = at::empty({2 * blocks, d}, xc.options().dtype(acc));
  at::Tensor sums = at::empty({2, d}, xc.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "layer_norm_bwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    with_norm_grads<scalar_t>(grads, [&](auto g_tag, const auto* dyp, const auto* rp) {
      using G = typename decltype(g_tag)::type;
      constexpr int V = kPack2<scalar_t, G>;
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      scalar_t* yp = emit_y ? y.mutable_data_ptr<scalar_t>() : nullptr;
      const bool vec = packable<scalar_t>(d, {xp, dxp, yp}) && packable<G>(d, {dyp, rp}) && d % V == 0;
      auto launch = [&](auto kernel, int v) {
        launch_norm_bwd(kernel, blocks, n, d, v, stream, dyp, xp, m.const_data_ptr<acc_t>(), r.const_data_ptr<acc_t>(),
                        w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), rp, dxp, yp,
                        partials.mutable_data_ptr<acc_t>());
      };
      vec ? launch(layer_norm_bwd_kernel<scalar_t, G, V>, V) : launch(layer_norm_bwd_kernel<scalar_t, G, 1>, 1);
    });
    sum_partials<acc_t>(partials, blocks, d, sums, 2, stream);
  });
  at::Tensor dweight = sums[0].to(weight.scalar_type(), false, true).view(weight.sizes());
  at::Tensor dbias = sums[1].to(bias.scalar_type(), false, true).view(bias.sizes());
  return {dx, dweight, dbias, y};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CUDA, m) {
  m.impl("layer_norm_fwd_kernel", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd_kernel", &layer_norm_bwd_cuda);
}

}  // namespace cuda
}  // namespace ckpt_ext
