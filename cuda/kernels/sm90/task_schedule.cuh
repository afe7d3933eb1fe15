// Which (work item, kv head) tasks a CTA of the Hopper prefill kernel runs, in order:
// drawn from a counter shared by the grid, or the plan's static bins (TaskSchedule).
#pragma once

#include <cstdint>

#include "../dependent_launch.cuh"
#include "../work_item.cuh"
#include "jax_pagedattn/params.h"
#include "sm90_sync.cuh"

namespace jax_pagedattn {
namespace sm90 {

// ---- tasks: which (work item, kv head) pairs a CTA runs, in order -----------------------------
// Two schedules (the kernel's flags):
//   drawn (default): the plan's n items times num_kv_heads make the tasks, task t being
//     item t / Hkv for kv head t % Hkv, in plan order (the planner puts this kernel's
//     items costliest first, PlanSpec::longest_first). CTA c runs task c first, then the
//     next task of a counter shared by the grid (zeroed by the setup pass), so a CTA that
//     finishes early takes more: a greedy longest-first schedule over every SM, whatever
//     the bins and the kv heads. One producer thread draws each task and hands it to the
//     producer's copying warps and to the consumers through a ring of kTaskSlots
//     shared-memory slots (mbarriers: full, written; empty, read by every reader thread).
//   static bins (kFlagStaticBins): CTA (b, h) runs bin b's items for kv head h.
// Whatever the plan or counter hold, a task names an item in [0, work_cap) and a head in
// [0, num_kv_heads), and every CTA's sequence ends.
struct Task {
  int item;  // < 0: no more tasks
  int head;
};

struct TaskSchedule {
  bool drawn;
  int item_begin, item_end;  // static bins: this CTA's items
  int64_t num_tasks;         // drawn: items x num_kv_heads
  uint32_t bars;             // drawn: full[kTaskSlots], then empty[kTaskSlots]
  uint8_t* slots;            // drawn: Cfg::kTaskSlots slots of Cfg::kTaskSlotBytes

  template <class Cfg>
  __device__ static TaskSchedule Make(const AttentionParams& p, uint8_t* smem, bool drawn) {
    TaskSchedule ts;
    ts.drawn = drawn;
    ts.bars = SmemU32(smem + Cfg::kTaskBarOff);
    ts.slots = smem + Cfg::kTaskOff;
    const int bins = p.layout.bin_cap;
    if (drawn) {
      const int items = min(max(__ldg(p.bin_indptr + bins), 0), p.layout.work_cap);
      ts.num_tasks = int64_t(items) * p.num_kv_heads;
      ts.item_begin = ts.item_end = 0;
    } else {
      const int bin = blockIdx.x < unsigned(bins) ? int(blockIdx.x) : bins;
      ts.item_begin = bin < bins ? max(__ldg(p.bin_indptr + bin), 0) : 0;
      ts.item_end = bin < bins ? min(__ldg(p.bin_indptr + bin + 1), p.layout.work_cap) : 0;
      ts.num_tasks = 0;
    }
    return ts;
  }

  template <class Cfg>
  __device__ uint32_t Full(int k) const { return bars + 8 * (k % Cfg::kTaskSlots); }
  template <class Cfg>
  __device__ uint32_t Empty(int k) const { return bars + 8 * (Cfg::kTaskSlots + k % Cfg::kTaskSlots); }

  // Drawn schedules: the k-th task of this CTA, drawn by one thread and written to its
  // slot once every reader has read the slot's previous task.
  template <class Cfg>
  __device__ void Draw(const AttentionParams& p, int k) const {
    int64_t t = -1;
    if (k == 0) {
      t = blockIdx.x;
    } else if (p.task_counter != nullptr) {
      WaitForPrimaryGrid();  // the setup pass zeroed the counter
      t = int64_t(gridDim.x) + int64_t(atomicAdd(p.task_counter, 1ull) & 0x3fffffffffffffffull);
    }
    Task task{-1, 0};
    if (t >= 0 && t < num_tasks) task = Task{int(t / p.num_kv_heads), int(t % p.num_kv_heads)};
    uint8_t* slot = slots + (k % Cfg::kTaskSlots) * Cfg::kTaskSlotBytes;
    MbarWait(Empty<Cfg>(k), ((k / Cfg::kTaskSlots) & 1) ^ 1);
    *reinterpret_cast<int2*>(slot) = make_int2(task.item, task.head);
    MbarArrive(Full<Cfg>(k));  // release: the slot is visible with the phase
  }

  // The k-th task of this CTA, called by every thread of the reader warps for k = 0, 1,
  // ... until it returns the end.
  template <class Cfg>
  __device__ Task Read(int k) const {
    if (!drawn) {
      const int item = item_begin + k;
      return item < item_end ? Task{item, int(blockIdx.y)} : Task{-1, 0};
    }
    MbarWait(Full<Cfg>(k), (k / Cfg::kTaskSlots) & 1);
    const volatile int* slot =
        reinterpret_cast<volatile int*>(slots + (k % Cfg::kTaskSlots) * Cfg::kTaskSlotBytes);
    const Task task{slot[0], slot[1]};
    MbarArrive(Empty<Cfg>(k));
    return task;
  }

  // The work item of `task` (from Read), with at most Cfg::kTileQ rows, from the plan;
  // request -1 for the end.
  template <class Cfg>
  __device__ WorkItem Item(const AttentionParams& p, const Task& task) const {
    WorkItem w{};
    w.request = -1;
    return task.item >= 0 ? LoadWorkItem(p, task.item, Cfg::kTileQ) : w;
  }
};

}  // namespace sm90
}  // namespace jax_pagedattn
