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
#include "gelu_rows.h"
#include "gelu_vec.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

constexpr int64_t kFlatGrain = 1 << 15;

at::Tensor bias_gelu_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t h = x.dim() == 0 ? 1 : x.size(-1);
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->numel() == h), "bias_gelu_kernel: bias must be (H,)");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = has_bias ? as_contig(*bias, acc_dtype(x.scalar_type())) : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), xc.options());
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    auto run = [&](auto tanh_tag) {
      constexpr bool kTanh = decltype(tanh_tag)::value;
      if (has_bias) {
        const acc_t* bp = bc.const_data_ptr<acc_t>();
        at::parallel_for(0, numel / h, row_grain(h), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) bias_gelu_range<scalar_t, scalar_t, kTanh>(xp + i * h, bp, op + i * h, h);
        });
      } else {
        at::parallel_for(0, numel, kFlatGrain, [&](int64_t begin, int64_t end) {
          bias_gelu_range<scalar_t, scalar_t, kTanh>(xp + begin, nullptr, op + begin, end - begin);
        });
      }
    };
    tanh_form ? run(std::true_type{}) : run(std::false_type{});
  });
  return out;
}

at::Tensor gelu_bwd_cpu(const at::Tensor& da, const at::Tensor& u, c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  TORCH_CHECK(da.sizes() == u.sizes(), "gelu_bwd_kernel: da and u must have the same shape");
  const bool da_same = da.scalar_type() == u.scalar_type();
  const at::Tensor uc = u.contiguous();
  const at::Tensor dac = da_same ? da.contiguous() : as_contig(da, acc_dtype(u.scalar_type()));
  at::Tensor out = at::empty(u.sizes(), uc.options());
  const int64_t numel = u.numel();
  if (numel == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "gelu_bwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    auto run = [&](auto tanh_tag, const auto* dap) {
      constexpr bool kTanh = decltype(tanh_tag)::value;
      using D = std::remove_cv_t<std::remove_pointer_t<decltype(dap)>>;
      const scalar_t* up = uc.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, numel, kFlatGrain, [&](int64_t begin, int64_t end) {
        gelu_bwd_range<scalar_t, D, kTanh>(dap + begin, up + begin, op + begin, end - begin);
      });
    };
    if (da_same) {
      tanh_form ? run(std::true_type{}, dac.const_data_ptr<scalar_t>())
                : run(std::false_type{}, dac.const_data_ptr<scalar_t>());
    } else {
      tanh_form ? run(std::true_type{}, dac.const_data_ptr<acc_t>()) : run(std::false_type{}, dac.const_data_ptr<acc_t>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("bias_gelu_kernel", &bias_gelu_cpu);
  m.impl("gelu_bwd_kernel", &gelu_bwd_cpu);
}

}  // namespace cpu
}  // namespace ckpt_ext
