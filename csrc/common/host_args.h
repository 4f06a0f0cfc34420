// Host-side argument handling shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of the same op, so both
// backends check shapes, pick dtypes and lay out their inputs identically. Host code only: no device functions here.
//   as_contig(t, dtype)        t as a contiguous tensor of `dtype` (no copy when it already is one)
//   acc_dtype(dtype)           float64 stays float64; every other floating dtype computes in float32
//   check_dropout_add(...)     p in [0, 1), residual shaped like x -> {has residual, output dtype}
//   check_layer_norm_bwd(...)  dy/x (N, d), mean/rstd (N,), weight/bias (d,), dresidual (N, d) -> has dresidual
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/result_type.h>
#include <c10/util/Exception.h>

#include <optional>

namespace ckpt_ext {
namespace host {

inline at::Tensor as_contig(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

struct DropoutAddArgs {
  bool has_residual;
  at::ScalarType out_dtype;  // result_type(x, residual), or x's dtype without a residual
};

inline DropoutAddArgs check_dropout_add(const at::Tensor& x, const std::optional<at::Tensor>& residual, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_add_kernel: p must be in [0, 1), got ", p);
  const bool has_res = defined(residual);
  TORCH_CHECK(!has_res || residual->sizes() == x.sizes(), "dropout_add_kernel: residual must have x's shape");
  return {has_res, has_res ? at::result_type(x, *residual) : x.scalar_type()};
}

inline bool check_layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& bias,
                                 const std::optional<at::Tensor>& dresidual) {
  TORCH_CHECK(x.dim() == 2 && dy.sizes() == x.sizes(), "layer_norm_bwd_kernel: dy and x must be the same (N, d)");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(mean.numel() == n && rstd.numel() == n, "layer_norm_bwd_kernel: mean/rstd must be (N,)");
  TORCH_CHECK(weight.numel() == d && bias.numel() == d, "layer_norm_bwd_kernel: weight and bias must be (d,)");
  const bool has_res = defined(dresidual);
  TORCH_CHECK(!has_res || dresidual->sizes() == x.sizes(), "layer_norm_bwd_kernel: dresidual must be (N, d)");
  return has_res;
}

}  // namespace host
}  // namespace ckpt_ext
