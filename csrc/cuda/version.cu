// cuda_version(): the CUDA runtime version (CUDART_VERSION, e.g. 13000) the CUDA kernels were compiled with.
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ckpt_ext {
int64_t cuda_runtime_version() { return CUDART_VERSION; }
}  // namespace ckpt_ext
