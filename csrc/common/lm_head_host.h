// Host-side argument checks and chunk sizing of the LM head kernels (csrc/cpu/cross_entropy_cpu.cpp,
// csrc/cuda/cross_entropy_cuda.cu), shared so both devices refuse the same inputs and cut the same chunks.
//   check_args(name, hidden (N, d), weight (V, d), bias (V,)?, labels (N,), chunk_bytes) -> {N, d, V}
//   checked_labels(name, labels, V, ignore_index) -> labels as contiguous int64, each in [0, V) or ignore_index
//   chunk_len(budget, other, dtype, limit) -> rows (or columns) of a chunk whose buffers fit budget bytes
//   fwd_inputs(...) / bwd_inputs(...) -> what both devices' forward / backward start from: checked shapes, hidden
//   contiguous, checked labels, bias (and dloss, lse) in acc_t, the outputs allocated; dbias_out(in) -> dbias in T
//   lce_fwd<Fwd> / lce_bwd<Bwd> -> the ops' entry points in schema order: they build the inputs above and call the
//   device's Fwd(in, weight, ignore_index, eps, chunk_bytes) / Bwd(in, weight, ignore_index, eps, need_dweight)
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "host_args.h"

namespace ckpt_ext {
namespace host {

struct Shapes {
  int64_t n, d, v;
};

inline Shapes check_args(const char* name, const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t chunk_bytes) {
  TORCH_CHECK(hidden.dim() == 2, name, ": hidden must be (N, d), got ", hidden.sizes());
  const int64_t n = hidden.size(0), d = hidden.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d && weight.size(0) > 0, name, ": weight must be (V, ", d,
              "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), name, ": weight dtype must equal hidden's");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), name, ": hidden must be a floating tensor");
  const int64_t v = weight.size(0);
  TORCH_CHECK(!defined(bias) || (bias->sizes() == at::IntArrayRef{v} && bias->scalar_type() == hidden.scalar_type()),
              name, ": bias must be (V,) in hidden's dtype");
  TORCH_CHECK(labels.sizes() == at::IntArrayRef{n}, name, ": labels must be (N,)");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, name,
              ": labels must be int64 or int32");
  TORCH_CHECK(chunk_bytes > 0, name, ": chunk_bytes must be positive, got ", chunk_bytes);
  return {n, d, v};
}

// labels as contiguous int64, every one in [0, V) or equal to ignore_index (the row passes index z with it).
inline at::Tensor checked_labels(const char* name, const at::Tensor& labels, int64_t v, int64_t ignore_index) {
  at::Tensor y = labels.to(at::kLong).contiguous();
  const bool bad = y.ne(ignore_index).logical_and(y.lt(0).logical_or(y.ge(v))).any().item<bool>();
  TORCH_CHECK(!bad, name, ": labels must be in [0, ", v, ") or ignore_index (", ignore_index, ")");
  return y;
}

// Elements of a chunk along one side of (N, V) whose buffers fit `budget` bytes: `other` elements across, each with
// an acc_t logit and, for 16-bit T, its copy in T (ckpt_ext.lm_head.chunk_len is the same rule). In [1, limit], a
// multiple of 16 when ≥ 16.
inline int64_t chunk_len(int64_t budget, int64_t other, at::ScalarType dt, int64_t limit) {
  const int64_t per = other * ((dt == at::kDouble ? 8 : 4) + (dt == at::kHalf || dt == at::kBFloat16 ? 2 : 0));
  int64_t len = std::max<int64_t>(1, budget / std::max<int64_t>(1, per));
  if (len >= 16) len -= len % 16;
  return std::max<int64_t>(1, std::min(len, limit));
}

// The forward's inputs: hidden contiguous, labels checked, bias as contiguous acc_t, losses and lse (N,) acc_t.
struct FwdInputs {
  Shapes shape;
  at::ScalarType acc;
  at::Tensor h, y, b, losses, lse;
};

inline FwdInputs fwd_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& labels, int64_t ignore_index, int64_t chunk_bytes) {
  const char* name = "linear_cross_entropy_fwd_kernel";
  FwdInputs in;
  in.shape = check_args(name, hidden, weight, bias, labels, chunk_bytes);
  in.acc = acc_dtype(hidden.scalar_type());
  in.h = hidden.contiguous();
  in.y = checked_labels(name, labels, in.shape.v, ignore_index);
  in.b = defined(bias) ? bias->to(in.acc).contiguous() : at::Tensor();
  in.losses = at::empty({in.shape.n}, hidden.options().dtype(in.acc));
  in.lse = at::empty({in.shape.n}, in.losses.options());
  return in;
}

// The backward's inputs: as the forward's, plus dloss g and lse s as contiguous acc_t (N,), dweight (V, d) T zeros
// when need_dweight (else (0,)), the acc_t dbias accumulator (V,) when there is a bias, the vocabulary chunk width.
struct BwdInputs {
  Shapes shape;
  at::ScalarType dt, acc;
  at::Tensor h, y, g, s, b, dw, db;
  int64_t cols;
  bool has_bias() const { return b.defined(); }
};

inline BwdInputs bwd_inputs(const at::Tensor& dloss, const at::Tensor& hidden, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse,
                            int64_t ignore_index, int64_t chunk_bytes, bool need_dweight) {
  const char* name = "linear_cross_entropy_bwd_kernel";
  BwdInputs in;
  in.shape = check_args(name, hidden, weight, bias, labels, chunk_bytes);
  const int64_t n = in.shape.n, d = in.shape.d, v = in.shape.v;
  TORCH_CHECK(dloss.sizes() == at::IntArrayRef{n} && lse.sizes() == at::IntArrayRef{n}, name,
              ": dloss and lse must be (N,)");
  in.dt = hidden.scalar_type();
  in.acc = acc_dtype(in.dt);
  in.h = hidden.contiguous();
  in.y = checked_labels(name, labels, v, ignore_index);
  in.g = as_contig(dloss, in.acc);
  in.s = as_contig(lse, in.acc);
  in.b = defined(bias) ? bias->to(in.acc).contiguous() : at::Tensor();
  in.dw = need_dweight ? at::zeros({v, d}, in.h.options()) : at::empty({0}, in.h.options());
  in.db = in.has_bias() ? at::zeros({v}, in.h.options().dtype(in.acc)) : at::Tensor();
  in.cols = chunk_len(chunk_bytes, std::max<int64_t>(n, 1), in.dt, v);
  return in;
}

// dbias in T from the acc_t accumulator, or (0,) without a bias.
inline at::Tensor dbias_out(const BwdInputs& in) {
  return in.has_bias() ? in.db.to(in.dt) : at::empty({0}, in.h.options());
}

// linear_cross_entropy_fwd_kernel(hidden, weight, bias?, labels, ignore_index, eps, chunk_bytes) -> (losses, lse)
template <auto Fwd>
std::tuple<at::Tensor, at::Tensor> lce_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                           int64_t ignore_index, double eps, int64_t chunk_bytes) {
  return Fwd(fwd_inputs(hidden, weight, bias, labels, ignore_index, chunk_bytes), weight, ignore_index, eps,
             chunk_bytes);
}

// linear_cross_entropy_bwd_kernel(dloss, hidden, weight, bias?, labels, lse, ignore_index, eps, chunk_bytes,
// need_dweight) -> (dhidden, dweight, dbias)
template <auto Bwd>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_bwd(const at::Tensor& dloss, const at::Tensor& hidden,
                                                       const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& labels, const at::Tensor& lse,
                                                       int64_t ignore_index, double eps, int64_t chunk_bytes,
                                                       bool need_dweight) {
  return Bwd(bwd_inputs(dloss, hidden, weight, bias, labels, lse, ignore_index, chunk_bytes, need_dweight), weight,
             ignore_index, eps, need_dweight);
}

}  // namespace host
}  // namespace ckpt_ext
