// The plan acknowledgement board: a few uint64 words of page-locked host memory that the
// GPU writes and the host reads, so the host knows when it may rewrite a staged plan.
//
// Why: a jitted step whose plan is a host numpy array pays for JAX moving that argument
// at dispatch (tens to a hundred microseconds). Plans staged instead in mapped host
// slots that JAX sees as device arrays cost nothing at dispatch, but a slot may only be
// rewritten once no pending step can still read it.
// Each ring of slots (jax_pagedattn/plan_staging.py) owns one board entry and stamps
// every plan with a fresh ticket (plan_layout.h, kMetaTicket*); the setup pass of each
// attention call stores its plan's ticket in that entry. The device runs the steps of
// one stream in order, so reading ticket t in the entry means every step dispatched
// before the plan with ticket t was made has finished.
#pragma once

#include <cstddef>
#include <cstdint>

namespace jax_pagedattn {

constexpr int32_t kPlanAckEntries = 256;

// Allocates the board on first use (mapped page-locked memory, cudaHostAlloc) and takes
// a free entry. Returns its index + 1 (the value plans carry in kMetaAckEntry), or 0
// when no GPU memory can be mapped or every entry is taken.
int32_t AcquirePlanAckEntry();
void ReleasePlanAckEntry(int32_t entry);  // entry as returned by Acquire
uint64_t ReadPlanAck(int32_t entry);      // the last ticket stored there (0: none yet)
// The board as the device addresses it, or nullptr before the first Acquire.
uint64_t* PlanAckBoardDevice();

// A plan slot (plan_staging.py) of `bytes` in mapped page-locked host memory, which the
// host writes and every GPU reads at the same address (unified addressing; the
// attention call's setup pass copies it into device memory). nullptr when none can be
// allocated or the device would address it elsewhere. Free with FreeMappedPlanSlot.
void* AllocateMappedPlanSlot(size_t bytes);
void FreeMappedPlanSlot(void* slot);

}  // namespace jax_pagedattn
