// ckpt_ext::cpu_threads_used(): how many threads one at::parallel_for of this extension actually runs on.
//
// at::parallel_for is inlined into each extension, so its threading depends on how the extension was built (see
// setup.py: OpenMP needs -fopenmp). This runs one parallel_for of at::get_num_threads() grain-1 chunks that each
// record their at::get_thread_num(), and returns the number of distinct threads seen: torch.get_num_threads() when
// the kernels run in parallel, 1 when they would silently run serially.
#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

namespace ckpt_ext {
namespace cpu {

int64_t cpu_threads_used() {
  const int64_t n = at::get_num_threads();
  std::vector<std::atomic<int>> seen(n);
  for (auto& s : seen) s.store(0);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    if (tid >= 0 && tid < n) seen[tid].store(1);
    // Keep each chunk busy briefly so that no thread finishes the whole range before the others start.
    std::this_thread::sleep_for(std::chrono::milliseconds(2 * (end - begin)));
  });
  int64_t used = 0;
  for (auto& s : seen) used += s.load();
  return used;
}

}  // namespace cpu
}  // namespace ckpt_ext
