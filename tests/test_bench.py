"""Smoke tests of `python -m jax_pagedattn.bench` on the CPU: tiny decode and prefill
sweeps through the CLI with --json, plus the workload arithmetic the numbers rest on;
and of scripts/bench_rpa.py (the in-graph ragged decode loop against plan/run)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from jax_pagedattn import bench, bench_baselines, bench_workloads as wl

TINY = ["--batch", "2", "--kv-len", "64", "--heads", "4/2", "--head-dim", "64", "--quick",
        "--no-progress"]


# ------------------------------------------------------------------ workloads


def test_length_specs():
  rng = np.random.default_rng(0)
  assert wl.parse_lengths("37")(5, rng).tolist() == [37] * 5
  u = wl.parse_lengths("3:9")(1000, rng)
  assert u.min() >= 3 and u.max() <= 9 and len(set(u.tolist())) == 7
  z = wl.parse_lengths("zipf:16:32768")(64, rng)
  assert sorted(z.tolist(), reverse=True)[:3] == [32768, 16384, 10923]
  assert z.min() >= 16
  ln = wl.parse_lengths("lognormal:16:32768")(4096, rng)
  assert ln.min() >= 16 and ln.max() <= 32768
  assert ln.max() / np.median(ln) > 10  # very unequal, as the preset is meant to be
  for bad in ("0", "9:3", "zipf:1", "lognormal:a:b", "foo"):
    with pytest.raises(ValueError):
      wl.parse_lengths(bad)
  assert wl.parse_heads("32/8") == (32, 8) and wl.parse_heads("16") == (16, 16)
  with pytest.raises(ValueError):
    wl.parse_heads("32/6")


def test_bytes_and_causal_flops():
  w = wl.make_workload("t", "prefill", 3, "5:40", heads=(4, 2), head_dim=64, prefix=3)
  pairs = sum(sum(min(kv, kv - qo + i + 1) for i in range(qo))
              for qo, kv in zip(w.qo_lens.tolist(), w.kv_lens.tolist()))
  assert w.flops == 4 * 64 * 4 * pairs
  d = wl.make_workload("d", "decode", 3, "100", heads=(8, 2), head_dim=128, dtype="float16")
  assert d.kv_bytes == 3 * 100 * 2 * 128 * 2 * 2
  assert d.bytes_moved == d.kv_bytes + 3 * 8 * 128 * 2 * 2


def test_page_sets_are_disjoint_random_and_cover_each_request():
  w = wl.make_workload("p", "decode", 5, "1:70", heads=(4, 2), head_dim=64, page_size=16)
  pool, sets = wl.build_page_sets(w, 3, seed=1)
  used = np.concatenate([s.kv_indices for s in sets])
  assert pool == used.size and np.array_equal(np.sort(used), np.arange(pool))
  assert not np.array_equal(sets[0].kv_indices, np.sort(sets[0].kv_indices))  # shuffled
  for s in sets:
    npages = np.diff(s.kv_indptr)
    lens = (npages - 1) * w.page_size + s.kv_last_page_len
    assert np.array_equal(lens, w.kv_lens)
    for b in range(w.batch):
      own = s.kv_indices[s.kv_indptr[b]:s.kv_indptr[b + 1]]
      assert np.array_equal(s.block_table[b, :own.size], own)
  assert wl.rotations_for(10 << 20, 50 << 20, 8) == 8
  assert wl.rotations_for(400 << 20, 50 << 20, 8) == 1


def test_shared_prefix_page_sets_and_cascade_levels():
  """A shared prefix is one run of pages per set, first in every request's pages; the
  cascade's two levels hold exactly those pages once and each request's own after."""
  batch, spec, over = wl.preset("decode", "cascade64")
  big = wl.make_workload("cascade64", "decode", batch, spec, **over)
  assert batch == 64 and (big.kv_lens == 16384 + 512).all() and big.shared_pages == 1024
  assert wl.preset_names("decode", "cascade") == ["cascade64"]
  assert "cascade64" not in wl.preset_names("decode", "all")
  w = wl.make_workload("s", "decode", 4, "1:40", heads=(4, 2), head_dim=64, page_size=16,
                       shared_prefix=48)
  own_pages = -(-(w.kv_lens - 48) // 16)
  pool, sets = wl.build_page_sets(w, 2, seed=3)
  assert pool == 2 * (3 + own_pages.sum())
  used = []
  for s in sets:
    prefix = s.kv_indices[:3]
    lens = (np.diff(s.kv_indptr) - 1) * 16 + s.kv_last_page_len
    assert np.array_equal(lens, w.kv_lens)
    for b in range(w.batch):
      pages = s.kv_indices[s.kv_indptr[b]:s.kv_indptr[b + 1]]
      assert np.array_equal(pages[:3], prefix) and np.array_equal(s.block_table[b, :pages.size],
                                                                  pages)
    (qo0, indptr0, indices0, last0), (qo1, indptr1, indices1, last1) = wl.cascade_levels(w, s)
    assert qo0.tolist() == [0, 4] and indptr0.tolist() == [0, 3] and last0.tolist() == [16]
    assert np.array_equal(indices0, prefix)
    assert qo1.tolist() == list(range(5)) and np.array_equal(np.diff(indptr1), own_pages)
    assert np.array_equal((own_pages - 1) * 16 + last1, w.kv_lens - 48)
    used += [prefix, indices1]
  used = np.concatenate(used)
  assert np.array_equal(np.sort(used), np.arange(pool))  # sets disjoint, no page unused
  for bad in (dict(shared_prefix=40), dict(shared_prefix=-16)):
    with pytest.raises(ValueError):
      wl.make_workload("x", "decode", 2, "8", page_size=16, **bad)
  with pytest.raises(ValueError):
    wl.make_workload("x", "prefill", 2, "8", page_size=16, shared_prefix=16)


def test_chain_timing_cancels_a_fixed_cost_per_repetition(monkeypatch):
  """time_jax_chain reports an op's time without what a repetition pays once: here
  each call takes 2 ms on the host clock and every final sync 10 ms, so one repetition
  of wall time per op would read 2 ms + 10 ms / calls."""
  import time

  import jax

  from jax_pagedattn import bench_timing

  monkeypatch.setattr(jax, "block_until_ready", lambda x: (time.sleep(0.010), x)[1])

  def call(q):
    time.sleep(0.002)
    return q

  cfg = bench_timing.TimingConfig(warmup=1, reps=3, rep_ms=10.0)
  t = bench_timing.time_jax_chain(call, 0, (), ops_per_call=2, cfg=cfg)
  assert 0.85e-3 <= t.median_s <= 1.25e-3, t  # 2 ms per call, 2 ops per call


def test_steady_loop_timing_cancels_the_loops_fixed_cost():
  """time_host_steady reports a step without the loop's fill and final sync: here a
  loop of n steps takes 1 ms per step plus 8 ms, which its plain average would read as
  1 ms + 8 ms / n."""
  import time

  from jax_pagedattn import bench_timing

  def loop(n):
    time.sleep(0.008 + 0.001 * n)

  cfg = bench_timing.TimingConfig(host_iters=12, host_max_s=2.0)
  per_step, whole_loop = bench_timing.time_host_steady(loop, 8, cfg)
  assert 0.8e-3 <= per_step <= 1.3e-3, per_step  # the plain average: 2 ms
  assert 1.8e-3 <= whole_loop <= 2.6e-3, whole_loop


def test_system_selection():
  assert bench_baselines.select_systems("decode", "ours,flashinfer") == [
      "ours-tc", "ours-cc", "flashinfer-tc", "flashinfer-cc"]
  assert bench_baselines.select_systems("prefill", "ours,pallas") == ["ours"]


# ------------------------------------------------------------------ CLI


def _load(path):
  with open(path) as f:
    return json.load(f)


def _by_system(doc):
  return {r["system"]: r for r in doc["results"]}


def test_cli_decode_json(tmp_path, capsys):
  out = tmp_path / "decode.json"
  png = tmp_path / "decode.png"
  md = tmp_path / "decode.md"
  bench.main(["decode", *TINY, "--pallas-interpret", "--json", str(out), "--plot", str(png),
              "--markdown", str(md)])
  text = capsys.readouterr().out
  assert "ours-tc" in text and "GB/s" in text and "host costs" in text
  assert "| 2x64 |" in md.read_text()
  doc = _load(out)
  assert doc["meta"]["complete"] and doc["meta"]["platform"] == "cpu"
  assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_tflops"] > 0
  (key, w), = doc["workloads"].items()
  assert key == "decode/2x64" and w["kv_bytes"] == 2 * 64 * 2 * 64 * 2 * 2
  assert w["rotations"] >= 1 and w["pool_pages"] == w["rotations"] * 2 * 4
  res = _by_system(doc)
  assert set(res) == set(bench_baselines.DECODE_SYSTEMS)
  for name in ("ours-tc", "ours-cc", "jnp"):
    r = res[name]
    assert r["status"] == "ok", r.get("message")
    assert r["time_us"] > 0 and r["metric"] == "GB/s" and r["value"] > 0
    assert 0 < r["fraction_of_ceiling"] and r["vs_flashinfer"] is None
    assert r["rel_err"] < 2e-2
  for name in ("ours-tc", "ours-cc"):
    r = res[name]
    for field in ("plan_host_us", "wrapper_plan_us", "step_us", "step_with_plan_us",
                  "step_overhead_us"):
      assert isinstance(r[field], float), field
  # The Pallas input adaptation is checked in its interpreter where it imports.
  assert res["pallas"]["status"] in ("ok", "skipped"), res["pallas"].get("message")
  if res["pallas"]["status"] == "ok":
    assert res["pallas"]["rel_err"] < 2e-2
  for name in ("flashinfer-tc", "flashinfer-cc"):
    assert res[name]["status"] == "skipped" and res[name]["message"]
  assert res["cascade"]["status"] == "skipped" and "shared prefix" in res["cascade"]["message"]
  if png.exists():
    assert png.stat().st_size > 1000


def test_cli_prefill_json(tmp_path):
  out = tmp_path / "prefill.json"
  bench.main(["prefill", *TINY, "--systems", "ours,jnp,xla,cudnn,flashinfer-fa3",
              "--json", str(out)])
  doc = _load(out)
  w = doc["workloads"]["prefill/2x64"]
  assert w["causal"] and w["flops"] == 4 * 64 * 4 * 2 * (64 * 65 // 2)
  res = _by_system(doc)
  assert set(res) == {"ours", "jnp", "xla-dense", "cudnn-dense", "flashinfer-fa3"}
  for name in ("ours", "jnp", "xla-dense"):
    r = res[name]
    assert r["status"] == "ok", r.get("message")
    assert r["metric"] == "TFLOP/s" and r["value"] > 0 and r["rel_err"] < 2e-2
  assert res["cudnn-dense"]["status"] == "skipped"
  assert res["flashinfer-fa3"]["status"] == "skipped"
  assert "plan_host_us" in res["ours"]


@pytest.mark.parametrize("pos", ["ROPE_LLAMA", "ALIBI"])
def test_cli_prefill_position_encodings(tmp_path, pos):
  # Ours is checked against the oracle with the same encoding (a run without it would be
  # far off); the systems without in-kernel encodings are skipped, not timed wrong.
  out = tmp_path / "prefill.json"
  bench.main(["prefill", *TINY, "--pos-encoding", pos, "--systems", "ours,jnp,xla",
              "--json", str(out)])
  doc = _load(out)
  assert doc["workloads"]["prefill/2x64"]["pos_encoding"] == pos
  res = _by_system(doc)
  assert res["ours"]["status"] == "ok" and res["ours"]["rel_err"] < 2e-2, res["ours"]
  assert res["jnp"]["status"] == "skipped" and pos in res["jnp"]["message"]
  assert res["xla-dense"]["status"] == "skipped"


def test_cli_cascade_json(tmp_path, capsys):
  """--shared-prefix: plain decode and the cascade wrapper on one batch sharing a
  prefix; the cascade is checked against the reference and reports its time ratio to
  our plain decode (issue 15's cascade row, --preset cascade, in small)."""
  out = tmp_path / "cascade.json"
  md = tmp_path / "cascade.md"
  bench.main(["decode", *TINY, "--shared-prefix", "32", "--systems", "ours-tc,cascade,jnp",
              "--json", str(out), "--markdown", str(md)])
  assert "x our plain decode" in capsys.readouterr().out
  doc = _load(out)
  (key, w), = doc["workloads"].items()
  assert key == "decode/2x64-shared32" and w["shared_prefix"] == 32 and w["kv_len_min"] == 96
  assert w["pool_pages"] == w["rotations"] * (2 + 2 * 4)  # the shared pages once per set
  res = _by_system(doc)
  for name in ("ours-tc", "cascade", "jnp"):
    assert res[name]["status"] == "ok", res[name].get("message")
    assert res[name]["rel_err"] < 2e-2
  r = res["cascade"]
  assert r["vs_plain_decode"] == pytest.approx(res["ours-tc"]["time_us"] / r["time_us"])
  assert r["wrapper_plan_us"] > 0
  assert "Cascade over our best plain decode of the same batch" in md.read_text()


@pytest.mark.parametrize("layout, prefix", [("NHD", "0"), ("HND", "24")])
def test_cli_prefill_ragged_json(tmp_path, layout, prefix):
  """--ragged: ours on ragged K/V (BatchPrefillWithRaggedKVCacheWrapper) checked against
  the paged reference of the same keys, with and without cached keys before the new
  tokens, in both layouts; FlashInfer's ragged systems skip where it is absent."""
  out = tmp_path / "ragged.json"
  bench.main(["prefill", *TINY, "--ragged", "--layout", layout, "--prefix", prefix,
              "--systems", "ours,flashinfer-fa2,flashinfer-fa3", "--json", str(out)])
  doc = _load(out)
  (key, w), = doc["workloads"].items()
  assert key == "prefill/2x64-ragged" and w["ragged"] and w["kv_len_min"] == 64 + int(prefix)
  res = _by_system(doc)
  r = res["ours"]
  assert r["status"] == "ok", r.get("message")
  assert r["rel_err"] < 2e-2 and r["note"] == "ragged K/V" and r["value"] > 0
  for field in ("plan_host_us", "wrapper_plan_us", "step_us", "step_with_plan_us",
                "step_pipelined_us"):
    assert r[field] > 0, field
  for name in ("flashinfer-fa2", "flashinfer-fa3"):
    assert res[name]["status"] == "skipped" and res[name]["message"]


def test_ragged_workload_keeps_the_paged_rows_lengths_and_keys():
  """A '-ragged' row draws its paged row's lengths; its ragged K/V are exactly the keys
  and values the paged cache holds for each request, in order."""
  import jax

  for name in ("lognormal16", "8x1024+4096"):
    batch, spec, over = wl.preset("prefill", name)
    paged = wl.make_workload(name, "prefill", batch, spec, **over)
    ragged = wl.make_workload(name + wl.RAGGED_SUFFIX, "prefill", batch, spec, ragged=True,
                              **over)
    assert ragged.ragged and np.array_equal(paged.kv_lens, ragged.kv_lens)
    assert np.array_equal(paged.qo_lens, ragged.qo_lens)
  with pytest.raises(ValueError, match="ragged"):
    wl.make_workload("x", "decode", 2, "8", ragged=True)
  for layout in ("NHD", "HND"):
    w = wl.make_workload("r", "prefill", 3, "1:40", heads=(4, 2), head_dim=64, page_size=16,
                         prefix=5, kv_layout=layout, ragged=True)
    pool, sets = wl.build_page_sets(w, 2, seed=0)
    cache = np.asarray(wl.random_cache(w, pool, jax.random.key(0)))
    kv = wl.kv_indptr(w)
    for s in sets:
      k, v = (np.asarray(x) for x in wl.ragged_kv(w, cache, s))
      if layout == "HND":
        k, v = k.swapaxes(0, 1), v.swapaxes(0, 1)
      assert k.shape == (int(w.kv_lens.sum()), 2, 64)
      for b in range(w.batch):
        pages = cache[s.kv_indices[s.kv_indptr[b]:s.kv_indptr[b + 1]]]
        if layout == "HND":
          pages = pages.swapaxes(2, 3)
        want_k = pages[:, 0].reshape(-1, 2, 64)[:w.kv_lens[b]]
        want_v = pages[:, 1].reshape(-1, 2, 64)[:w.kv_lens[b]]
        np.testing.assert_array_equal(k[kv[b]:kv[b + 1]], want_k)
        np.testing.assert_array_equal(v[kv[b]:kv[b + 1]], want_v)


def test_cli_rejects_bad_arguments():
  with pytest.raises(SystemExit):
    bench.main(["decode", "--kv-len", "zipf:9", "--quick"])
  with pytest.raises(SystemExit):
    bench.main(["decode", "--systems", "nonesuch", "--quick"])
  with pytest.raises(SystemExit):
    bench.main(["prefill", "--preset", "nonesuch", "--quick"])
  with pytest.raises(SystemExit):
    bench.main(["decode", "--shared-prefix", "20", "--quick"])  # not whole pages of 16
  with pytest.raises(SystemExit):
    bench.main(["decode", "--ragged", "--quick"])  # ragged K/V is a prefill input


def test_cli_model_step_json(tmp_path, capsys):
  """--layers: the model-shaped step of L ops over L caches sharing one fresh plan, with
  the reused-plan and device_put variants beside it; times per layer and per step."""
  out = tmp_path / "model.json"
  md = tmp_path / "model.md"
  bench.main(["decode", *TINY, "--layers", "3", "--systems", "ours,flashinfer,jnp", "--json",
              str(out), "--markdown", str(md)])
  text = capsys.readouterr().out
  assert "model-shaped decode steps" in text
  doc = _load(out)
  (key, w), = doc["workloads"].items()
  assert key == "decode/2x64-L3" and w["layers"] == 3
  res = _by_system(doc)
  for name in ("ours-tc", "ours-cc"):
    r = res[name]
    assert r["status"] == "ok", r.get("message")
    assert r["layers"] == 3 and r["rel_err"] < 2e-2
    for field in ("step_us", "step_reused_us", "step_device_put_us", "wrapper_plan_us"):
      assert r[field] > 0, field
    assert r["time_us"] == pytest.approx(r["step_us"] / 3)
    assert r["step_vs_reused"] == pytest.approx(r["step_us"] / r["step_reused_us"])
  assert res["jnp"]["status"] == "skipped" and res["flashinfer-tc"]["status"] == "skipped"
  assert "| 2x64-L3 | ours-tc |" in md.read_text()


def test_model_presets_keep_their_single_op_rows_lengths():
  for layers in wl.MODEL_LAYERS:
    names = wl.preset_names("decode", f"model{layers}")
    assert names == [f"{row}-L{layers}" for row in wl.MODEL_ROWS]
    for name in names:
      batch, spec, over = wl.preset("decode", name)
      row = name.rsplit("-L", 1)[0]
      a = wl.make_workload(name, "decode", batch, spec, **over)
      b = wl.make_workload(row, "decode", *wl.preset("decode", row)[:2])
      assert a.layers == layers and np.array_equal(a.kv_lens, b.kv_lens)
  assert not any("-L" in n for n in wl.preset_names("decode", "all"))


def _script(name: str):
  """A module of scripts/ (not part of the installed package), loaded from its file."""
  path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_rpa_smoke(tmp_path, capsys):
  """scripts/bench_rpa.py on a tiny batch: both decode loops and the planner alone are
  timed, the two loops agree (--check), and the JSON holds the per-step numbers."""
  out = tmp_path / "rpa.json"
  _script("bench_rpa").main(["--batch", "3", "--kv-len", "20", "--heads", "4/2", "--head-dim",
                             "64", "--steps", "2", "--reps", "1", "--layers", "2", "--check",
                             "--json", str(out)])
  assert "in-graph" in capsys.readouterr().out
  doc = _load(out)
  (r,) = doc["records"]
  assert r["layers"] == 2 and r["batch"] == 3 and r["max_abs_diff"] < 1e-4
  for loop in ("ingraph", "planrun", "planner"):
    assert set(r[loop]) == {"us_per_step", "min_us", "max_us"}
  assert r["ratio"] == pytest.approx(r["ingraph"]["us_per_step"] / r["planrun"]["us_per_step"])
