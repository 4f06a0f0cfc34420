// LayerNorm forward on CPU: one row at a time, fp32 statistics.  x: (N, d) -> y (N, d) in x's dtype, mean/rstd (N,) fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace ckpt_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.dim() == 2, "layer_norm_fwd_kernel: x must be (N, d)");
  auto xc = x.contiguous().to(at::kFloat);
  auto w = weight.contiguous().to(at::kFloat);
  auto b = bias.contiguous().to(at::kFloat);
  const int64_t n = xc.size(0), d = xc.size(1);
  auto y = at::empty({n, d}, xc.options());
  auto mean = at::empty({n}, xc.options());
  auto rstd = at::empty({n}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xp + i * d;
      double s = 0;
      for (int64_t j = 0; j < d; ++j) s += row[j];
      const float mu = static_cast<float>(s / d);
      double v = 0;
      for (int64_t j = 0; j < d; ++j) v += (row[j] - mu) * (row[j] - mu);
      const float r = 1.0f / std::sqrt(static_cast<float>(v / d) + static_cast<float>(eps));
      for (int64_t j = 0; j < d; ++j) yp[i * d + j] = (row[j] - mu) * r * wp[j] + bp[j];
      mp[i] = mu;
      rp[i] = r;
    }
  });
  return {y.to(x.scalar_type()), mean, rstd};
}

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) { m.impl("layer_norm_fwd_kernel", &layer_norm_fwd_cpu); }

}  // namespace ckpt_ext
