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
        (s, p, k) for s in blocks for p in ("projections", "decode", "prefill") for k in (0.9, 0.8, 0.7, 0.5))
    for r in speed:
        assert r["rel_diff"] <= 1e-6 and r["max_abs_diff"] <= 1e-5, r  # the compacted block computes L R x + S x + b
        assert r["kept_params"] == pytest.approx(r["kept"], abs=0.03) and r["dense_ms"] > 0 < r["compact_ms"]
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["compact_ms"], rel=1e-2)
        assert set(r["paths"]) <= set(utils.COMPACT_PATHS)
        ratio = r["flop_ratio"] if r["phase"] == "prefill" else r["bytes_ratio"]
        assert r["kept_params"] - 0.01 <= ratio <= 1 and r["bound"] == pytest.approx(1 / ratio, rel=1e-2)
        if r["phase"] == "decode":  # the KV cache is read too: the bound is below 1 / kept
            assert r["context"] == 16 and ratio > r["kept_params"]
            assert r["dense_ops"]["gemms"] == 7 and r["compact_ops"]["kernels"] > 0
        if r["phase"] == "projections":  # the weights alone: the bound is 1 / kept
            assert r["bytes_ratio"] == r["kept_params"]
            assert r["dense_mv_ms"] > 0 and r["speedup_vs_dense_mv"] == pytest.approx(  # ms rounded to 1 us
                r["dense_mv_ms"] / r["compact_ms"], rel=0.1)
            assert r["of_bound"] == pytest.approx(r["speedup"] * r["kept_params"], rel=2e-2)


@pytest.mark.parametrize("form", ["fused", "transposed", "onehot"])
def test_bench_scale_forced_form(form):
    """``--form``: every compacted layer runs that form (the tiny shapes pick ``merged`` by themselves), and the
    block still computes what its merged weights give, with q/k/v biases (Qwen2)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--quick", "--dtype", "fp32",
                           "--threads", "1", "--warmup", "1", "--reps", "1", "--shapes", "tiny-qwen2", "--kept", "0.5",
                           "--form", form], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    speed = [json.loads(line) for line in proc.stdout.splitlines() if '"speed"' in line]
    assert [r["phase"] for r in speed] == ["projections", "decode", "prefill"]
    for r in speed:
        assert r["paths"] == [form] and r["rel_diff"] <= 1e-6 and r["max_abs_diff"] <= 1e-5, r


def test_bench_scale_one_shot_quick():
    """``--one-shot``: the one-shot path (streaming statistics, output Fisher, decompositions, error tables,
    allocation, build, sequential refit) on two tiny blocks, every stage timed, the buffers it keeps of exactly the
    sizes their formulas give, and the projection of four whole models with its formulas."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--one-shot", "--quick",
                           "--dtype", "fp32", "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0]["what"] == "env"
    block = next(r for r in rows if r["what"] == "one_shot_block")
    h, i, blocks, tokens = 64, 176, 2, 2 * 32  # tiny (4 heads, 2 KV heads: k, v have 32 outputs), --calib-tokens 2x32
    assert (block["hidden"], block["intermediate"], block["blocks"], block["calibration_tokens"]) == (h, i, blocks,
                                                                                                      tokens)
    stages = {(r["run"], r["stage"]): r for r in rows if r["what"] == "one_shot_stage"}
    plain = ["forward", "statistics", "output_fisher", "decompositions", "tables", "allocate", "build"]
    assert set(stages) == {("plain", s) for s in plain} | {("sequential", s) for s in plain if s not in (
        "forward", "output_fisher")} | {("sequential", "sequential_refit"), ("sequential", "sequential_decompositions")}
    for r in stages.values():
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 0 and r["peak_rss_over_start_bytes"] >= 0, r
    # streaming: each block's statistics and SVDs twice (the tables, then the build); the refit: one SVD per layer
    assert stages["plain", "statistics"]["calls"] == stages["plain", "decompositions"]["calls"] == 2 * blocks
    assert stages["sequential", "sequential_decompositions"]["calls"] == 7 * blocks
    layers = [(h, h), (32, h), (32, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in)
    buf = next(r for r in rows if r["what"] == "one_shot_buffers")
    assert buf["covariance_inputs"] == [h, h, h, i]
    assert buf["covariance_bytes_per_block"] == buf["k_inv_bytes_per_block"] == 8 * (3 * h * h + i * i)
    assert buf["fisher_bytes"] == 8 * blocks * sum(o for o, _ in layers)
    assert buf["svd_factor_bytes"] == {"U": 4 * blocks * sum(o * min(o, n) for o, n in layers),
                                       "S": 4 * blocks * sum(min(o, n) for o, n in layers),
                                       "Vh": 4 * blocks * sum(min(o, n) * n for o, n in layers)}
    assert buf["table_dtype"] == "float32"  # computed in float64, kept in float32
    assert buf["table_shapes"] == [[-(-min(o, n) // 8) + 1, o + 1] for o, n in layers] * blocks
    assert buf["table_bytes"] == 4 * blocks * sum((-(-min(o, n) // 8) + 1) * (o + 1) for o, n in layers)
    assert buf["hidden_dtype"] == "float32" and buf["hidden_bytes"] == 2 * tokens * h * 4  # original and compressed
    assert buf["fisher_saved_activation_bytes_per_batch"] > 32 * (4 * h + 3 * i) * 4  # at least the linears' inputs
    rates = next(r for r in rows if r["what"] == "one_shot_rates")
    assert rates["stored"] <= rates["budget"] and rates["weighted_error_sequential"] > 0
    assert all(rates[k] > 0 for k in ("forward_s_per_block_token", "fisher_s_per_block_token",
                                      "decomposition_s_per_block_pass", "saved_activation_bytes_per_block_token"))
    proj = [r for r in rows if r["what"] == "projection"]
    models = {r["model"]: r for r in rows if r["what"] == "projection_model"}
    params = {"Llama-3.2-1B": 1_235_814_400, "LLaMA-2-7B": 6_738_415_616, "Llama-3-8B": 8_030_261_248,
              "Llama-3-70B": 70_553_706_496}  # the published parameter counts
    assert {m: r["params"] for m, r in models.items()} == params
    for r in proj:
        assert r["gpu_bytes"] >= 2 * params[r["model"]] and r["gpu_formula"] and r["time_formula"], r
        assert r["stage"] == "load" or r["seconds"] > 0, r
        assert "projected from the measured tiny block" in r["source"]
    assert {r["stage"] for r in proj} == {"load", "statistics", "output_fisher", "decompositions", "tables",
                                          "allocate", "build", "sequential"}
    assert sum(r["gpu_formula"].startswith("weights_bf16") for r in proj) >= 4 * 5
    tables = next(r for r in proj if r["model"] == "Llama-3-8B" and r["stage"] == "tables")
    # the error tables of the 32 blocks, float32 (plus one table's transients), float64 before
    entries = 32 * sum((-(-min(o, n) // 8) + 1) * (o + 1) for o, n in [
        (4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)])
    # and one block's SVD factors (float32) and K^-1 (float64), which wait in host memory on a GPU
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    stored = 4 * sum(o * min(o, n) + min(o, n) + min(o, n) * n for o, n in shapes) + 8 * (3 * 4096 ** 2 + 14336 ** 2)
    assert 4 * entries + stored < tables["host_bytes"] < (4 * entries + stored) * 1.1
    assert models["Llama-3-8B"]["host_tables_float64_before_bytes"] == 8 * entries
    for m, r in models.items():
        assert r["peak_gpu_bytes"] > 2 * params[m] and r["peak_host_bytes"] >= 2 * params[m] and r["seconds"] > 0
        assert r["fits_24GiB_gpu"] == (r["peak_gpu_bytes"] <= 24 * 2 ** 30)
    assert not models["Llama-3-70B"]["fits_24GiB_gpu"] and not models["Llama-3-70B"]["fits_32GiB_host"]
    assert "| stage | Llama-3.2-1B | LLaMA-2-7B | Llama-3-8B | Llama-3-70B |" in proc.stderr
