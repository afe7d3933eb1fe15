"""Benchmark output: derived metrics, the stdout tables, JSON and the PNG plot.

Metrics: decode reports GB/s = (K+V bytes of every key read once + q read + out
written) / time; prefill reports TFLOP/s = 4 * D * Hqo * (visible query-key pairs; the
causal half only) / time. Each is also given as a fraction of the ceiling measured in
the same run (copy GB/s, read + write, for decode; bf16 matmul TFLOP/s for prefill)
and as FlashInfer's best time on the workload over the system's time (> 1: faster
than FlashInfer). The cascade system also gets `vs_plain_decode`: our best plain decode
time (ours-tc, ours-cc) on the same batch over the cascade's (> 1: the cascade is faster).

Rows with features (issue 15; their names end with the labels, their workload entries
and records list them under `features`) that `--feature-ratio` timed beside the same
row without them (`base_workload`) get `base_time_us`, the system's time without them,
and `vs_base`: its time with the features over that (< 1: faster with them), and, for ours,
`vs_base_best_ours`: over the best time of any of ours without them (the fp8 row's
"time of our bf16 decode").
"""

from __future__ import annotations

import json
import math

METRIC = {"decode": "GB/s", "prefill": "TFLOP/s"}
OURS = ("ours", "ours-tc", "ours-cc")  # our plain systems (not the cascade)
_HOST_FIELDS = (("plan_host_us", "planner"), ("wrapper_plan_us", "plan()"),
                ("step_us", "step"), ("step_with_plan_us", "plan+step"),
                ("time_us", "kernel"), ("step_overhead_us", "overhead"),
                ("step_pipelined_us", "loop step"), ("pipelined_overhead_us", "loop overhead"))


def wkey(kind: str, name: str) -> str:
  """Key of a workload in the JSON's workload map (decode and prefill may share names)."""
  return f"{kind}/{name}"


def ceiling_for(kind: str, ceilings: dict):
  key = "copy_gbps" if kind == "decode" else "matmul_tflops"
  return ceilings.get(key)


def _best_times(records: list[dict], systems) -> dict:
  """{workload key: the fastest ok time among `systems` (a predicate on the name)}."""
  best = {}
  for r in records:
    if r["status"] == "ok" and systems(r["system"]):
      key = wkey(r["kind"], r["workload"])
      best[key] = min(best.get(key, r["time_us"]), r["time_us"])
  return best


def derive(records: list[dict], workloads: dict, ceilings: dict) -> None:
  """Adds metric, value, fraction_of_ceiling and vs_flashinfer to each ok record, and
  vs_plain_decode to the cascade's."""
  fi_best = _best_times(records, lambda s: s.startswith("flashinfer"))
  plain_best = _best_times(records, lambda s: s in ("ours-tc", "ours-cc"))
  ours_best = _best_times(records, lambda s: s in OURS)
  own = {(wkey(r["kind"], r["workload"]), r["system"]): r["time_us"] for r in records
         if r["status"] == "ok"}
  for r in records:
    if r["status"] != "ok":
      continue
    w = workloads[wkey(r["kind"], r["workload"])]
    seconds = r["time_us"] * 1e-6
    r["metric"] = METRIC[r["kind"]]
    if r["kind"] == "decode":
      r["value"] = w["bytes_moved"] / seconds / 1e9
    else:
      r["value"] = w["flops"] / seconds / 1e12
    ceil = ceiling_for(r["kind"], ceilings)
    r["fraction_of_ceiling"] = r["value"] / ceil if ceil else None
    best = fi_best.get(wkey(r["kind"], r["workload"]))
    r["vs_flashinfer"] = best / r["time_us"] if best else None
    if r["system"] == "cascade":
      plain = plain_best.get(wkey(r["kind"], r["workload"]))
      r["vs_plain_decode"] = plain / r["time_us"] if plain else None
    base = w.get("base_workload")
    if base:
      same = own.get((base, r["system"]))
      r["base_time_us"] = same
      r["vs_base"] = r["time_us"] / same if same else None
      if r["system"] in OURS:
        best = ours_best.get(base)
        r["vs_base_best_ours"] = r["time_us"] / best if best else None


# ---------------------------------------------------------------- text tables


def _fmt(x, spec, none="-"):
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return none
  return format(x, spec)


def _table(header: list[str], rows: list[list[str]], align: str) -> str:
  """Plain aligned text; align has one 'l' or 'r' per column."""
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

  def line(cells):
    out = []
    for c, wd, a in zip(cells, widths, align):
      out.append(str(c).ljust(wd) if a == "l" else str(c).rjust(wd))
    return "  ".join(out).rstrip()

  sep = "  ".join("-" * wd for wd in widths)
  return "\n".join([line(header), sep] + [line(r) for r in rows])


def format_results(records: list[dict], workloads: dict, ceilings: dict, kind: str) -> str:
  recs = [r for r in records if r["kind"] == kind]
  if not recs:
    return ""
  metric = METRIC[kind]
  ceil = ceiling_for(kind, ceilings)
  first = workloads[wkey(kind, recs[0]["workload"])]
  title = (f"{kind}: {first['dtype']}, heads {first['num_qo_heads']}/{first['num_kv_heads']}, "
           f"head_dim {first['head_dim']}, page {first['page_size']}, {first['kv_layout']}"
           + (", causal" if kind == "prefill" and first["causal"] else "")
           + f"; ceiling {_fmt(ceil, '.1f')} {metric} "
           + ("(device copy, read+write)" if kind == "decode" else "(bf16 matmul)"))
  header = ["workload", "system", "time us", metric, "% ceil", "vs FI", "rel err", "note"]
  rows = []
  for r in recs:
    name = r["workload"] + _config_suffix(workloads[wkey(kind, r["workload"])], first)
    if r["status"] == "ok":
      frac = r.get("fraction_of_ceiling")
      vs = r.get("vs_flashinfer")
      rows.append([name, r["system"], _fmt(r["time_us"], ".1f"),
                   _fmt(r["value"], ".1f" if kind == "decode" else ".2f"),
                   _fmt(None if frac is None else 100 * frac, ".1f"),
                   _fmt(vs, ".2f") + ("x" if vs else ""), _fmt(r.get("rel_err"), ".1e"),
                   _note(r)])
    else:
      rows.append([name, r["system"], "-", "-", "-", "-", "-",
                   f"{r['status']}: {_short(r.get('message', ''))}"])
  return title + "\n" + _table(header, rows, "llrrrrrl")


def _config_suffix(w: dict, first: dict) -> str:
  """' [heads 32/32, head_dim 64, page 1]': the settings where w differs from the
  table's title (the first workload), empty where none does."""
  parts = []
  if (w["num_qo_heads"], w["num_kv_heads"]) != (first["num_qo_heads"], first["num_kv_heads"]):
    parts.append(f"heads {w['num_qo_heads']}/{w['num_kv_heads']}")
  for key, label in (("head_dim", "head_dim"), ("page_size", "page"), ("kv_layout", "layout"),
                     ("dtype", "dtype")):
    if w[key] != first[key]:
      parts.append(f"{label} {w[key]}")
  return f" [{', '.join(parts)}]" if parts else ""


def format_host(records: list[dict]) -> str:
  recs = [r for r in records if r["status"] == "ok" and r.get("layers", 1) == 1 and
          any(r.get(k) is not None for k, _ in _HOST_FIELDS[:2])]
  if not recs:
    return ""
  header = ["workload", "system"] + [label for _, label in _HOST_FIELDS]
  rows = []
  for r in recs:
    row = [r["workload"], r["system"]]
    for key, _ in _HOST_FIELDS:
      row.append(_fmt(r.get(key), ".1f"))
    rows.append(row)
  title = ("host costs (us, medians): planner = plan_host alone; plan() = wrapper.plan; "
           "step = jitted single op, fixed plan, blocked; plan+step = fresh plan then step, "
           "blocked; overhead = plan+step - kernel; loop step = per step of a loop of fresh "
           "plans and steps dispatched back to back (each step's output the next's query, "
           "one block at the end), in the steady state: a 2n-step loop minus an n-step one; "
           "loop overhead = loop step - kernel")
  return title + "\n" + _table(header, rows, "ll" + "r" * len(_HOST_FIELDS))


def feature_rows(records: list[dict], workloads: dict) -> list[tuple[dict, dict]]:
  """(record, its workload) of the ok rows timed beside their plain twin."""
  out = []
  for r in records:
    w = workloads.get(wkey(r["kind"], r["workload"]), {})
    if r["status"] == "ok" and w.get("base_workload"):
      out.append((r, w))
  return out


def format_features(records: list[dict], workloads: dict) -> str:
  rows = []
  for r, w in feature_rows(records, workloads):
    rows.append([f"{r['kind']} {r['workload']}", r["system"], ", ".join(w["features"]),
                 _fmt(r.get("base_time_us"), ".1f"), _fmt(r["time_us"], ".1f"),
                 _ratio(r.get("vs_base")), _ratio(r.get("vs_base_best_ours")),
                 _ratio(r.get("vs_flashinfer"))])
  if not rows:
    return ""
  title = ("feature costs (same process): 'without' = the system's time on the row without "
           "the features; with / without = the system's own ratio (< 1: faster with them); "
           "vs our best without = ours with the features over the best of ours without them; "
           "vs FI = FlashInfer's best time with the same features over this one")
  header = ["row", "system", "features", "without us", "with us", "with / without",
            "vs our best without", "vs FI"]
  return title + "\n" + _table(header, rows, "lllrrrrr")


def _ratio(x) -> str:
  return _fmt(x, ".3f") + ("x" if x else "")


_MODEL_FIELDS = (("step_us", "step, fresh plan"), ("time_us", "per layer"),
                 ("step_reused_us", "step, reused plan"), ("step_device_put_us", "step, device_put"),
                 ("step_vs_reused", "fresh / reused"), ("wrapper_plan_us", "plan()"))


def model_rows(records: list[dict]) -> list[dict]:
  """The ok records of model-shaped steps (layers > 1)."""
  return [r for r in records if r["status"] == "ok" and r.get("layers", 1) > 1]


def format_model(records: list[dict], workloads: dict) -> str:
  recs = model_rows(records)
  if not recs:
    return ""
  header = ["workload", "layers", "system"] + [label for _, label in _MODEL_FIELDS] + ["vs FI"]
  rows = []
  for r in recs:
    row = [r["workload"], str(r["layers"]), r["system"]]
    for key, _ in _MODEL_FIELDS:
      row.append(_fmt(r.get(key), ".3f" if key == "step_vs_reused" else ".1f"))
    vs = r.get("vs_flashinfer")
    rows.append(row + [_fmt(vs, ".2f") + ("x" if vs else "")])
  title = ("model-shaped decode steps (us; host clock, steady state of back-to-back steps): "
           "L attention ops over L caches sharing one plan; fresh plan = plan() every step "
           "(ours: the host buffer goes with the jitted call; FlashInfer: plan() + L run()); "
           "reused = one plan made before the loop (ours: on the device); device_put = ours "
           "with the fresh plan put on the device before each call; vs FI = FlashInfer's "
           "best fresh-plan step over ours")
  return title + "\n" + _table(header, rows, "lrl" + "r" * (len(_MODEL_FIELDS) + 1))


def format_ceilings(ceilings: dict) -> str:
  parts = []
  for key, label in (("copy_gbps_jax", "copy (jax)"), ("copy_gbps_torch", "copy (torch)"),
                     ("read_gbps", "read-only sum (torch)")):
    if ceilings.get(key):
      parts.append(f"{label} {ceilings[key]:.1f} GB/s")
  if ceilings.get("matmul_tflops"):
    parts.append(f"bf16 matmul {ceilings['matmul_n']}^3 {ceilings['matmul_tflops']:.2f} TFLOP/s")
  return "ceilings: " + ("; ".join(parts) if parts else "not measured")


def _note(r: dict) -> str:
  note = r.get("note", "")
  if r.get("vs_plain_decode"):
    note = f"{r['vs_plain_decode']:.2f}x our plain decode; " + note
  if r.get("check_error"):
    note = (note + "; " if note else "") + "check failed: " + _short(r["check_error"], 60)
  return note


def _short(text: str, n: int = 90) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= n else text[:n - 3] + "..."


# ---------------------------------------------------------------- JSON, plot


def write_json(path: str, doc: dict) -> None:
  with open(path, "w") as f:
    json.dump(doc, f, indent=1, default=_json_default)
    f.write("\n")


def _json_default(x):
  import numpy as np

  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def write_plot(path: str, records: list[dict], ceilings: dict, title: str = "") -> None:
  """Grouped bars of GB/s (decode) or TFLOP/s (prefill) per workload and system, one
  panel per kind, the measured ceiling drawn as a dashed line."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  kinds = [k for k in ("decode", "prefill") if any(r["kind"] == k for r in records)]
  fig, axes = plt.subplots(len(kinds) or 1, 1, figsize=(13, 4.2 * max(1, len(kinds))),
                           squeeze=False)
  for ax, kind in zip(axes[:, 0], kinds):
    ok = [r for r in records if r["kind"] == kind and r["status"] == "ok"]
    workloads = list(dict.fromkeys(r["workload"] for r in records if r["kind"] == kind))
    systems = list(dict.fromkeys(r["system"] for r in ok))
    width = 0.8 / max(1, len(systems))
    for j, system in enumerate(systems):
      xs, ys = [], []
      for i, wname in enumerate(workloads):
        for r in ok:
          if r["workload"] == wname and r["system"] == system:
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(r["value"])
      bars = ax.bar(xs, ys, width, label=system)
      ax.bar_label(bars, labels=[f"{y:.0f}" if y >= 100 else f"{y:.3g}" for y in ys],
                   fontsize=6, rotation=90, padding=2)
    ceil = ceiling_for(kind, ceilings)
    if ceil:
      label = ("copy ceiling" if kind == "decode" else "bf16 matmul ceiling") + f" {ceil:.4g}"
      ax.axhline(ceil, color="k", linestyle="--", linewidth=1, label=label)
      top = max([ceil] + [r["value"] for r in ok])
      ax.set_ylim(0, top * 1.15)  # room for the rotated value labels
    ax.set_xticks(range(len(workloads)))
    many = len(workloads) > 8
    ax.set_xticklabels(workloads, rotation=25 if many else 0, ha="right" if many else "center",
                       fontsize=8 if many else 10)
    ax.set_ylabel(METRIC[kind])
    ax.set_title(f"{kind}" + (f" - {title}" if title else ""))
    # Outside the axes: inside, it would cover the bars it explains.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------- markdown


def format_markdown(doc: dict) -> str:
  """docs/BENCHMARKS.md-ready tables: one row per workload, one column per system
  (value and % of ceiling), the ratio of our best to FlashInfer's best, host costs."""
  meta, ceilings, records, workloads = doc["meta"], doc["ceilings"], doc["results"], doc["workloads"]
  versions = ", ".join(f"{k} {meta[k]}" for k in ("jax", "jaxlib", "torch", "flashinfer",
                                                   "jax_pagedattn") if meta.get(k))
  lines = [f"Measured on {meta['device']} ({meta['platform']}) on {meta['date'][:10]}; "
           f"{versions}.", "", f"Command: `{meta['command']}`", "",
           format_ceilings(ceilings).replace("ceilings: ", "Ceilings measured in the same run: ")
           + ".", ""]
  for kind in ("decode", "prefill"):
    recs = [r for r in records if r["kind"] == kind]
    if not recs:
      continue
    names = list(dict.fromkeys(r["workload"] for r in recs))
    systems = list(dict.fromkeys(r["system"] for r in recs if r["status"] == "ok"))
    first = workloads[wkey(kind, names[0])]
    unit = METRIC[kind]
    lines.append(f"### {kind} ({unit}; % of the "
                 f"{'copy' if kind == 'decode' else 'bf16 matmul'} ceiling in parentheses)")
    lines.append("")
    lines.append(f"{first['dtype']}, {first['num_qo_heads']}/{first['num_kv_heads']} heads, "
                 f"head_dim {first['head_dim']}, page {first['page_size']}, {first['kv_layout']}, "
                 "random page placement" + (", causal" if kind == "prefill" and first["causal"]
                                            else "") + ".")
    lines.append("")
    lines.append("| workload | " + " | ".join(systems) + " | ours / FlashInfer best |")
    lines.append("|---" * (len(systems) + 2) + "|")
    for name in names:
      cells, ours_best = [], None
      for system in systems:
        r = next((x for x in recs if x["workload"] == name and x["system"] == system), None)
        if r is None or r["status"] != "ok":
          cells.append("-")
          continue
        frac = r.get("fraction_of_ceiling")
        v = r["value"]
        cells.append(f"{v:.0f}" if v >= 100 else f"{v:.3g}")
        if frac:
          cells[-1] += f" ({100 * frac:.0f}%)"
        if system.startswith("ours") and r.get("vs_flashinfer"):
          ours_best = max(ours_best or 0.0, r["vs_flashinfer"])
      ratio = f"{ours_best:.2f}x" if ours_best else "-"
      label = name + _config_suffix(workloads[wkey(kind, name)], first)
      lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    lines.append("")
    cascade = [r for r in recs if r["status"] == "ok" and r.get("vs_plain_decode")]
    if cascade:
      lines.append("Cascade over our best plain decode of the same batch (time ratio): "
                   + "; ".join(f"{r['workload']} {r['vs_plain_decode']:.2f}x" for r in cascade)
                   + ".")
      lines.append("")
  costs = feature_rows(records, workloads)
  if costs:
    lines.append("### feature costs (time with the features / time of the same row without "
                 "them, same process)")
    lines.append("")
    lines.append("| row | system | features | without (us) | with (us) | with / without | "
                 "vs our best without | FlashInfer best / ours |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r, w in costs:
      lines.append(f"| {r['kind']} {r['workload']} | {r['system']} | {', '.join(w['features'])} | "
                   f"{_fmt(r.get('base_time_us'), '.1f')} | {_fmt(r['time_us'], '.1f')} | "
                   f"{_ratio(r.get('vs_base'))} | {_ratio(r.get('vs_base_best_ours'))} | "
                   f"{_ratio(r.get('vs_flashinfer'))} |")
    lines.append("")
  model = model_rows(records)
  if model:
    lines.append("### model-shaped decode steps (us per step, fresh plan every step)")
    lines.append("")
    lines.append("| workload | system | step, fresh plan | per layer | step, reused plan | "
                 "step, device_put | fresh / reused | FlashInfer best / ours |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in model:
      vs = r.get("vs_flashinfer")
      lines.append(f"| {r['workload']} | {r['system']} | "
                   + " | ".join(_fmt(r.get(k), ".1f") for k in (
                       "step_us", "time_us", "step_reused_us", "step_device_put_us"))
                   + f" | {_fmt(r.get('step_vs_reused'), '.3f')} | "
                   + (f"{vs:.2f}x" if vs else "-") + " |")
    lines.append("")
  host = [r for r in records if r["status"] == "ok" and r.get("wrapper_plan_us") is not None
          and r.get("layers", 1) == 1]
  if host:
    lines.append("### host costs (us, medians)")
    lines.append("")
    lines.append("| workload | system | planner alone | plan() | kernel | one blocked step + "
                 "fresh plan | minus kernel | loop step + fresh plan | minus kernel |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in host:
      lines.append(f"| {r['kind']} {r['workload']} | {r['system']} | "
                   + " | ".join(_fmt(r.get(k), ".1f") for k in (
                       "plan_host_us", "wrapper_plan_us", "time_us", "step_with_plan_us",
                       "step_overhead_us", "step_pipelined_us", "pipelined_overhead_us")) + " |")
    lines.append("")
  skipped = [r for r in records if r["status"] != "ok"]
  if skipped:
    lines.append("Not measured: " + "; ".join(
        f"{r['kind']} {r['workload']} {r['system']} ({r['status']}: {_short(r.get('message', ''), 80)})"
        for r in skipped) + ".")
    lines.append("")
  return "\n".join(lines)


def write_markdown(path: str, doc: dict) -> None:
  with open(path, "w") as f:
    f.write(format_markdown(doc))
