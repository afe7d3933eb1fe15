// A minimal fork-join helper for the CPU handlers: run a body on a few std::threads
// that pull task indices from a shared counter (tasks differ a lot in cost, so dynamic
// hand-out balances better than static ranges).
//
// Threads are started per call: a call's work is milliseconds or more, against tens of
// microseconds to start two threads, and no state outlives the call (XLA may invoke
// handlers concurrently from its own pool).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace jax_pagedattn {
namespace cpu {

// Upper bound on worker threads; more rarely helps a memory-bound pass.
constexpr int kMaxThreads = 16;

// Threads worth using for `num_tasks` tasks of about `total_flops` work in all.
inline int ChooseThreads(int64_t num_tasks, double total_flops) {
  const unsigned hw = std::thread::hardware_concurrency();
  int64_t n = std::min<int64_t>(hw == 0 ? 1 : int64_t(hw), kMaxThreads);
  // Each thread should get about a million flops (0.1 ms or more), well above the tens
  // of microseconds it takes to start one.
  const double kFlopsPerThread = 1 << 20;
  n = std::min<int64_t>(n, int64_t(total_flops / kFlopsPerThread) + 1);
  return int(std::max<int64_t>(1, std::min<int64_t>(n, num_tasks)));
}

// Calls make_worker() once per thread to get that thread's callable, then calls it
// with task indices [0, num_tasks) in some order, each exactly once. The calling
// thread is one of the workers. Returns false if any worker threw (the remaining
// tasks of that worker may have been skipped); never lets an exception escape a thread.
template <typename MakeWorker>
bool ParallelTasks(int64_t num_tasks, int num_threads, MakeWorker make_worker) {
  std::atomic<int64_t> next{0};
  std::atomic<bool> ok{true};
  auto body = [&]() {
    try {
      auto work = make_worker();
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < num_tasks;
           i = next.fetch_add(1, std::memory_order_relaxed)) {
        work(i);
      }
    } catch (...) {
      ok.store(false, std::memory_order_relaxed);
      // Let the other workers drain the counter so the join below finishes promptly.
      next.store(num_tasks, std::memory_order_relaxed);
    }
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < num_threads; ++t) {
    try {
      threads.emplace_back(body);
    } catch (...) {
      break;  // could not start another thread: the ones running take its share
    }
  }
  body();
  for (auto& th : threads) th.join();
  return ok.load();
}

}  // namespace cpu
}  // namespace jax_pagedattn
