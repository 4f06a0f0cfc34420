// ckpt_ext._C: the one place that declares the extension's op schemas (namespace ckpt_ext). A kernel op
// <name>_kernel has exactly the schema of the graph op ckpt_ext::<name> (the op table, ckpt_ext/ops/), so the cpp
// backend (ckpt_ext/backends/cpp/) routes the graph op to it unchanged; tests/test_op_schemas.py checks every
// schema here against the table. attention_tile_dropout_kernel and cpu_gqa_* are helpers of the cpp backend's
// attention routes (ckpt_ext/backends/aten_attention.py) with no graph op. Kernels live per device in csrc/cpu
// (TORCH_LIBRARY_IMPL CPU) and csrc/cuda (TORCH_LIBRARY_IMPL CUDA). The module itself is empty: importing it runs
// the static registrations.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace ckpt_ext::cpu {
int64_t cpu_threads_used();  // threads one at::parallel_for of this extension runs on (csrc/cpu/threads_cpu.cpp)
bool cpu_gqa_available();    // libtorch_cpu exports the BLAS sgemm_ the cpu_gqa kernels call (csrc/cpu/attention_cpu.cpp)
}

#ifdef CKPT_EXT_WITH_CUDA
namespace ckpt_ext {
int64_t cuda_runtime_version();  // CUDART_VERSION the CUDA kernels were compiled with (csrc/cuda/version.cu)
}
static int64_t cuda_version() { return ckpt_ext::cuda_runtime_version(); }
#else
static int64_t cuda_version() { return -1; }
#endif

TORCH_LIBRARY(ckpt_ext, m) {
  m.def("cuda_version() -> int", &cuda_version);
  m.def("cpu_threads_used() -> int", &ckpt_ext::cpu::cpu_threads_used);
  m.def("layer_norm_fwd_kernel(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd_kernel(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor weight, Tensor bias, "
      "Tensor? dresidual, bool emit_y) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bias_gelu_kernel(Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def("gelu_bwd_kernel(Tensor da, Tensor u, str approximate) -> Tensor");
  m.def("dropout_add_kernel(Tensor x, Tensor? residual, float p, SymInt seed) -> Tensor");
  m.def(
      "ffn_recompute_kernel(Tensor x1, Tensor mean, Tensor rstd, Tensor ln_weight, Tensor ln_bias, Tensor w1, "
      "Tensor b1, Tensor dy, Tensor w2, str approximate) -> (Tensor, Tensor, Tensor)");
  m.def("linear_bias_gelu_kernel(Tensor x, Tensor w, Tensor? b, str approximate) -> Tensor");
  m.def("linear_gelu_bwd_kernel(Tensor dy, Tensor w2, Tensor u, str approximate) -> Tensor");
  m.def("gelu_linear_wgrad_kernel(Tensor dy, Tensor u, str approximate) -> Tensor");
  m.def("rms_norm_fwd_kernel(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_bwd_kernel(Tensor dy, Tensor x, Tensor rstd, Tensor weight, Tensor? dresidual, bool emit_y) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("swiglu_fwd_kernel(Tensor g, Tensor u) -> Tensor");
  m.def("swiglu_bwd_kernel(Tensor dh, Tensor g, Tensor u) -> (Tensor, Tensor)");
  m.def("geglu_fwd_kernel(Tensor g, Tensor u) -> Tensor");
  m.def("geglu_bwd_kernel(Tensor dh, Tensor g, Tensor u) -> (Tensor, Tensor)");
  m.def("linear_swiglu_kernel(Tensor x, Tensor w_gate, Tensor? b_gate, Tensor w_up, Tensor? b_up) -> Tensor");
  m.def("swiglu_linear_bwd_kernel(Tensor dy, Tensor w_down, Tensor g, Tensor u) -> (Tensor, Tensor)");
  m.def("swiglu_linear_wgrad_kernel(Tensor dy, Tensor g, Tensor u) -> Tensor");
  m.def(
      "swiglu_ffn_recompute_kernel(Tensor x1, Tensor rstd, Tensor norm_weight, Tensor w_gate, Tensor? b_gate, "
      "Tensor w_up, Tensor? b_up, Tensor dy, Tensor w_down) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_cross_entropy_fwd_kernel(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, SymInt ignore_index, "
      "float label_smoothing, SymInt chunk_bytes) -> (Tensor, Tensor)");
  m.def(
      "linear_cross_entropy_bwd_kernel(Tensor dloss, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
      "Tensor lse, SymInt ignore_index, float label_smoothing, SymInt chunk_bytes, bool need_dweight) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("rope_kernel(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)");
  // Not graph ops: helpers of the cpp/cuda backends' attention (ckpt_ext/backends/aten_attention.py). The hash
  // dropout of one attention-probability tile, in place, for the tiled route; the CPU-only grouped-query kernels.
  m.def(
      "attention_tile_dropout_kernel(Tensor(a!) x, int heads, int seq_q, int seq_k, int head0, int row0, float p, "
      "SymInt seed) -> ()");
  m.def("cpu_gqa_available() -> bool", &ckpt_ext::cpu::cpu_gqa_available);
  m.def(
      "cpu_gqa_attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, Tensor? segment_ids, "
      "int window=0) -> (Tensor, Tensor)");
  m.def(
      "cpu_gqa_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
      "float scale, Tensor? segment_ids, int window=0) -> (Tensor, Tensor, Tensor)");
}
