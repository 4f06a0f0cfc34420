// ckpt_ext::cpu_threads_used(): how many OS threads one at::parallel_for of this extension actually runs on.
//
// at::parallel_for is inlined into each extension, so its threading depends on how the extension was built (see
// setup.py: OpenMP needs -fopenmp). This runs one parallel_for of at::get_num_threads() grain-1 chunks that each
// record the std::thread::id running them (not at::get_thread_num(), which is a task index under some backends), and
// returns the number of distinct threads seen: torch.get_num_threads() when the kernels run in parallel, 1 when they
// would silently run serially.
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdint>
#include <mutex>
#include <set>
#include <thread>

namespace ckpt_ext {
namespace cpu {

int64_t cpu_threads_used() {
  const int64_t n = at::get_num_threads();
  std::mutex mu;
  std::set<std::thread::id> seen;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    {
      const std::lock_guard<std::mutex> lock(mu);
      seen.insert(std::this_thread::get_id());
    }
    // Keep each chunk busy briefly so that no thread finishes the whole range before the others start.
    std::this_thread::sleep_for(std::chrono::milliseconds(2 * (end - begin)));
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace cpu
}  // namespace ckpt_ext
