// LayerNorm forward on CPU.  x (N, d) -> y (N, d) in x's dtype, mean (N,), rstd (N,) in acc_t (fp32; fp64 for fp64 x).
//
// One row per iteration of at::parallel_for; per row, three passes over the row (it stays in L1/L2):
//   mean = Σx / d;  var = Σ(x - mean)² / d (two-pass, as reference.layer_norm_fwd);  rstd = 1 / sqrt(var + eps)
//   y = (x * rstd - mean * rstd) * w + b
// Vectorized<float> for fp32/bf16/fp16 rows (widened on load), scalar loops for the tail and for fp64.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

template <typename T>
void layer_norm_fwd_rows(const T* x, const acc_type<T>* w, const acc_type<T>* b, T* y, acc_type<T>* mean,
                         acc_type<T>* rstd, int64_t n, int64_t d, double eps) {
  using acc_t = acc_type<T>;
  const int64_t dv = kVectorized<T> ? d - d % kW : 0;
  at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * d;
      T* yr = y + i * d;
      acc_t sum = 0, sq = 0;
      if constexpr (kVectorized<T>) {
        Vec acc0(0), acc1(0);
        int64_t j = 0;
        for (; j + 2 * kW <= dv; j += 2 * kW) {
          acc0 += load_f(xr + j);
          acc1 += load_f(xr + j + kW);
        }
        if (j < dv) acc0 += load_f(xr + j);
        sum = hsum(acc0 + acc1);
      }
      for (int64_t j = dv; j < d; ++j) sum += static_cast<acc_t>(xr[j]);
      const acc_t mu = sum / static_cast<acc_t>(d);
      if constexpr (kVectorized<T>) {
        const Vec vmu(mu);
        Vec acc(0);
        for (int64_t j = 0; j < dv; j += kW) {
          const Vec c = load_f(xr + j) - vmu;
          acc = at::vec::fmadd(c, c, acc);
        }
        sq = hsum(acc);
      }
      for (int64_t j = dv; j < d; ++j) {
        const acc_t c = static_cast<acc_t>(xr[j]) - mu;
        sq += c * c;
      }
      const acc_t r = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
      const acc_t shift = -mu * r;
      if constexpr (kVectorized<T>) {
        const Vec vr(r), vs(shift);
        for (int64_t j = 0; j < dv; j += kW) {
          const Vec xhat = at::vec::fmadd(load_f(xr + j), vr, vs);
          store_f(yr + j, at::vec::fmadd(xhat, Vec::loadu(w + j), Vec::loadu(b + j)));
        }
      }
      for (int64_t j = dv; j < d; ++j) {
        yr[j] = static_cast<T>((static_cast<acc_t>(xr[j]) * r + shift) * w[j] + b[j]);
      }
      mean[i] = mu;
      rstd[i] = r;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.dim() == 2, "layer_norm_fwd_kernel: x must be (N, d), got ", x.sizes());
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(weight.numel() == d && bias.numel() == d, "layer_norm_fwd_kernel: weight and bias must be (d,)");
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = as_contig(weight, acc), b = as_contig(bias, acc);
  at::Tensor y = at::empty({n, d}, xc.options());
  at::Tensor mean = at::empty({n}, xc.options().dtype(acc));
  at::Tensor rstd = at::empty({n}, xc.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    layer_norm_fwd_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                                  b.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(),
                                  mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), n, d, eps);
  });
  return {y, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) { m.impl("layer_norm_fwd_kernel", &layer_norm_fwd_cpu); }

}  // namespace cpu
}  // namespace ckpt_ext
