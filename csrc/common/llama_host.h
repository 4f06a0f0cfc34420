// Host side of the Llama-family kernel ops (RMSNorm, SwiGLU / GeGLU, RoPE and the matmul-fused SwiGLU ops), shared
// by the CPU (csrc/cpu/rms_norm_cpu.cpp, gated_cpu.cpp, swiglu_ffn_cpu.cpp, rope_cpu.cpp) and CUDA
// (csrc/cuda/rms_norm_cuda.cu, gated_cuda.cu, swiglu_cuda.cu, rope_cuda.cu) kernels, so both backends check arguments
// and pick dtypes identically (contract: ckpt_ext/ops/rms_norm.py, swiglu.py, geglu.py, rope.py; math:
// ckpt_ext/reference.py). Host code only. SwigluOp / GegluOp: the gated ops' gate (ckpt_math.h) and names.
//
//   check_rms_norm_fwd / check_rms_norm_bwd / check_swiglu / check_gated_bwd / check_rope / check_linear_swiglu /
//   check_swiglu_linear_bwd / check_swiglu_linear_wgrad / check_swiglu_ffn_recompute
//                          shapes of each op; every error names the argument
//   same_or_acc(t, dt)     t contiguous in dt when it has dt, else in acc_dtype(dt) (an exact widening for the dtypes
//                          we meet), so a kernel reads either T or acc_t and never rounds an input twice
//   mm_acc(a, b)           a @ b accumulated AND returned in acc = fp32 (fp64 for fp64 a): the GEMMs whose result must
//                          never be rounded (g, u, dH). CUDA 16-bit: cuBLAS with an fp32 output (at::mm out_dtype);
//                          otherwise the operands are widened exactly to acc first (on CPUs without bf16 FMA units
//                          MKL's fp32 GEMM is also ~5x faster than its bf16 one)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

#include "host_args.h"

namespace ckpt_ext {
namespace host {

inline at::Tensor same_or_acc(const at::Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt ? t.contiguous() : as_contig(t, acc_dtype(dt));
}

inline bool is_16bit(at::ScalarType dt) { return dt == at::kBFloat16 || dt == at::kHalf; }

// (N, M) = a (N, K) @ b (K, M) in acc (fp32, fp64 when acc is fp64); a and b may be strided views.
inline at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.is_cuda() && acc == at::kFloat && a.scalar_type() == b.scalar_type() && is_16bit(a.scalar_type())) {
    return at::mm(a, b, at::kFloat);
  }
  return at::mm(a.to(acc), b.to(acc));
}

inline void check_rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2, "rms_norm_fwd_kernel: x must be (N, d), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "rms_norm_fwd_kernel: weight must be (d,) = (",
              x.size(1), ",), got ", weight.sizes());
}

inline bool check_rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                               const at::Tensor& weight, const std::optional<at::Tensor>& dresidual) {
  TORCH_CHECK(x.dim() == 2 && dy.sizes() == x.sizes(), "rms_norm_bwd_kernel: dy and x must be the same (N, d), got ",
              "dy ", dy.sizes(), " x ", x.sizes());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == x.size(0), "rms_norm_bwd_kernel: rstd must be (N,) = (", x.size(0),
              ",), got ", rstd.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "rms_norm_bwd_kernel: weight must be (d,) = (",
              x.size(1), ",), got ", weight.sizes());
  const bool has_res = defined(dresidual);
  TORCH_CHECK(!has_res || dresidual->sizes() == x.sizes(), "rms_norm_bwd_kernel: dresidual must be (N, d) like x");
  return has_res;
}

inline void check_swiglu(const char* op, const at::Tensor& g, const at::Tensor& u) {
  TORCH_CHECK(g.dim() == 2 && g.sizes() == u.sizes(), op, ": g and u must be the same (N, F), got g ", g.sizes(),
              " u ", u.sizes());
}

// The gated pointwise ops on either device (csrc/cpu/gated_cpu.cpp, csrc/cuda/gated_cuda.cu), h = gate(g) u: the gate
// (ckpt_math.h) and the op names that errors quote.
struct SwigluOp {
  using Gate = math::SiluGate;
  static constexpr const char* kFwd = "swiglu_fwd_kernel";
  static constexpr const char* kBwd = "swiglu_bwd_kernel";
};

struct GegluOp {
  using Gate = math::GeluTanhGate;
  static constexpr const char* kFwd = "geglu_fwd_kernel";
  static constexpr const char* kBwd = "geglu_bwd_kernel";
};

// The shapes of Op's backward: g, u the same (N, F), dh like g.
template <typename Op>
void check_gated_bwd(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  check_swiglu(Op::kBwd, g, u);
  TORCH_CHECK(dh.sizes() == g.sizes(), Op::kBwd, ": dh must be (N, F) like g, got ", dh.sizes());
}

struct RopeDims {
  int64_t b, t, hq, hk, dh;
  bool cos_batched;  // cos/sin are (B, T, dh) rather than (1, T, dh)
};

inline RopeDims check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 4, "rope_kernel: q must be (B, T, hq, head_dim), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "rope_kernel: k must be (B, T, hk, head_dim) with q's B, T, head_dim, got k ", k.sizes(), " q ",
              q.sizes());
  const int64_t b = q.size(0), t = q.size(1), dh = q.size(3);
  TORCH_CHECK(dh % 2 == 0, "rope_kernel: head_dim must be even, got ", dh);
  for (const auto& [name, c] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK(c.dim() == 3 && (c.size(0) == 1 || c.size(0) == b) && c.size(1) == t && c.size(2) == dh,
                "rope_kernel: ", name, " must be (1 or B, T, head_dim) = (1|", b, ", ", t, ", ", dh, "), got ",
                c.sizes());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), "rope_kernel: cos and sin must have the same shape");
  return {b, t, q.size(2), k.size(2), dh, cos.size(0) == b && b != 1};
}

inline void check_gate_up(const char* op, int64_t k, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate,
                          const at::Tensor& w_up, const std::optional<at::Tensor>& b_up) {
  TORCH_CHECK(w_gate.dim() == 2 && w_gate.size(1) == k, op, ": w_gate must be (F, ", k, "), got ", w_gate.sizes());
  TORCH_CHECK(w_up.sizes() == w_gate.sizes(), op, ": w_up must be (F, ", k, ") like w_gate, got ", w_up.sizes());
  const int64_t f = w_gate.size(0);
  TORCH_CHECK(!defined(b_gate) || (b_gate->dim() == 1 && b_gate->size(0) == f), op, ": b_gate must be (", f, ",)");
  TORCH_CHECK(!defined(b_up) || (b_up->dim() == 1 && b_up->size(0) == f), op, ": b_up must be (", f, ",)");
}

inline void check_linear_swiglu(const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate,
                                const at::Tensor& w_up, const std::optional<at::Tensor>& b_up) {
  TORCH_CHECK(x.dim() == 2, "linear_swiglu_kernel: x must be (N, K), got ", x.sizes());
  check_gate_up("linear_swiglu_kernel", x.size(1), w_gate, b_gate, w_up, b_up);
}

inline void check_swiglu_linear_bwd(const at::Tensor& dy, const at::Tensor& w_down, const at::Tensor& g,
                                    const at::Tensor& u) {
  check_swiglu("swiglu_linear_bwd_kernel", g, u);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == g.size(0), "swiglu_linear_bwd_kernel: dy must be (N, d) with N = ",
              g.size(0), ", got ", dy.sizes());
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(0) == dy.size(1) && w_down.size(1) == g.size(1),
              "swiglu_linear_bwd_kernel: w_down must be (d, F) = (", dy.size(1), ", ", g.size(1), "), got ",
              w_down.sizes());
}

inline void check_swiglu_linear_wgrad(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u) {
  check_swiglu("swiglu_linear_wgrad_kernel", g, u);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == g.size(0), "swiglu_linear_wgrad_kernel: dy must be (N, d) with N = ",
              g.size(0), ", got ", dy.sizes());
}

inline void check_swiglu_ffn_recompute(const at::Tensor& x1, const at::Tensor& rstd, const at::Tensor& norm_weight,
                                       const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate,
                                       const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                       const at::Tensor& dy, const at::Tensor& w_down) {
  constexpr const char* op = "swiglu_ffn_recompute_kernel";
  TORCH_CHECK(x1.dim() == 2, op, ": x1 must be (N, d), got ", x1.sizes());
  const int64_t n = x1.size(0), d = x1.size(1);
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == n, op, ": rstd must be (N,) = (", n, ",), got ", rstd.sizes());
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == d, op, ": norm_weight must be (d,) = (", d, ",)");
  check_gate_up(op, d, w_gate, b_gate, w_up, b_up);
  TORCH_CHECK(dy.sizes() == x1.sizes(), op, ": dy must be (N, d) = (", n, ", ", d, "), got ", dy.sizes());
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(0) == d && w_down.size(1) == w_gate.size(0), op,
              ": w_down must be (d, F) = (", d, ", ", w_gate.size(0), "), got ", w_down.sizes());
}

}  // namespace host
}  // namespace ckpt_ext
