"""Compiles FlashInfer's prefill kernels ahead of a benchmark (torch only, no JAX).

  python3 scripts/fi_warmup.py [fa3 fa2 ...] [--head-dims 128,64]

FlashInfer JIT-compiles each kernel on first use (about 110 s for FA3 on a fresh GPU
machine) and caches it under ~/.cache/flashinfer; running this in the background while
our own extension builds takes that time off the benchmark. The plan() arguments are the
ones jax_pagedattn.bench passes (bench_baselines.run_flashinfer), so the same modules
are built.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("backends", nargs="*", default=["fa3", "fa2"])
  ap.add_argument("--head-dims", default="128")
  ap.add_argument("--pos-encodings", default="NONE",
                  help="comma list; fa3 has no in-kernel RoPE/ALiBi and is built for NONE only")
  args = ap.parse_args()
  import flashinfer
  import torch

  dt = torch.bfloat16
  page, hq, hk, batch, qo_len = 16, 32, 8, 2, 40
  pages_per_req = -(-qo_len // page)
  qo = torch.arange(0, batch + 1, dtype=torch.int32) * qo_len
  kv_indptr = torch.arange(0, batch + 1, dtype=torch.int32) * pages_per_req
  kv_indices = torch.arange(batch * pages_per_req, dtype=torch.int32, device="cuda")
  last = torch.full((batch,), qo_len - (pages_per_req - 1) * page, dtype=torch.int32)
  workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
  for d in (int(x) for x in args.head_dims.split(",")):
    cache = torch.randn(batch * pages_per_req, 2, page, hk, d, dtype=dt, device="cuda")
    q = torch.randn(batch * qo_len, hq, d, dtype=dt, device="cuda")
    for backend in args.backends:
      for pos in args.pos_encodings.split(","):
        if backend == "fa3" and pos != "NONE":
          continue
        t0 = time.time()
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
        w.plan(qo_indptr=qo, paged_kv_indptr=kv_indptr, paged_kv_indices=kv_indices,
               paged_kv_last_page_len=last, num_qo_heads=hq, num_kv_heads=hk, head_dim_qk=d,
               page_size=page, causal=True, q_data_type=dt, kv_data_type=dt,
               **({} if pos == "NONE" else {"pos_encoding_mode": pos}))
        w.run(q, cache)
        torch.cuda.synchronize()
        print(f"flashinfer {backend} d{d} {pos}: ready in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  main()
