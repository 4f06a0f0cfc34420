// GELU forward with a fused bias, and GELU backward recomputed from the pre-activation, on CPU.
//
// bias_gelu_kernel(x (..., H), bias (H,)?, approximate) -> gelu(x + bias) (..., H) in x.dtype
// gelu_bwd_kernel(da (...), u (...), approximate)       -> da * gelu'(u)   (...)    in u.dtype
// Math (erf and tanh forms): csrc/common/ckpt_math.h; here the same formulas on Vectorized<float> (Sleef erf/exp),
// the scalar tails and fp64 use ckpt_math.h directly. Hot loops move 2 * kW values per step (load2_f/store2_f: one
// whole Vectorized<bf16/fp16> load + conversion, not two half-width ones). With a bias the tensor is walked row by
// row (H per row), without one as a flat array in chunks; at::parallel_for over rows/chunks.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "../common/ckpt_math.h"
#include "../common/ffn_host.h"
#include "gelu_rows.h"
#include "gelu_vec.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

constexpr int64_t kFlatGrain = 1 << 15;

at::Tensor bias_gelu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  const host::BiasGeluArgs args = host::bias_gelu_args(x, bias);
  const int64_t numel = x.numel(), h = args.h;
  host::run_pointwise(args.pass, tanh_form, [&](const auto* xp, auto* op, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(op)>;
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;  // T (x is read as it is)
    constexpr bool kTanh = decltype(tanh_tag)::value;
    if (args.bias.defined()) {
      const acc_type<T>* bp = args.bias.const_data_ptr<acc_type<T>>();
      at::parallel_for(0, numel / h, row_grain(h), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) bias_gelu_range<T, M, kTanh>(xp + i * h, bp, op + i * h, h);
      });
    } else {
      at::parallel_for(0, numel, kFlatGrain, [&](int64_t begin, int64_t end) {
        bias_gelu_range<T, M, kTanh>(xp + begin, nullptr, op + begin, end - begin);
      });
    }
  });
  return args.pass.out;
}

at::Tensor gelu_bwd_cpu(const at::Tensor& da, const at::Tensor& u, c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  const host::GeluBwdArgs args = host::gelu_bwd_args(da, u);
  host::run_pointwise(args.pass, tanh_form, [&](const auto* dap, auto* op, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(op)>;
    using D = std::remove_cv_t<std::remove_pointer_t<decltype(dap)>>;
    const T* up = args.u.const_data_ptr<T>();
    at::parallel_for(0, args.u.numel(), kFlatGrain, [&](int64_t begin, int64_t end) {
      gelu_bwd_range<T, D, decltype(tanh_tag)::value>(dap + begin, up + begin, op + begin, end - begin);
    });
  });
  return args.pass.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("bias_gelu_kernel", &bias_gelu_cpu);
  m.impl("gelu_bwd_kernel", &gelu_bwd_cpu);
}

}  // namespace cpu
}  // namespace ckpt_ext
