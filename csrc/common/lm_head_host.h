// Host-side argument checks and chunk sizing of the LM head kernels (csrc/cpu/cross_entropy_cpu.cpp,
// csrc/cuda/cross_entropy_cuda.cu), shared so both devices refuse the same inputs and cut the same chunks.
//   check_args(name, hidden (N, d), weight (V, d), bias (V,)?, labels (N,), chunk_bytes) -> {N, d, V}
//   checked_labels(name, labels, V, ignore_index) -> labels as contiguous int64, each in [0, V) or ignore_index
//   chunk_len(budget, other, dtype, limit) -> rows (or columns) of a chunk whose buffers fit budget bytes
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

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

}  // namespace host
}  // namespace ckpt_ext
