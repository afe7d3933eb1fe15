"""The sm90 harness's bench log as one table per problem, each row against `sm90`.

  python3 scripts/harness_bench_table.py bench.log [baseline]

Reads the `bench bf16 d<D> <b> x qo <q> kv <k> tile <t> <mask> <pos> <kernel>: <ms> ms ...
[rounds <lo>..<hi>]` lines of tests/cuda/prefill_harness.cu and prints, per problem, the
rows fastest first with their median, the ratio of the baseline's median to theirs (above
1: faster than the baseline, `sm90` unless named) and the spread of their per-round
medians. A row whose spread overlaps the baseline's is marked `~`: the rounds do not
separate the two.
"""

from __future__ import annotations

import collections
import re
import sys

_LINE = re.compile(
    r"^bench bf16 (?P<problem>d\d+ +\d+ x qo +\d+ kv +\d+ tile +\d+ \S+ +\S+) +(?P<kernel>\S+) *: +"
    r"(?P<ms>[\d.]+) ms .*\[rounds (?P<lo>[\d.]+)\.\.(?P<hi>[\d.]+)\]")


def parse(lines):
  """{problem: {kernel: (median ms, lowest round median, highest round median)}}."""
  table = collections.OrderedDict()
  for line in lines:
    m = _LINE.match(line.strip())
    if m:
      problem = " ".join(m["problem"].split())
      table.setdefault(problem, {})[m["kernel"]] = (float(m["ms"]), float(m["lo"]), float(m["hi"]))
  return table


def render(table, baseline: str = "sm90") -> str:
  out = []
  for problem, rows in table.items():
    out.append(f"== {problem}")
    base = rows.get(baseline)
    for kernel, (ms, lo, hi) in sorted(rows.items(), key=lambda kv: kv[1][0]):
      ratio = f"{base[0] / ms:5.3f}x" if base else "   -  "
      overlap = "~" if base and kernel != baseline and lo <= base[2] and base[1] <= hi else " "
      out.append(f"  {kernel:<18} {ms:8.3f} ms  {ratio} {overlap} [{lo:.3f}..{hi:.3f}]")
  return "\n".join(out)


def main() -> None:
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  with open(sys.argv[1]) as f:
    table = parse(f)
  print(render(table, sys.argv[2] if len(sys.argv) > 2 else "sm90"))


if __name__ == "__main__":
  main()
