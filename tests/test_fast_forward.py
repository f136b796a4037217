"""The compacted forward of LinearLoSparse equals the reference ``left(right(x)) + sparse(x) + bias``.

Checked in fp32/bf16/fp16, for shapes on both sides of the "one GEMM for [R; S_kept]" threshold
(rows >= r + k), with and without bias, with k = 0 and k = out kept rows; gradients against autograd on the
reference; autocast; and a smoke run of each benchmark script.
"""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import utils  # noqa: E402

IN, OUT, RANK = 48, 40, 4
# rows = prod(shape[:-1]): 1, 6, 64 and 150 cover rows < r + k and rows >= r + k for k in (7, 40).
SHAPES = [(IN,), (1, IN), (2, 3, IN), (4, 16, IN), (3, 50, IN), (2, 3, IN)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
       torch.float16: dict(rtol=2e-3, atol=3e-3)}


def make_layer(k, has_bias=True, seed=0):
    """An uncompacted layer whose S has exactly ``k`` nonzero rows (scattered), values O(1) at the output."""
    g = torch.Generator().manual_seed(seed)
    layer = utils.LinearLoSparse(IN, OUT, RANK, has_bias=has_bias)
    S = torch.randn(OUT, IN, generator=g) / IN ** 0.5
    rows = torch.randperm(OUT, generator=g)[:k]
    keep = torch.zeros(OUT, dtype=torch.bool)
    keep[rows] = True
    S[~keep] = 0
    layer.initialize_weight(torch.randn(OUT, RANK, generator=g) / RANK ** 0.5,
                            torch.randn(RANK, IN, generator=g) / IN ** 0.5, S,
                            torch.randn(OUT, generator=g) if has_bias else None)
    return layer


def reference(layer, x):
    """``left(right(x)) + sparse(x) + bias`` of an uncompacted layer, in float64."""
    L, R, S = (w.detach().double() for w in (layer.left.weight, layer.right.weight, layer.sparse.weight))
    y = F.linear(F.linear(x.double(), R), L) + F.linear(x.double(), S)
    return y + layer.bias.detach().double() if layer.has_bias else y


def compacted(layer, dtype=torch.float32):
    c = copy.deepcopy(layer).to(dtype)
    c.prune_sparse()
    return c


def fp16_matmul_on_cpu():
    try:
        F.linear(torch.ones(2, 2, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16,
                                   pytest.param(torch.float16, marks=pytest.mark.skipif(
                                       not fp16_matmul_on_cpu(), reason="no fp16 matmul on this CPU"))])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("k", [0, 7, OUT])
def test_compact_forward_equals_reference(dtype, has_bias, k):
    layer = make_layer(k, has_bias)
    c = compacted(layer, dtype)
    assert c.is_compacted and c.kept_rows == k and c.sparse_weight_pruned.shape == (k, IN)
    ref_layer = copy.deepcopy(layer).to(dtype)  # reference on the same (rounded) weights
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape in SHAPES:  # several shapes in a row: nothing may depend on the previous call
            x = torch.randn(*shape, generator=g).to(dtype)
            y = c(x)
            assert y.shape == (*shape[:-1], OUT) and y.dtype == dtype
            torch.testing.assert_close(y.double(), reference(ref_layer, x), **TOL[dtype])
            if dtype == torch.float32:  # the uncompacted forward too
                torch.testing.assert_close(ref_layer(x).double(), reference(ref_layer, x), **TOL[dtype])


def test_compact_forward_is_not_the_dense_one():
    """The check above can fail: dropping the sparse part or misplacing its rows is caught."""
    layer = make_layer(7)
    c = compacted(layer)
    x = torch.randn(4, 16, IN)
    ref = reference(layer, x)
    with torch.no_grad():
        c.nonzero_idx.copy_(c.nonzero_idx.roll(1))
        assert (c(x).double() - ref).abs().max() > 1e-2


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("k", [0, 7, OUT])
@pytest.mark.parametrize("shape", [(2, 3, IN), (3, 50, IN)])  # rows 6 < r + k <= rows 150
def test_compact_gradients_equal_autograd_reference(has_bias, k, shape):
    layer = make_layer(k, has_bias)
    c = compacted(layer)
    idx = c.nonzero_idx
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g)
    grad_out = torch.randn(*shape[:-1], OUT, generator=g)

    x64 = x.double().requires_grad_()
    ref = copy.deepcopy(layer).double()
    L, R, S = (ref.left.weight, ref.right.weight, ref.sparse.weight)
    y_ref = F.linear(F.linear(x64, R), L) + F.linear(x64, S) + (ref.bias if has_bias else 0)
    y_ref.backward(grad_out.double())

    xc = x.clone().requires_grad_()
    c(xc).backward(grad_out)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.left.weight.grad.double(), L.grad, **close)
    torch.testing.assert_close(c.right.weight.grad.double(), R.grad, **close)
    if k:
        torch.testing.assert_close(c.sparse_weight_pruned.grad.double(), S.grad[idx], **close)
    else:  # an empty S (k = 0) takes no part in the forward, so it gets no gradient
        assert c.sparse_weight_pruned.grad is None
    torch.testing.assert_close(xc.grad.double(), x64.grad, **close)
    if has_bias:
        torch.testing.assert_close(c.bias.grad.double(), ref.bias.grad, **close)


@pytest.mark.parametrize("path", utils.COMPACT_PATHS)
def test_compacted_layer_follows_weight_updates(path):
    """The derived tensors of every inference path follow an optimizer step, in train and in eval."""
    c = compacted(make_layer(7))
    c.compact_path = path
    opt = torch.optim.SGD(c.parameters(), lr=0.5)
    x = torch.randn(3, 50, IN)
    for mode in ("train", "eval"):
        getattr(c, mode)()
        with torch.no_grad():
            before = c(x)
        c(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            after = c(x)
            expected = F.linear(F.linear(x, c.right.weight), c.left.weight, c.bias)
            expected[..., c.nonzero_idx] += F.linear(x, c.sparse_weight_pruned)
        assert (after - before).abs().max() > 1e-3
        # the merged path multiplies by L R + S: a different rounding of the same sum
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, IN), (3, 50, IN)])
def test_autocast_bf16_keeps_dtype(compact, shape):
    layer = make_layer(7)
    m = compacted(layer) if compact else layer
    x = torch.randn(*shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(layer, x), rtol=3e-2, atol=5e-2)
    y.float().sum().backward()  # trains under autocast: fp32 master weights get fp32 gradients
    grads = [m.left.weight.grad, m.right.weight.grad, m.bias.grad,
             m.sparse_weight_pruned.grad if compact else m.sparse.weight.grad]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------- benchmark smoke
BENCH = REPO / "benchmarks"
SMOKE = {
    "bench_inference.py": ["--quick", "--layers", "1", "--vocab-size", "1000", "--batch-sizes", "1", "--seq-len", "8",
                           "--reps", "1", "--warmup", "0", "--stack-tokens", "16"],
    "bench_pruner.py": ["--quick", "--layers", "1", "--vocab-size", "1000", "--batch-size", "1", "--seq-len", "8",
                        "--deltaT", "3", "--reps", "1"],
    "bench_svd.py": ["--quick", "--layers", "1", "--warmup", "0"],
}
KEYS = {
    "env": {"device", "device_name", "torch", "transformers", "date"},
    "inference": {"model", "variant", "ratio", "shape", "dtype", "device", "ms", "tokens_per_s", "params",
                  "speedup_vs_dense", "speedup_vs_original"},
    "export": {"model", "ratio", "predicted_bytes", "actual_bytes", "diff_pct", "reload_max_abs_diff"},
    "stack72": {"variant", "shape", "dtype", "device", "ms", "params", "speedup_vs_dense"},
    "stack_llama": {"variant", "shape", "dtype", "device", "ms", "params", "speedup_vs_dense"},
    "ops": {"model", "variant", "aten_ops", "dense_aten_ops", "cat", "dense_cat", "misaligned_gemms", "paths"},
    "pruner": {"phase", "shape", "dtype", "device"},
    "pruner_ops": {"phase", "aten_ops", "masked_matrices", "ops_per_masked_matrix", "top_ops"},
    "svd": {"spectrum", "method", "matrices", "seconds", "seconds_min", "reps", "extra_error_pct_mean",
            "extra_error_pct_max", "exact_rel_error_by_shape", "randomized_matrices"},
}


def run_bench(script):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, str(BENCH / script), "--threads", "1", *SMOKE[script]], cwd=str(REPO),
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]  # every line is one JSON object
    for rec in lines:
        assert KEYS[rec["what"]] <= set(rec), (rec["what"], KEYS[rec["what"]] - set(rec))
    return lines


def by_what(lines, what):
    return [r for r in lines if r["what"] == what]


def test_bench_inference_smoke():
    lines = run_bench("bench_inference.py")
    inf = by_what(lines, "inference")
    assert sorted(r["variant"] for r in inf) == ["compact", "dense", "original"]
    dense = next(r for r in inf if r["variant"] == "dense")
    compact = next(r for r in inf if r["variant"] == "compact")
    assert compact["params"] < dense["params"] and all(r["ms"] > 0 for r in inf)
    assert compact["paths"] == {"fused": 6}  # the CPU cost model's choice for BERT-base layers at 20 %
    (exp,) = by_what(lines, "export")
    # predicted from the shapes and kept rows; the file adds its JSON header (a few kB)
    assert 0 <= exp["actual_bytes"] - exp["predicted_bytes"] < 20000 and exp["reload_max_abs_diff"] == 0
    assert exp["actual_bytes"] < exp["dense_equivalent_bytes"]
    (ops,) = by_what(lines, "ops")
    assert ops["cat"] == ops["dense_cat"] and ops["misaligned_gemms"] == 0 and ops["compacted_gemms"] == 12
    # fused: per compacted layer two slices and one index_add_ more than an nn.Linear
    assert ops["aten_ops"] == ops["dense_aten_ops"] + 3 * 6
    assert sorted(r["variant"] for r in by_what(lines, "stack72")) == ["compact", "dense", "original"]


def test_bench_pruner_smoke():
    """deltaT 3, one timed window: steps 4 and 5 are window steps, step 6 (the last) masks to the final 10 %."""
    lines = run_bench("bench_pruner.py")
    phases = {r["phase"]: r for r in by_what(lines, "pruner")}
    assert {"train_step_without_pruner", "window_step", "mask_step", "average_step", "state"} == set(phases)
    train = phases["train_step_without_pruner"]
    assert train["steps"] == 3 and math.isfinite(train["ms"]) and train["ms"] > 0
    assert (phases["window_step"]["steps"], phases["mask_step"]["steps"], phases["average_step"]["steps"]) == (2, 1, 3)
    for p in ("window_step", "mask_step", "average_step"):
        r = phases[p]
        assert math.isfinite(r["pruner_ms"]) and r["pruner_ms"] > 0
        assert r["step_with_pruner_ms"] == pytest.approx(train["ms"] + r["pruner_ms"], abs=2e-3)
        assert r["overhead_pct"] == pytest.approx(100 * r["pruner_ms"] / train["ms"], abs=0.01)
    state = phases["state"]
    # 1 DeBERTa layer: q, k, v, attention output (768 x 768), intermediate (3072 x 768), output (768 x 3072)
    rows, entries = 5 * 768 + 3072, 4 * 768 * 768 + 2 * 3072 * 768
    assert (state["masked_matrices"], state["sparse_params"], state["reduced_path"]) == (6, entries, True)
    assert state["pruner_state_bytes"] == 2 * 4 * rows  # per-row fp32 EMA and window mean, nothing full-size
    # the timed mask step reached the final threshold, and masked to it (within one row per matrix)
    assert state["mask_thresholds"] == [0.1] and state["final_threshold"] == 0.1
    assert abs(state["kept_fraction_end"] - 0.1) <= 6 * 3072 / entries
    ops = {r["phase"]: r for r in by_what(lines, "pruner_ops")}
    assert set(ops) == {"window_step", "mask_step"} and (ops["window_step"]["step"], ops["mask_step"]["step"]) == (2, 3)
    for r in ops.values():
        assert r["masked_matrices"] == 6 and r["aten_ops"] >= r["kernels"] >= 6
        assert r["aten_ops"] >= sum(r["top_ops"].values()) > 0
        assert r["ops_per_masked_matrix"] == pytest.approx(r["aten_ops"] / 6, abs=0.01)
        assert r["kernels_per_masked_matrix"] == pytest.approx(r["kernels"] / 6, abs=0.01)
    assert ops["mask_step"]["aten_ops"] > ops["window_step"]["aten_ops"]  # the window update, then the masking


def _powerlaw_truncation_error(n, r):
    """||W - W_r|| / ||W|| for singular values 1/i, i = 1..n: sqrt(sum_{i>r} i^-2 / sum_i i^-2)."""
    tail = sum(1 / i ** 2 for i in range(r + 1, n + 1))
    return math.sqrt(tail / (tail + sum(1 / i ** 2 for i in range(1, r + 1))))


def test_bench_svd_smoke():
    svd = {r["method"]: r for r in by_what(run_bench("bench_svd.py"), "svd")}
    assert set(svd) == {"full", "randomized", "auto"}
    for r in svd.values():
        assert r["matrices"] == 6 and r["reps"] == 1 and r["spectrum"] == "powerlaw"
        assert math.isfinite(r["seconds"]) and r["seconds"] >= r["seconds_min"] > 0
        # the reference error is that of the exact truncated SVD of a 1/i spectrum: ranks 20 (768 x 768, ratio
        # 0.05) and 31 (768 x 3072 and 3072 x 768)
        expected = {"768x768@r20": _powerlaw_truncation_error(768, 20),
                    "3072x768@r31": _powerlaw_truncation_error(768, 31),
                    "768x3072@r31": _powerlaw_truncation_error(768, 31)}
        assert r["exact_rel_error_by_shape"].keys() == expected.keys()
        for k, v in expected.items():
            assert r["exact_rel_error_by_shape"][k] == pytest.approx(v, rel=1e-3), k
    # the exact SVD in fp32 is at the float64 reference (not 0 by construction); randomized within 1 % of it
    assert abs(svd["full"]["extra_error_pct_max"]) < 1e-3 and abs(svd["full"]["extra_error_pct_mean"]) < 1e-3
    assert 0 <= svd["randomized"]["extra_error_pct_max"] < 1
    assert svd["randomized"]["extra_error_pct_max"] >= svd["randomized"]["extra_error_pct_mean"] > 0
    assert (svd["full"]["randomized_matrices"], svd["randomized"]["randomized_matrices"],
            svd["auto"]["randomized_matrices"]) == (0, 6, 6)
