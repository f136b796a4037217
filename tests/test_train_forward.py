"""The training forward of an uncompacted LinearLoSparse (merged weight) and the cost of the pruner's steps.

- ``_MergedLinear`` (``W = addmm(S, L, R)``, one dense GEMM) gives the outputs and the gradients of x, L, R, S and
  the bias of the plain factored formula, in fp32 and under bf16 autocast, 2-D and 3-D, with and without bias.
- The path is chosen by shape (merge when ``rows * (in + out) >= in * out``); small inputs stay factored.
- Activation memory: the bytes autograd saves for backward equal the dense model's (W is rebuilt, not saved).
- aten-op counts (``benchmarks/_opcount.py``; each op is a kernel launch on a GPU): forward + backward of a
  LoSparse BERT against the dense one, and the pruner's window and mask steps per masked matrix.
- ``torch.compile(fullgraph=True)`` traces the layer (autograd.Function included) with the same results.
"""
import argparse
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, build_tiny_model

import losparse.layer
import utils

sys.path.insert(0, str(REPO / "benchmarks"))  # _opcount, bench_train
from _opcount import count_ops, saved_activation_bytes  # noqa: E402


def _reference(layer, x):
    """The factored formula with plain autograd ops (what the layer computed before the merged path)."""
    return F.linear(F.linear(x, layer.right.weight), layer.left.weight, layer.bias) + F.linear(x, layer.sparse.weight)


def _layer(bias, in_f=48, out_f=40, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    utils.substitute_layer_weights(model, ["0"], [], parameter_ratio=0.2)
    layer = model[0]
    with torch.no_grad():  # a trained-looking S: not exactly W - L R
        layer.sparse.weight.mul_(torch.rand_like(layer.sparse.weight) > 0.5)
        if bias:
            layer.bias.normal_()
    return layer


def _run(layer, fn, x, dtype):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        y = fn(x)
    weight = torch.linspace(-1, 1, y.shape[-1])
    (y.float() * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(64, 48), (4, 16, 48)])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_merged_forward_matches_factored_formula(bias, shape, dtype):
    layer = _layer(bias)
    assert losparse.layer.merge_pays(64, 48, 40)
    x = torch.randn(*shape)
    y, gx, g = _run(layer, layer, x, dtype)
    y_ref, gx_ref, g_ref = _run(layer, lambda t: _reference(layer, t), x, dtype)
    assert y.dtype == y_ref.dtype == (dtype or torch.float32)
    assert y.shape == y_ref.shape == (*shape[:-1], 40)
    assert set(g) == set(g_ref) == ({"bias"} if bias else set()) | {"left.weight", "right.weight", "sparse.weight"}
    rtol = 1e-5 if dtype is None else 2e-2  # bf16: both round differently (8 bits of mantissa)

    def close(a, b):
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= rtol * scale, ((a.float() - b.float()).abs().max(), scale)

    close(y, y_ref)
    close(gx, gx_ref)
    for n in g:
        assert g[n].dtype == torch.float32
        close(g[n], g_ref[n])
    if dtype is None:  # the gradient of S is the dense one: gy^T x, the same GEMM
        assert torch.allclose(g["sparse.weight"], g_ref["sparse.weight"], rtol=1e-6, atol=1e-7)


def test_path_is_chosen_by_rows():
    assert losparse.layer.merge_pays(384, 768, 768) and not losparse.layer.merge_pays(383, 768, 768)
    assert losparse.layer.merge_pays(615, 768, 3072) and not losparse.layer.merge_pays(614, 768, 3072)  # 768*3072/3840 = 614.4
    layer = _layer(True)
    # below the boundary (48*40/88 = 21.8 rows) the layer runs the factored formula exactly
    x = torch.randn(2, 10, 48)
    y, gx, g = _run(layer, layer, x, None)
    y_ref, gx_ref, g_ref = _run(layer, lambda t: _reference(layer, t), x, None)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert all(torch.equal(g[n], g_ref[n]) for n in g)
    ops = count_ops(lambda: layer(torch.randn(2, 10, 48))).counts
    assert ops["addmm"] == 1 and ops["mm"] == 2  # x R^T, then H L^T + b, then x S^T
    ops = count_ops(lambda: layer(torch.randn(2, 11, 48))).counts
    assert ops["addmm"] == 2 and ops["mm"] == 0  # W = S + L R, then x W^T + b


def test_frozen_parameters_get_no_gradient():
    layer = _layer(True)
    layer.left.weight.requires_grad_(False)
    layer.sparse.weight.requires_grad_(False)
    x = torch.randn(64, 48, requires_grad=True)
    layer(x).sum().backward()
    assert layer.left.weight.grad is None and layer.sparse.weight.grad is None
    assert layer.right.weight.grad is not None and layer.bias.grad is not None and x.grad is not None
    ref = _layer(True)
    _reference(ref, x.detach()).sum().backward()
    assert torch.allclose(layer.right.weight.grad, ref.right.weight.grad, rtol=1e-5, atol=1e-6)


def _saved_activation_bytes(model, batch):
    return saved_activation_bytes(lambda: model(**batch).loss.backward(), model.parameters())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_activation_memory_equals_dense(dtype):
    dense = build_tiny_model("bert").train()
    for m in dense.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    compressed = copy.deepcopy(dense)
    utils.substitute_layer_weights(compressed, ["query", "key", "value", "dense"], ["pooler", "classifier"],
                                   parameter_ratio=0.2)
    batch = {"input_ids": torch.randint(5, 60, (4, 24)), "labels": torch.tensor([0, 1, 0, 1])}
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        got = _saved_activation_bytes(compressed, batch)
        want = _saved_activation_bytes(dense, batch)
        factored = losparse.layer.merge_pays
        try:  # the factored formula saves the low-rank activations x R^T as well
            losparse.layer.merge_pays = lambda *a: False
            before = _saved_activation_bytes(compressed, batch)
        finally:
            losparse.layer.merge_pays = factored
    assert got == want
    assert before > got


def _bert_ops(batch, seq, ratio=0.05):
    dense = build_tiny_model("bert").train()
    compressed = copy.deepcopy(dense)
    utils.substitute_layer_weights(compressed, ["query", "key", "value", "dense"], ["pooler", "classifier"],
                                   parameter_ratio=ratio)
    inputs = {"input_ids": torch.randint(5, 60, (batch, seq)), "labels": torch.zeros(batch, dtype=torch.long)}

    def step(model):
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    return count_ops(lambda: step(dense)), count_ops(lambda: step(compressed))


def test_training_step_op_count_close_to_dense():
    # 12 LoSparse layers of 32 x 32 / 32 x 64 at 96 rows: merged. Every layer adds 2 GEMMs forward+backward
    # for W (built, rebuilt) and 2 for the gradients of L and R: 4 ops, nothing else.
    dense, compressed = _bert_ops(4, 24)
    extra = {k: compressed.counts[k] - dense.counts.get(k, 0) for k in compressed.counts}
    assert extra["addmm"] == 2 * 12 and extra["mm"] == 2 * 12
    assert compressed.total <= 1.3 * dense.total, (compressed.total, dense.total)
    for k in ("as_strided", "new_zeros", "clone", "copy_"):  # no copies from adding in place into a view
        assert compressed.counts[k] == dense.counts[k], k


def _pruner_ops(method="mean", direction="row"):
    model = build_tiny_model("bert", seed=1)
    utils.substitute_layer_weights(model, ["query", "key", "value", "dense"], ["pooler", "classifier"],
                                   parameter_ratio=0.2)
    args = utils.add_losparse_args(argparse.ArgumentParser()).parse_args(
        ["--deltaT", "5", "--initial_warmup", "0", "--final_warmup", "0", "--warmup_steps", "1"])
    pruner = utils.Pruner(model, args, total_step=100, structured_method=method, structured_direction=direction)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    pruner.update_and_pruning(model, 1)  # lays out the statistics
    n = len(pruner._masked_params(model))
    return n, count_ops(lambda: pruner.update_and_pruning(model, 3)), count_ops(
        lambda: pruner.update_and_pruning(model, 5)), count_ops(lambda: pruner.update_and_pruning(model, 10))


def test_pruner_window_step_costs_two_ops_per_matrix():
    n, window, first_mask, mask = _pruner_ops()
    assert n == 12
    assert window.counts["linalg_vector_norm"] == n  # S*G and its row L1 norm: one mul, one norm per matrix
    assert n <= window.counts["mul"] <= n + 3
    assert window.total <= 2 * n + 16, dict(window.counts)  # + a constant for all matrices (EMA, guard)
    # a mask step: one masked_fill_ per matrix on top of the update, and a constant for the threshold
    assert mask.counts["masked_fill_"] == n
    assert mask.total <= 3 * n + 32, dict(mask.counts)
    assert first_mask.total <= 4 * n + 32  # the first also builds the multiplicity weights
    n, window, _, mask = _pruner_ops("max", "col")  # element-wise statistics: one abs per matrix instead
    assert n <= window.counts["abs"] <= n + 1 and window.total <= 2 * n + 16, dict(window.counts)


def test_compile_fullgraph_same_results():
    torch._dynamo.reset()
    layer = _layer(True)
    x = torch.randn(4, 16, 48)
    y, gx, g = _run(layer, layer, x, None)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_c, gx_c, g_c = _run(layer, compiled, x, None)
    assert torch.allclose(y_c, y, rtol=1e-6, atol=1e-6) and torch.allclose(gx_c, gx, rtol=1e-6, atol=1e-6)
    assert all(torch.allclose(g_c[n], g[n], rtol=1e-6, atol=1e-6) for n in g)
    y_b, _, _ = _run(layer, compiled, x, torch.bfloat16)
    assert y_b.dtype == torch.bfloat16 and (y_b.float() - y).abs().max() <= 2e-2 * y.abs().max()


def test_bench_train_smoke(capsys):
    """benchmarks/bench_train.py on a 1-layer BERT-base: the figures it prints are the ones measured here."""
    import json

    import bench_train

    bench_train.main(["--models", "bert", "--layers", "1", "--batch-size", "4", "--seq-len", "160", "--vocab-size",
                      "1000", "--warmup", "0", "--reps", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["what"] == "env"
    steps = {r["variant"]: r for r in rows if r["what"] == "train_step"}
    assert list(steps) == list(bench_train.VARIANTS)
    dense, old, new = steps["dense"], steps["losparse_factored"], steps["losparse"]
    assert all(r["ms"] > 0 and r["ops_fwd_bwd"] > 0 for r in steps.values())
    # 6 LoSparse matrices at 640 rows (>= 614 for 768 x 3072): merged, 4 GEMMs (+ a saved-tensor detach) each
    assert 4 * 6 <= new["ops_fwd_bwd"] - dense["ops_fwd_bwd"] <= 5 * 6
    assert old["ops_fwd_bwd"] > new["ops_fwd_bwd"] + 6 * 10
    assert new["saved_activation_bytes"] == dense["saved_activation_bytes"] < old["saved_activation_bytes"]
    assert steps["losparse_window_step"]["masked_matrices"] == 6
    assert steps["losparse_window_step"]["pruner_ops_per_matrix"] <= 2 + 16 / 6
    assert steps["losparse_mask_step"]["pruner_ops"] > steps["losparse_window_step"]["pruner_ops"]
