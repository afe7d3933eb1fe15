"""The hottest SASS lines of an ncu source page.

  ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
  python3 scripts/ncu_hot_sass.py sass.csv [top]

Prints the `top` instructions (default 40) by warp-stall samples, each with its share of
all samples and its largest stall reasons, then the samples summed per opcode: where a
kernel's warps wait, read without ncu's GUI.
"""

from __future__ import annotations

import collections
import csv
import sys


def _number(text: str) -> float:
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return 0.0


def main(path: str, top: int) -> None:
  with open(path, newline="") as f:
    lines = f.read().splitlines()
  # ncu may print lines before the CSV header: start at the first line naming a column.
  start = next((i for i, l in enumerate(lines) if l.startswith('"') and "Source" in l), None)
  if start is None:
    print(f"{path}: no CSV source page found; first lines:")
    print("\n".join(lines[:10]))
    return
  rows = list(csv.DictReader(lines[start:]))
  if not rows:
    print(f"{path}: empty source page")
    return
  cols = list(rows[0])
  sample_col = next((c for c in cols if c.startswith("Warp Stall Sampling (All")), None)
  if sample_col is None:
    print(f"{path}: no stall-sampling column; columns: {cols}")
    return
  stall_cols = [c for c in cols if c.lower().startswith("stall_") or "stall_" in c.lower()]
  total = sum(_number(r[sample_col]) for r in rows) or 1.0
  print(f"{len(rows)} SASS lines, {total:.0f} stall samples ({sample_col})")
  hot = sorted(rows, key=lambda r: -_number(r[sample_col]))[:top]
  for r in hot:
    n = _number(r[sample_col])
    reasons = sorted(((_number(r[c]), c) for c in stall_cols), reverse=True)[:3]
    why = ", ".join(f"{c.split('(')[0].strip()} {v:.0f}" for v, c in reasons if v > 0)
    print(f"{100 * n / total:5.1f}%  {r.get('Address', '?'):>6}  {r['Source'][:70]:70}  {why}")
  per_op = collections.Counter()
  for r in rows:
    op = r["Source"].split()[0] if r["Source"].split() else "?"
    if op.startswith("@"):
      op = r["Source"].split()[1] if len(r["Source"].split()) > 1 else op
    per_op[op.split(".")[0]] += _number(r[sample_col])
  print("\nsamples per opcode:")
  for op, n in per_op.most_common(15):
    print(f"{100 * n / total:5.1f}%  {op}")


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
