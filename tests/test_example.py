"""The README's main command, `examples/serve_llama.py`, on the tiny config.

Runs the script as a user would, with `--check`: the greedy tokens of the paged model
must equal those of the dense float32 model token for token. The page pool is made
tight so that requests are preempted and recomputed, and prompts are chunked, so the
check covers those paths too. The jnp reference attention must then give the very same
tokens.

`--tp 2` and `--tp 4` serve the same run tensor parallel on host CPU devices: 4 is more
than the tiny model's 2 KV heads, so its KV heads are replicated. The example asks jax
for the devices itself (that is under test too); JAX_PLATFORMS=cpu keeps a machine with
fewer GPUs on its host devices. Its --check then also serves the run on one device and
requires the same tokens; the compiled step may hold only the all-reduces of the
row-parallel projections, nothing that gathers q or the caches.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("flax")
pytest.importorskip("tqdm")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 12 requests, prompts 40-120 tokens, 64-token prefill budget (so prompts are chunked),
# 40 pages of 8 tokens for up to 6 requests of up to 160 tokens (so some are preempted).
ARGS = ["--config", "tiny", "--batch", "6", "--context", "160", "--num-requests", "12",
        "--prompt-len", "40:120", "--output-len", "8:40", "--page-size", "8",
        "--num-pages", "40", "--prefill-budget", "64", "--ignore-eos", "--no-progress",
        "--bench-steps", "1", "--bench-reps", "2"]


def _serve(tmp_path, *extra, env=None):
  out = tmp_path / "numbers.json"
  proc = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_llama.py"), *ARGS,
                         "--json", str(out), *extra],
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def paged_run(tmp_path_factory):
  return _serve(tmp_path_factory.mktemp("paged"), "--check", "--check-requests", "12")


def test_check_passes_with_chunking_and_preemption(paged_run):
  numbers, stdout = paged_run
  assert "check PASSED" in stdout
  assert numbers["check"] == {"passed": True, "tokens": numbers["output_tokens"],
                              "mismatches": 0}
  assert numbers["preemptions"] > 0, "the tight pool should force preemptions"
  assert numbers["output_tokens_per_s"] > 0 and 0 < numbers["attention"]["share"] <= 1.5


def test_compiles_are_bounded_and_logged(paged_run):
  numbers, stdout = paged_run
  assert 1 <= len(numbers["compiles"]) <= numbers["compile_bound"]
  assert len({tuple(k) for k in numbers["compiles"]}) == len(numbers["compiles"]), \
      "a shape bucket compiled twice"
  assert "compiles" in stdout


def test_reference_attention_gives_the_same_tokens(paged_run, tmp_path):
  numbers, _ = _serve(tmp_path, "--attention", "reference", "--bench-steps", "0")
  assert numbers["attention_backend"] == "jnp reference"
  assert numbers["output_digest"] == paged_run[0]["output_digest"]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda tp: f"tp{tp}")
def tp_run(request, tmp_path_factory):
  tp = request.param
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  numbers, stdout = _serve(tmp_path_factory.mktemp(f"tp{tp}"), "--tp", str(tp), "--check",
                           "--bench-steps", "0", env=env)
  return tp, numbers, stdout


def test_tensor_parallel_gives_the_tokens_of_one_device(tp_run, paged_run):
  tp, numbers, stdout = tp_run
  assert numbers["tp"] == tp
  assert stdout.count("check PASSED") == 2, stdout
  assert numbers["check"]["passed"] and numbers["check"]["mismatches"] == 0
  assert numbers["same_as_tp1"] == {"passed": True, "tokens": numbers["output_tokens"],
                                    "differing": 0, "near_ties": 0}
  assert numbers["preemptions"] > 0
  single = paged_run[0]
  if (single["device"], single["dtype"]) == (numbers["device"], numbers["dtype"]):
    assert numbers["output_digest"] == single["output_digest"]
  if tp > 2:  # the tiny model has 2 KV heads
    assert "each KV head replicated 2x" in stdout, stdout


def test_tensor_parallel_step_only_all_reduces(tp_run):
  _, numbers, _ = tp_run
  comms = numbers["collectives"]
  # Only [rows, hidden] partial sums: q is [rows, heads, head_dim], a cache 5-D.
  assert comms and all(re.fullmatch(r"all-reduce f32\[\d+,256\]", op) for op in comms), comms
  layers = 2  # the tiny config: one all-reduce after o_proj, one after down_proj
  assert sum(comms.values()) == 2 * layers, comms
