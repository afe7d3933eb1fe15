// The plan acknowledgement board (plan_acks.h): one mapped page-locked allocation for
// the process, portable across devices, entries handed out to rings under a lock.
#include <cuda_runtime.h>

#include <atomic>
#include <cstring>
#include <mutex>

#include "jax_pagedattn/plan_acks.h"

namespace jax_pagedattn {
namespace {

std::mutex board_mutex;
uint64_t* board_host = nullptr;                  // guarded by board_mutex
std::atomic<uint64_t*> board_device{nullptr};    // read by the handlers without the lock
bool entry_taken[kPlanAckEntries] = {};          // guarded by board_mutex

bool AllocateBoard() {
  void* host = nullptr;
  if (cudaHostAlloc(&host, sizeof(uint64_t) * kPlanAckEntries,
                    cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of the runtime
    return false;
  }
  void* device = nullptr;
  if (cudaHostGetDevicePointer(&device, host, 0) != cudaSuccess) {
    cudaGetLastError();
    cudaFreeHost(host);
    return false;
  }
  std::memset(host, 0, sizeof(uint64_t) * kPlanAckEntries);
  board_host = static_cast<uint64_t*>(host);
  board_device.store(static_cast<uint64_t*>(device), std::memory_order_release);
  return true;
}

}  // namespace

int32_t AcquirePlanAckEntry() {
  std::lock_guard<std::mutex> lock(board_mutex);
  if (board_host == nullptr && !AllocateBoard()) return 0;
  for (int32_t i = 0; i < kPlanAckEntries; ++i) {
    if (!entry_taken[i]) {
      // Tickets are unique in the process and increase, so a late store from the
      // entry's previous owner holds a ticket older than any this owner waits for.
      entry_taken[i] = true;
      return i + 1;
    }
  }
  return 0;
}

void ReleasePlanAckEntry(int32_t entry) {
  std::lock_guard<std::mutex> lock(board_mutex);
  if (entry >= 1 && entry <= kPlanAckEntries) entry_taken[entry - 1] = false;
}

uint64_t ReadPlanAck(int32_t entry) {
  if (entry < 1 || entry > kPlanAckEntries || board_host == nullptr) return 0;
  // The device's store lands in host memory over the bus; volatile keeps the read.
  return reinterpret_cast<volatile const uint64_t*>(board_host)[entry - 1];
}

uint64_t* PlanAckBoardDevice() { return board_device.load(std::memory_order_acquire); }

void* AllocateMappedPlanSlot(size_t bytes) {
  void* host = nullptr;
  if (cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  // JAX imports the slot as a device array at this address, so it must be the one the
  // device uses (always so with unified addressing, which every supported GPU has).
  void* device = nullptr;
  if (cudaHostGetDevicePointer(&device, host, 0) != cudaSuccess || device != host) {
    cudaGetLastError();
    cudaFreeHost(host);
    return nullptr;
  }
  std::memset(host, 0, bytes);
  return host;
}

void FreeMappedPlanSlot(void* slot) {
  if (slot != nullptr && cudaFreeHost(slot) != cudaSuccess) cudaGetLastError();
}

}  // namespace jax_pagedattn
