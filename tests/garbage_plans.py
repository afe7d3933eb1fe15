"""Plans and append inputs that no planner would make, for the kernels-trust-nothing
tests (test_untrusted_plans.py) and the compute-sanitizer cases (scripts/
sanitizer_cases.py): under jit a plan is an operand nobody checked, so every kernel
must survive any contents with no write outside its outputs, no fault and no hang."""

from __future__ import annotations

import numpy as np

from jax_pagedattn import planning

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
KINDS = ("random", "near", "extreme")


def garbage_plan(plan: planning.Plan, rng: np.random.Generator, kind: str) -> planning.Plan:
  """`plan` with its buffer replaced:

  random:  every int32 uniform over the whole range;
  near:    each section's entries drawn from just around its legal range (-4 ..
           capacity + 4), so they pass the cheap checks but describe no batch;
  extreme: the real plan with every work item stretched to the int32 limits (rows,
           keys, lengths, split index), and extreme indptr entries.
  """
  caps = plan.config.caps
  sections = planning.plan_sections(caps)
  buf = np.array(plan.buffer, np.int32)  # a writable copy
  if kind == "random":
    buf = rng.integers(I32_MIN, I32_MAX, size=buf.shape, endpoint=True, dtype=np.int64)
    return planning.Plan(buf.astype(np.int32), plan.config)
  if kind == "near":
    limits = {"work": max(caps.batch, caps.tokens * 8, caps.pages * 64), "meta": caps.tokens,
              "bin_indptr": caps.work, "qo_indptr": caps.tokens, "kv_indptr": caps.pages,
              "kv_last_page_len": 64, "merge_indptr": caps.partial_rows,
              "kv_indices": caps.pages}
    for name, section in sections.items():
      if name == "size":
        continue
      off, n = section
      buf[off:off + n] = rng.integers(-4, limits[name] + 5, size=n)
    return planning.Plan(buf, plan.config)
  if kind == "extreme":
    off, n = sections["work"]
    work = buf[off:off + n].reshape(caps.work, -1)
    live = work[:, 0] >= 0
    work[live, 1] = I32_MIN            # row_begin
    work[live, 2] = I32_MAX            # row_end
    work[live, 3] = I32_MIN            # kv_begin
    work[live, 4] = I32_MAX            # kv_end
    work[live, 5] = rng.choice([-1, 0, 7, I32_MAX], size=int(live.sum()))  # split
    work[live, 6] = I32_MAX            # qo_len
    work[live, 7] = I32_MAX            # kv_len
    for name, value in (("qo_indptr", I32_MIN), ("kv_indptr", I32_MAX)):
      o, m = sections[name]
      buf[o + 1:o + m:2] = value
    o, m = sections["merge_indptr"]
    buf[o:o + m] = rng.choice([I32_MIN, -1, I32_MAX], size=m)
    return planning.Plan(buf, plan.config)
  raise ValueError(kind)


def extreme_append_rows(num_pages_of_request: list[int], page_size: int):
  """(batch_indices, positions, valid) of append rows for requests owning the given page
  counts: a few legal positions per request and positions up to 2^31 - 1 that wrap an
  int32 `kv_indptr[b] + pos / page_size` into other requests' pages."""
  bi, pos, valid = [], [], []
  for b, pages in enumerate(num_pages_of_request):
    # Distinct positions: two rows naming one slot may land in either order.
    for p in dict.fromkeys((0, pages * page_size - 1, pages * page_size, I32_MAX,
                            I32_MAX - page_size, I32_MAX - 2 * page_size + 1, 2**30, -1,
                            I32_MIN)):
      bi.append(b)
      pos.append(p)
      valid.append(0 <= p < pages * page_size)
  for b in (-1, len(num_pages_of_request), I32_MAX, I32_MIN):
    bi.append(b)
    pos.append(0)
    valid.append(False)
  return np.array(bi, np.int32), np.array(pos, np.int32), np.array(valid)
