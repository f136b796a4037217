"""benchmarks/bench_scale.py --quick: decoder blocks (LLaMA and Qwen2 layouts, grouped-query attention, q/k/v biases)
compacted at four kept fractions run decode on a KV cache and prefill, each compacted block equal to the block holding
its merged weights, with the bytes and FLOP ratios that bound them."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

import utils


def test_bench_scale_quick():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--quick", "--dtype", "fp32",
                           "--threads", "1", "--warmup", "1", "--reps", "1"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0]["what"] == "env" and rows[0]["quick"] is True
    blocks = {r["shape"]: r for r in rows if r["what"] == "block"}
    assert set(blocks) == {"tiny", "tiny-qwen2"}
    # q, k, v (GQA: 2 of 4 heads), o, gate, up, down: 64 x 64 x 2 + 64 x 32 x 2 + 3 x 64 x 176 (no bias)
    assert blocks["tiny"]["projection_params"] == 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 176
    assert blocks["tiny-qwen2"]["projection_params"] == 2 * 56 * 56 + 2 * 28 * 56 + 3 * 56 * 152 + 56 + 2 * 28
    speed = [r for r in rows if r["what"] == "speed"]
    assert sorted((r["shape"], r["phase"], r["kept"]) for r in speed) == sorted(
        (s, p, k) for s in blocks for p in ("decode", "prefill") for k in (0.9, 0.8, 0.7, 0.5))
    for r in speed:
        assert r["rel_diff"] <= 1e-6 and r["max_abs_diff"] <= 1e-5, r  # the compacted block computes L R x + S x + b
        assert r["kept_params"] == pytest.approx(r["kept"], abs=0.03) and r["dense_ms"] > 0 < r["compact_ms"]
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["compact_ms"], rel=1e-2)
        assert set(r["paths"]) <= set(utils.COMPACT_PATHS)
        ratio = r["bytes_ratio"] if r["phase"] == "decode" else r["flop_ratio"]
        assert r["kept_params"] - 0.01 <= ratio <= 1 and r["bound"] == pytest.approx(1 / ratio, rel=1e-2)
        if r["phase"] == "decode":  # the KV cache is read too: the bound is below 1 / kept
            assert r["context"] == 16 and ratio > r["kept_params"]
            assert r["dense_ops"]["gemms"] == 7 and r["compact_ops"]["kernels"] > 0


@pytest.mark.parametrize("form", ["fused", "transposed", "onehot"])
def test_bench_scale_forced_form(form):
    """``--form``: every compacted layer runs that form (the tiny shapes pick ``merged`` by themselves), and the
    block still computes what its merged weights give, with q/k/v biases (Qwen2)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--quick", "--dtype", "fp32",
                           "--threads", "1", "--warmup", "1", "--reps", "1", "--shapes", "tiny-qwen2", "--kept", "0.5",
                           "--form", form], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    speed = [json.loads(line) for line in proc.stdout.splitlines() if '"speed"' in line]
    assert [r["phase"] for r in speed] == ["decode", "prefill"]
    for r in speed:
        assert r["paths"] == [form] and r["rel_diff"] <= 1e-6 and r["max_abs_diff"] <= 1e-5, r
