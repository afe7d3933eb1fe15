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


# ------------------------------------------------------------------ features (issue 15)

FEATURE_FLAGS = {  # flag -> the row name's suffix
    ("--kv-dtype", "float8_e4m3fn"): "-fp8e4m3",
    ("--kv-dtype", "float8_e5m2"): "-fp8e5m2",
    ("--soft-cap", "1"): "-cap1",  # small: the capped logits differ from plain ones
    ("--window-left", "16"): "-win16",
    ("--sinks",): "-sinks",
    ("--fixed-split-size", "1"): "-split1",
    ("--disable-split-kv",): "-nosplit",
}


def test_feature_rows_keep_the_plain_rows_lengths_and_count_what_is_read():
  """A row with features draws the lengths, pages and numbers of the row without them;
  its bytes count fp8 keys at one byte and only the keys inside a sliding window, its
  flops only the (query, key) pairs inside it."""
  plain = wl.make_workload("lognormal64", "decode", 64, "lognormal:16:32768")
  f = wl.Features(kv_dtype="float8_e4m3fn", window_left=100, sinks=True)
  assert f.labels() == ["fp8e4m3", "win100", "sinks"] and f.changes_math
  w = wl.make_workload("lognormal64" + f.suffix, "decode", 64, "lognormal:16:32768", features=f)
  assert w.seed_name == "lognormal64" and np.array_equal(w.kv_lens, plain.kv_lens)
  _, plain_sets = wl.build_page_sets(plain, 2, seed=0)
  _, sets = wl.build_page_sets(w, 2, seed=0)
  assert all(np.array_equal(a.kv_indices, b.kv_indices) for a, b in zip(plain_sets, sets))
  assert w.kv_bytes == int(np.minimum(plain.kv_lens, 101).sum()) * 8 * 128 * 2 * 1
  assert w.qo_bytes == plain.qo_bytes and w.kv_dtype == "float8_e4m3fn"
  splits = wl.Features(fixed_split_size=4, disable_split_kv=True)
  assert splits.suffix == "-split4-nosplit" and not splits.changes_math
  for causal in (True, False):
    p = wl.make_workload("p", "prefill", 3, "5:40", heads=(4, 2), head_dim=64, prefix=7,
                         causal=causal, features=wl.Features(window_left=6))
    pairs, keys = 0, 0
    for qo, kv in zip(p.qo_lens.tolist(), p.kv_lens.tolist()):
      seen = set()
      for i in range(qo):
        pos = kv - qo + i
        visible = [j for j in range(kv) if j >= pos - 6 and (j <= pos or not causal)]
        pairs += len(visible)
        seen.update(visible)
      keys += len(seen)
    assert p.flops == 4 * 64 * 4 * pairs and p.kv_bytes == keys * 2 * 64 * 2 * 2
  for bad in (dict(kv_dtype="int8"), dict(logits_soft_cap=-1.0), dict(window_left=-2),
              dict(fixed_split_size=0)):
    with pytest.raises(ValueError):
      wl.Features(**bad)


def test_the_oracle_sees_every_feature():
  """The rel-err reference of a row takes its features: with each one the reference
  moves far from the plain row's, so a kernel that dropped a feature would fail the
  check (the fp8 row by its scales, the soft-cap row with a small cap)."""
  import jax

  from jax_pagedattn import bench_timing

  def reference(features):
    w = wl.make_workload("f" + features.suffix, "decode", 3, "20:70", heads=(4, 2), head_dim=64,
                         features=features)
    pool, sets = wl.build_page_sets(w, 1, seed=0)
    cache, q = wl.make_device_inputs(w, pool, 0)
    assert cache.dtype == np.dtype(w.kv_dtype)
    case = bench_baselines.Case(w=w, pool=pool, sets=sets, cache=cache, q=q,
                                cfg=bench_timing.TimingConfig(), opts=bench_baselines.Options(),
                                platform=jax.devices()[0].platform, sinks=wl.make_sinks(w, 0))
    return case.reference()

  plain = reference(wl.NO_FEATURES)
  for f in (wl.Features(kv_dtype="float8_e4m3fn"), wl.Features(kv_dtype="float8_e5m2"),
            wl.Features(logits_soft_cap=0.5), wl.Features(window_left=8),
            wl.Features(sinks=True)):
    assert bench_baselines.rel_err(reference(f), plain) > 0.1, f.labels()
  split = reference(wl.Features(fixed_split_size=1))
  assert bench_baselines.rel_err(split, plain) == 0.0  # where a plan cuts is not math


def test_the_oracle_splits_a_batch_it_cannot_hold_at_once(monkeypatch):
  """The eager oracle runs a few requests per call where the padded batch would be too
  big (lognormal16's prompts), with the same answer as one call."""
  import jax

  from jax_pagedattn import bench_timing

  w = wl.make_workload("g-win9-sinks", "prefill", 5, "3:40", heads=(4, 2), head_dim=64,
                       prefix=6, features=wl.Features(window_left=9, sinks=True))
  pool, sets = wl.build_page_sets(w, 1, seed=0)
  cache, q = wl.make_device_inputs(w, pool, 0)

  def oracle():
    return bench_baselines.Case(w=w, pool=pool, sets=sets, cache=cache, q=q,
                                cfg=bench_timing.TimingConfig(), opts=bench_baselines.Options(),
                                platform=jax.devices()[0].platform,
                                sinks=wl.make_sinks(w, 0)).reference()

  assert bench_baselines.reference_groups(w) == [(0, 5)]
  whole = oracle()
  monkeypatch.setattr(bench_baselines, "REFERENCE_ELEMENTS", 64 * 4 * 64)
  groups = bench_baselines.reference_groups(w)
  assert len(groups) > 1 and groups[0][0] == 0 and groups[-1][1] == 5
  assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
  np.testing.assert_allclose(oracle(), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("flag", list(FEATURE_FLAGS), ids=lambda f: "".join(f))
def test_cli_feature_flags(tmp_path, capsys, kind, flag):
  """Each feature flag on the CPU, with --feature-ratio: ours runs the row with the
  feature (checked against the oracle given the same feature) beside the row without
  it; the jnp baseline skips a feature that changes the math and FlashInfer skips off
  the GPU; the JSON and Markdown say which features a row had."""
  out, md = tmp_path / "f.json", tmp_path / "f.md"
  prefix = ["--prefix", "24"] if kind == "prefill" else []
  bench.main([kind, *TINY, *prefix, *flag, "--feature-ratio", "--no-host",
              "--systems", "ours,jnp,flashinfer", "--json", str(out), "--markdown", str(md)])
  assert "feature costs" in capsys.readouterr().out
  doc = _load(out)
  name = "2x64" + FEATURE_FLAGS[flag]
  assert list(doc["workloads"]) == [f"{kind}/2x64", f"{kind}/{name}"]
  w = doc["workloads"][f"{kind}/{name}"]
  assert w["features"] == [FEATURE_FLAGS[flag][1:]] and w["base_workload"] == f"{kind}/2x64"
  assert doc["meta"]["features"]["features"] == w["features"]
  if flag[0] == "--kv-dtype":
    assert w["kv_dtype"] == flag[1] and w["kv_bytes"] * 2 == doc["workloads"][f"{kind}/2x64"][
        "kv_bytes"]
  rows = [r for r in doc["results"] if r["workload"] == name]
  res = {r["system"]: r for r in rows}
  ours = [s for s in res if s.startswith("ours")]
  assert ours
  for system in ours:
    r = res[system]
    assert r["status"] == "ok", r.get("message")
    assert r["rel_err"] < 2e-2 and r["features"] == w["features"]
    assert r["vs_base"] > 0 and r["vs_base_best_ours"] > 0
  changes_math = flag[0] not in ("--fixed-split-size", "--disable-split-kv")
  assert res["jnp"]["status"] == ("skipped" if changes_math else "ok")
  for system in res:
    if system.startswith("flashinfer"):
      assert res[system]["status"] == "skipped"
  assert f"| {kind} {name} | {ours[0]} |" in md.read_text()


def test_feature_ratios_are_against_the_plain_row():
  from jax_pagedattn import bench_report

  workloads = {"decode/a": dict(bytes_moved=1, flops=1),
               "decode/a-fp8e4m3": dict(bytes_moved=1, flops=1, base_workload="decode/a",
                                        features=["fp8e4m3"])}
  recs = [dict(workload=w, kind="decode", system=s, status="ok", time_us=t)
          for w, s, t in (("a", "ours-tc", 100.0), ("a", "ours-cc", 120.0),
                          ("a", "flashinfer-cc", 110.0), ("a-fp8e4m3", "ours-cc", 54.0),
                          ("a-fp8e4m3", "flashinfer-cc", 90.0))]
  recs.append(dict(workload="a-fp8e4m3", kind="decode", system="ours-tc", status="skipped"))
  bench_report.derive(recs, workloads, {})
  fp8 = {r["system"]: r for r in recs if r["workload"] == "a-fp8e4m3" and r["status"] == "ok"}
  assert fp8["ours-cc"]["base_time_us"] == 120.0
  assert fp8["ours-cc"]["vs_base"] == pytest.approx(54 / 120)
  assert fp8["ours-cc"]["vs_base_best_ours"] == pytest.approx(54 / 100)
  assert fp8["ours-cc"]["vs_flashinfer"] == pytest.approx(90 / 54)
  assert fp8["flashinfer-cc"]["vs_base"] == pytest.approx(90 / 110)
  assert "vs_base_best_ours" not in fp8["flashinfer-cc"]
  text = bench_report.format_features(recs, workloads)
  assert "0.540x" in text and "0.450x" in text


def test_cli_rejects_bad_feature_arguments():
  for argv in (["--feature-ratio"],  # nothing to compare
               ["--soft-cap", "30", "--layers", "2"],  # the model step plans without them
               ["--kv-dtype", "int8"], ["--fixed-split-size", "0"], ["--soft-cap", "-1"],
               ["--window-left", "-2"]):
    with pytest.raises(SystemExit):
      bench.main(["decode", *TINY, *argv])


def test_harness_bench_table_reads_the_harness_lines():
  """scripts/harness_bench_table.py: one table per problem, fastest first, each row's
  speed against sm90, `~` where its rounds overlap sm90's; error lines are skipped."""
  table_mod = _script("harness_bench_table")
  log = [
      "bench bf16 d128   4 x qo  2048 kv  2048 tile 128 causal none  sm80     :    0.614 ms"
      "    223.0 TFLOP/s   54.6 GB/s (K+V)  [rounds 0.613..0.613]",
      "bench bf16 d128   4 x qo  2048 kv  2048 tile 128 causal none  sm90     :    0.414 ms"
      "    332.5 TFLOP/s   81.1 GB/s (K+V)  [rounds 0.410..0.418]  max|out - sm80| 1.95e-03 nan 0",
      "bench bf16 d128   4 x qo  2048 kv  2048 tile 128 causal none  sm90-f1lrtmrk:    0.389 ms"
      "    353.6 TFLOP/s   86.3 GB/s (K+V)  [rounds 0.385..0.392]  max|out - sm80| 1.95e-03 nan 0",
      "bench bf16 d128   4 x qo  2048 kv  2048 tile 128 causal none  sm90-pp  :    0.412 ms"
      "    334.0 TFLOP/s   81.5 GB/s (K+V)  [rounds 0.409..0.415]  max|out - sm80| 1.95e-03 nan 0",
      "bench bf16 d256   4 x qo  2048 kv  2048 tile 128 causal none  sm80     : invalid argument",
  ]
  table = table_mod.parse(log)
  assert list(table) == ["d128 4 x qo 2048 kv 2048 tile 128 causal none"]
  assert table["d128 4 x qo 2048 kv 2048 tile 128 causal none"]["sm90-f1lrtmrk"] == (0.389, 0.385, 0.392)
  lines = table_mod.render(table).splitlines()
  assert [l.split()[0] for l in lines[1:]] == ["sm90-f1lrtmrk", "sm90-pp", "sm90", "sm80"]
  assert "1.064x" in lines[1] and "~" not in lines[1]
  assert "~" in lines[2]  # sm90-pp's rounds overlap sm90's
