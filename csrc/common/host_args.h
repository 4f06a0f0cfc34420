// Host-side argument handling shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of the same op, so both
// backends check shapes, pick dtypes and lay out their inputs identically. Host code only: no device functions here.
//   as_contig(t, dtype)        t as a contiguous tensor of `dtype` (no copy when it already is one)
//   acc_dtype(dtype)           float64 stays float64; every other floating dtype computes in float32
//   acc_type<T>                the same as a C++ type: double for double, float for every other storage type
//   check_dropout_add(...)     p in [0, 1), residual shaped like x -> {has residual, output dtype}
//   dropout_add_buffers(...)   the checks above, x / residual contiguous in the output dtype, the output allocated,
//                              the mask hash's key / threshold and the scale (data<T>(): the three pointers)
//   check_tile_dropout(...)    x a contiguous fp32/fp64 (B, G, R, N) tile inside (B, heads, seq_q, seq_k) -> its sizes
//   check_layer_norm_bwd(...)  dy/x (N, d), mean/rstd (N,), weight/bias (d,), dresidual (N, d) -> has dresidual
//   parse_approximate(s)       "none" (erf GELU) -> false, "tanh" -> true, anything else an error
//   check_ffn_recompute / check_linear_bias_gelu / check_linear_gelu_bwd / check_gelu_linear_wgrad: shapes of the
//                              fused FFN ops (see ckpt_ext/ops/ffn.py)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/result_type.h>
#include <c10/util/Exception.h>

#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <type_traits>

#include "ckpt_math.h"

namespace ckpt_ext {
namespace host {

inline at::Tensor as_contig(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

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

// dropout_add_kernel's data pointers in T = the output dtype (res: nullptr without a residual).
template <typename T>
struct DropoutAddPtrs {
  const T* x;
  const T* res;
  T* out;
};

// dropout_add_kernel's operands on either device: x and residual contiguous in the output dtype, the fresh output, and
// the mask hash's key and threshold (ckpt_math.h); drop = p > 0, scale = 1 / (1 - p) (1 without dropout).
struct DropoutAddBuffers {
  DropoutAddArgs args;
  at::Tensor xc, rc, out;  // rc undefined without a residual
  uint32_t key, threshold;
  bool drop;
  double scale;

  template <typename T>
  DropoutAddPtrs<T> data() const {
    return {xc.const_data_ptr<T>(), args.has_residual ? rc.const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>()};
  }
};

inline DropoutAddBuffers dropout_add_buffers(const at::Tensor& x, const std::optional<at::Tensor>& residual, double p,
                                             int64_t seed) {
  const DropoutAddArgs args = check_dropout_add(x, residual, p);
  const at::Tensor xc = as_contig(x, args.out_dtype);
  const at::Tensor rc = args.has_residual ? as_contig(*residual, args.out_dtype) : at::Tensor();
  const bool drop = p > 0.0;
  return {args, xc, rc, at::empty(x.sizes(), xc.options()), math::seed_key(seed), math::dropout_threshold(p), drop,
          drop ? 1.0 / (1.0 - p) : 1.0};
}

struct TileDropoutArgs {
  int64_t b, g, r, n;  // the tile's sizes
};

inline TileDropoutArgs check_tile_dropout(const at::Tensor& x, int64_t heads, int64_t seq_q, int64_t seq_k,
                                          int64_t head0, int64_t row0, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "attention_tile_dropout_kernel: p must be in [0, 1), got ", p);
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(),
              "attention_tile_dropout_kernel: x must be a contiguous (B, G, R, N) tile");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "attention_tile_dropout_kernel: x must be float32 or float64, got ", x.scalar_type());
  const TileDropoutArgs a{x.size(0), x.size(1), x.size(2), x.size(3)};
  TORCH_CHECK(head0 >= 0 && row0 >= 0 && head0 + a.g <= heads && row0 + a.r <= seq_q && a.n <= seq_k,
              "attention_tile_dropout_kernel: the tile (heads head0.., rows row0.., keys 0..N) must lie inside "
              "(B, heads, seq_q, seq_k)");
  return a;
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

inline bool parse_approximate(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", "approximate must be 'none' or 'tanh', got '",
              std::string(approximate), "'");
  return approximate == "tanh";
}

inline void check_ffn_recompute(const at::Tensor& x1, const at::Tensor& mean, const at::Tensor& rstd,
                                const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& w1,
                                const at::Tensor& b1, const at::Tensor& dy, const at::Tensor& w2) {
  TORCH_CHECK(x1.dim() == 2 && w1.dim() == 2 && dy.dim() == 2 && w2.dim() == 2,
              "ffn_recompute_kernel: x1, w1, dy, w2 must be 2-D");
  const int64_t n = x1.size(0), d = x1.size(1), h = w1.size(0);
  TORCH_CHECK(w1.size(1) == d, "ffn_recompute_kernel: w1 must be (H, d=", d, "), got ", w1.sizes());
  TORCH_CHECK(dy.size(0) == n && dy.size(1) == d, "ffn_recompute_kernel: dy must be (N, d) = (", n, ", ", d, ")");
  TORCH_CHECK(w2.size(0) == d && w2.size(1) == h, "ffn_recompute_kernel: w2 must be (d, H) = (", d, ", ", h, ")");
  TORCH_CHECK(b1.numel() == h && mean.numel() == n && rstd.numel() == n && ln_weight.numel() == d &&
                  ln_bias.numel() == d,
              "ffn_recompute_kernel: b1 must be (H,), mean/rstd (N,), ln_weight/ln_bias (d,)");
}

inline bool check_linear_bias_gelu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_bias_gelu_kernel: x must be (N, K) and ",
              "w (H, K), got x ", x.sizes(), " w ", w.sizes());
  const bool has_bias = defined(b);
  const int64_t h = w.size(0);
  TORCH_CHECK(!has_bias || (b->dim() == 1 && b->size(0) == h), "linear_bias_gelu_kernel: b must be (H,) = (", h,
              ",)");
  return has_bias;
}

inline void check_linear_gelu_bwd(const at::Tensor& dy, const at::Tensor& w2, const at::Tensor& u) {
  TORCH_CHECK(dy.dim() == 2 && w2.dim() == 2 && u.dim() == 2, "linear_gelu_bwd_kernel: dy, w2, u must be 2-D");
  TORCH_CHECK(dy.size(1) == w2.size(0) && w2.size(1) == u.size(1) && dy.size(0) == u.size(0),
              "linear_gelu_bwd_kernel: shape mismatch, dy ", dy.sizes(), " w2 ", w2.sizes(), " u ", u.sizes());
}

inline void check_gelu_linear_wgrad(const at::Tensor& dy, const at::Tensor& u) {
  TORCH_CHECK(dy.dim() == 2 && u.dim() == 2 && dy.size(0) == u.size(0),
              "gelu_linear_wgrad_kernel: dy (N, d) and u (N, H) must be 2-D with the same rows");
}

}  // namespace host
}  // namespace ckpt_ext
