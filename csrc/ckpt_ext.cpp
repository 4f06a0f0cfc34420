// ckpt_ext._C: declares the schemas of the extension's kernel ops (namespace ckpt_ext, suffix _kernel) once.
// Kernels live per backend in csrc/cpu (TORCH_LIBRARY_IMPL CPU) and csrc/cuda (TORCH_LIBRARY_IMPL CUDA).
// The module itself is empty: importing it runs the static registrations below.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#ifdef CKPT_EXT_WITH_CUDA
static int64_t cuda_version() { return CKPT_EXT_CUDA_VERSION; }
#else
static int64_t cuda_version() { return -1; }
#endif

TORCH_LIBRARY(ckpt_ext, m) {
  m.def("cuda_version() -> int", &cuda_version);
  m.def("layer_norm_fwd_kernel(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
}
