"""LinearLoSparse is correct wherever a model goes (issue 19): one regression test per defect, plus float64
``gradcheck`` / ``gradgradcheck`` of every forward path (merged and factored training, compacted training in the
row and column forms, compacted inference with frozen weights), with and without bias, 2-D and 3-D input.

Tiny layers (5 x 7, 64 x 64 at most): the whole file runs in seconds.
"""
import argparse
import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import losparse.forms
import losparse.layer
import utils
from conftest import build_tiny_model

IN, OUT, RANK = 7, 5, 2  # merged training forward from 3 rows on (rows * 12 >= 35)
PATHS = utils.COMPACT_PATHS


def _layer(in_f=IN, out_f=OUT, rank=RANK, bias=True, dtype=torch.float32, seed=0, keep_rows=None, keep_cols=None):
    """A LoSparse layer with random L, R, S (and bias); S keeps only ``keep_rows`` rows / ``keep_cols`` columns."""
    g = torch.Generator().manual_seed(seed)
    layer = utils.LinearLoSparse(in_f, out_f, rank, has_bias=bias)
    S = torch.randn(out_f, in_f, generator=g)
    if keep_rows is not None:
        S[[i for i in range(out_f) if i not in keep_rows]] = 0
    if keep_cols is not None:
        S[:, [j for j in range(in_f) if j not in keep_cols]] = 0
    layer.initialize_weight(torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g), S,
                            torch.randn(out_f, generator=g) if bias else None)
    return layer.to(dtype)


@torch.no_grad()
def _dense(layer):
    """``L R + S`` and the bias, from any form of the layer, in float64."""
    return layer.merged_weight().double(), None if layer.bias is None else layer.bias.detach().double()


def _reference(layer, x):
    w, b = _dense(layer)
    return F.linear(x.detach().double(), w, b)


def _compacted(form, bias=True, dtype=torch.float64, seed=0):
    """A compacted layer in the row form (2 of 5 rows kept) or the column form (2 of 7 columns kept)."""
    if form == "rows":
        layer = _layer(bias=bias, dtype=dtype, seed=seed, keep_rows=[1, 3])
    else:
        layer = _layer(bias=bias, dtype=dtype, seed=seed, keep_cols=[0, 4])
    layer.prune_sparse()
    assert (layer.sparse_weight_pruned is not None) == (form == "rows")
    return layer


# -------------------------------------------------------------------------- 1. autocast like nn.Linear
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [8, 1])  # merged, factored
def test_training_forward_casts_as_nn_linear_does(param_dtype, x_dtype, autocast, rows):
    """bf16 weights fed fp32 under autocast crashed (``mat1 and mat2 must have the same dtype``)."""
    layer = _layer(dtype=param_dtype)
    linear = nn.Linear(IN, OUT).to(param_dtype)
    with torch.no_grad():
        linear.weight.copy_(layer.merged_weight())
        linear.bias.copy_(layer.bias)
    x = torch.randn(rows, IN).to(x_dtype).requires_grad_()
    results = []
    for module in (linear, layer):
        try:
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                y = module(x)
            y.float().sum().backward()
            results.append((y.detach(), x.grad))
            x.grad = None
        except RuntimeError as e:
            results.append(type(e))
    if not isinstance(results[0], tuple):  # nn.Linear refuses it (no autocast, mixed dtypes): so does LoSparse
        assert results[1] is results[0]
        return
    (y_ref, gx_ref), (y, gx) = results
    assert y.dtype == y_ref.dtype and gx.dtype == gx_ref.dtype == x_dtype
    tol = 1e-5 if y.dtype == torch.float32 else 3e-2
    scale = y_ref.float().abs().max()
    assert (y.float() - y_ref.float()).abs().max() <= tol * scale
    assert (gx.float() - gx_ref.float()).abs().max() <= tol * gx_ref.float().abs().max()


# -------------------------------------------------------------------------- 2. stale compacted cache
@pytest.mark.parametrize("path", PATHS)
def test_replaced_parameter_on_the_old_storage_is_not_taken_for_the_old_one(path):
    """A new parameter at the freed address with version 0 left the cache stale (the key was the address)."""
    layer = _compacted("rows", dtype=torch.float32).eval()
    layer.compact_path = path
    x = torch.randn(3, IN)
    with torch.no_grad():
        layer(x)
        old = layer.right.weight
        new = nn.Parameter(old.detach())  # same storage, same (zero) version, another tensor
        new.data.mul_(3)  # not versioned
        assert new.data_ptr() == old.data_ptr() and new._version == old._version == 0
        layer.right.weight = new
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["rows", "cols"])
def test_refresh_after_a_data_edit_and_without_cache(form):
    """``.data`` edits bump no version: ``refresh()`` (per layer or ``utils.refresh(model)``) makes them seen, and
    ``cache_derived = False`` (set by ``apply_fsdp2``) derives on every call."""
    model = nn.Sequential(_compacted(form, dtype=torch.float32)).eval()
    layer = model[0]
    x = torch.randn(4, IN)
    with torch.no_grad():
        layer(x)
        layer.left.weight.data.mul_(2)
        assert (layer(x).double() - _reference(layer, x)).abs().max() > 1e-2  # what refresh() is for
        layer.refresh()
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
        layer.right.weight.data.mul_(-1)
        assert utils.refresh(model) == 1
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
        layer.cache_derived = False  # FSDP2: re-gathered into the same storage, versions preserved
        with torch.autograd._unsafe_preserve_version_counter(layer.left.weight):
            layer.left.weight.mul_(0.5)
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
        assert not layer.fast_path.tensors  # nothing cached


# -------------------------------------------------------------------------- 3. inference_mode
@pytest.mark.parametrize("form", ["rows", "cols"])
def test_layer_built_and_compacted_under_inference_mode(form):
    with torch.inference_mode():
        layer = _compacted(form, dtype=torch.float32).eval()
        x = torch.randn(2, 3, IN)
        inside = layer(x)
    for path in PATHS:
        layer.compact_path = path
        with torch.inference_mode():
            y = layer(x)
        torch.testing.assert_close(y.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)  # grad mode: inference weights need none
    torch.testing.assert_close(inside, y, rtol=1e-5, atol=1e-5)


def test_load_compact_under_inference_mode(tmp_path):
    model = build_tiny_model("bert", "seq_cls").eval()
    utils.substitute_layer_weights(model, ["query", "value", "dense"], ["pooler", "classifier", "embeddings"],
                                   parameter_ratio=0.1)
    for m in model.modules():
        if isinstance(m, utils.LinearLoSparse):
            with torch.no_grad():
                m.sparse.weight[::2] = 0
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    utils.export_compact(model, tmp_path / "c")
    with torch.inference_mode():
        loaded = utils.load_compact(tmp_path / "c")
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        utils.prune(model)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- 4. frozen S and the Pruner
def _pruner_args(**kw):
    base = dict(beta1=0.85, beta2=1.0, deltaT=2, initial_threshold=1.0, final_threshold=0.5, initial_warmup=1,
                final_warmup=1, warmup_steps=1)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("pruner_name", ["PLATON", "Magnitude"])
def test_frozen_sparse_matrix_is_left_out_of_the_budget(pruner_name, caplog):
    """One frozen S scored zero, made the k-th score 0, and stopped all pruning."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    utils.substitute_layer_weights(model, ["0", "1", "2"], [], parameter_ratio=0.3)
    model[1].sparse.weight.requires_grad_(False)
    frozen = model[1].sparse.weight.detach().clone()
    pruner = utils.Pruner(model, _pruner_args(), total_step=10, pruner_name=pruner_name)
    g = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.INFO, logger="losparse"):
        for step in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None
            pruner.update_ipt_with_local_window(model, step)
            pruner.mask_with_threshold(model, 0.5)
    assert torch.equal(model[1].sparse.weight, frozen)  # untouched
    kept = [int((m.sparse.weight != 0).any(dim=1).sum()) for m in (model[0], model[2])]
    assert 8 <= sum(kept) <= 9  # half of the 16 rows of the trainable matrices (within one row)
    assert sum("1.sparse.weight" in r.getMessage() and "frozen" in r.getMessage() for r in caplog.records) == 1


# -------------------------------------------------------------------------- 5. column compaction
def test_column_pruned_layer_compacts_its_columns_and_reports_honestly(tmp_path):
    """64 x 64 with 8 kept columns: 4,416 stored parameters (every row) and a 106 % report before."""
    model = nn.Sequential(nn.Linear(64, 64))
    utils.substitute_layer_weights(model, ["0"], [], parameter_ratio=0.05)  # r = 2: 256 low-rank parameters
    layer = model[0]
    with torch.no_grad():
        layer.sparse.weight[:, 8:] = 0
    low = layer.reduced_rank * 128
    rep = utils.compression_report(model)
    assert rep.layers[0]["sparse_form"] == "cols" and rep.layers[0]["kept"] == 8
    assert rep.sparse_params == 8 * 64 and rep.effective_ratio == pytest.approx((low + 512) / 4096)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref = model(x)
    utils.prune(model)
    assert layer.sparse_weight_pruned is None and layer.sparse_weight_pruned_cols.shape == (64, 8)
    assert layer.num_parameters() == low + 512 + 64
    assert sum(p.numel() for p in layer.parameters()) == low + 512 + 64
    assert set(layer.state_dict()) == {"left.weight", "right.weight", "bias", "sparse_weight_pruned_cols",
                                       "nonzero_col_idx"}
    assert utils.compression_report(model).effective_ratio == pytest.approx((low + 512) / 4096)
    assert "sparse_cols=8/64" in repr(layer)
    with torch.no_grad():
        for path in PATHS:
            layer.compact_path = path
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    out = utils.export_compact(model, tmp_path / "c")
    meta = json.loads((out / "losparse_config.json").read_text())
    assert meta["layers"]["0"]["form"] == "losparse_cols" and meta["layers"]["0"]["kept_cols"] == 8
    from safetensors.torch import load_file
    assert set(load_file(str(out / utils.COMPACT_WEIGHTS))) == {"0.left.weight", "0.right.weight", "0.bias",
                                                              "0.sparse_weight_pruned_cols", "0.nonzero_col_idx"}
    twin = nn.Sequential(nn.Linear(64, 64))
    utils.load_checkpoint(twin, model.state_dict())
    assert twin[0].sparse_weight_pruned_cols.shape == (64, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), ref, rtol=1e-5, atol=1e-5)


def test_unstructured_sparse_is_reported_and_exported_as_what_pays(tmp_path, caplog):
    model = nn.Sequential(nn.Linear(16, 16))
    utils.substitute_layer_weights(model, ["0"], [], parameter_ratio=0.25)
    with torch.no_grad():  # half the entries, no zero row nor column
        i = torch.arange(16)
        model[0].sparse.weight.mul_(((i[:, None] + i[None, :]) % 2 == 0).float())
    low = model[0].reduced_rank * 32
    for _ in range(2):  # before and after prune: L, R and every row (nothing to gain), not less
        rep = utils.compression_report(model)
        assert rep.effective_ratio == pytest.approx((low + 256) / 256) and rep.sparse_params == 256
        assert rep.model_params == 256 + 16  # what export_compact stores: the dense matrix and the bias
        with caplog.at_level(logging.WARNING, logger="losparse"):
            utils.prune(model)
    assert sum("unstructured" in r.getMessage() for r in caplog.records) == 1  # the second prune: nothing to do
    meta = json.loads((utils.export_compact(model, tmp_path / "c") / "losparse_config.json").read_text())
    assert meta["layers"]["0"]["form"] == "dense"


def test_row_col_pruning_run_compacts_both_forms_with_equal_outputs(tmp_path):
    """``--structured_direction row_col``: query/key/value rows, the other matrices columns."""
    model = build_tiny_model("bert", "seq_cls", seed=2).eval()
    utils.substitute_layer_weights(model, ["query", "key", "value", "dense"], ["pooler", "classifier", "embeddings"],
                                   parameter_ratio=0.1)
    pruner = utils.Pruner(model, _pruner_args(), total_step=10, structured_direction="row_col")
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        pruner.update_ipt_with_local_window(model, step)
    pruner.mask_with_threshold(model, 0.3)
    ids = torch.randint(5, 60, (2, 9), generator=g)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = utils.compression_report(model).effective_ratio
    utils.prune(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, utils.LinearLoSparse)}
    forms = {n: "rows" if m.sparse_weight_pruned is not None else "cols" for n, m in layers.items()}
    assert {f for n, f in forms.items() if n.endswith(("query", "key", "value"))} == {"rows"}
    assert {f for n, f in forms.items() if not n.endswith(("query", "key", "value"))} == {"cols"}
    rep = utils.compression_report(model)
    assert rep.effective_ratio == pytest.approx(before) and rep.effective_ratio < 0.5
    assert rep.model_params == sum(p.numel() for p in model.parameters())  # what is stored is what is there
    for path in (None,) + PATHS:
        for m in layers.values():
            m.compact_path = path
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    utils.export_compact(model, tmp_path / "c")
    loaded = utils.load_compact(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# -------------------------------------------------------------------------- 6. timed choice (opt-in)
def test_default_choice_is_the_cost_model_and_timing_is_opt_in(monkeypatch):
    def never(*a, **k):
        raise AssertionError("timed by default")

    monkeypatch.setattr(losparse.forms, "time_forms", never)
    layer = _compacted("rows", dtype=torch.float32).eval()
    assert layer.path_choice == "cost"
    with torch.no_grad():
        layer(torch.randn(4, IN))
    c = losparse.forms.path_costs(IN, OUT, RANK, 2, 4, 4, "cpu")
    assert layer.last_path == min(c, key=c.get)
    with pytest.raises(ValueError, match="path_choice='fast'.*'cost', 'timed'"):
        layer.path_choice = "fast"


def test_timed_choice_per_shape_class_keeps_only_the_chosen_form(monkeypatch):
    calls = []

    def fake_times(layer, x2, candidates, reps=3):
        calls.append(candidates)
        for p in candidates:  # what real timing does: each form's tensors get built
            layer.fast_path.derived(layer, p)
        return {p: (1.0 if p == "transposed" else 5.0) for p in candidates}

    monkeypatch.setattr(losparse.forms, "time_forms", fake_times)
    a = _layer(in_f=40, out_f=48, rank=5, keep_rows=list(range(0, 48, 4)), seed=1)  # k = 12
    b = _layer(in_f=40, out_f=48, rank=6, keep_rows=list(range(0, 48, 5)), seed=2)  # k = 10: same class
    utils.prune(nn.Sequential(a, b))  # the layers of one model share one memo of timed choices
    for m in (a, b):
        m.eval().path_choice = "timed"
    x = torch.randn(6, 40)
    with torch.no_grad():
        a(x)
        b(x)
    assert len(calls) == 1 and a.last_path == b.last_path == "transposed"
    assert set(a.fast_path.tensors) == {"transposed"}  # the timed, unchosen forms are freed
    torch.testing.assert_close(a(x).double(), _reference(a, x), rtol=1e-5, atol=1e-5)
    c = _layer(in_f=40, out_f=48, rank=5, keep_rows=list(range(0, 48, 4)), seed=3)
    utils.prune(nn.Sequential(c))  # another model: a memo of its own (no process-wide state)
    c.eval().path_choice = "timed"
    with torch.no_grad():
        c(x)
    assert len(calls) == 2 and c.fast_path.timings is not a.fast_path.timings and a.fast_path.timings is b.fast_path.timings


def test_timed_choice_takes_rank_0s_decision(monkeypatch):
    """On rank 1 nothing is timed; the broadcast index (rank 0's choice) is used."""
    monkeypatch.setattr(losparse.forms, "time_forms", lambda *a, **k: pytest.fail("rank 1 timed"))
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    sent = []

    def broadcast(t, src, group=None):
        sent.append(int(t.item()))
        t.fill_(utils.COMPACT_PATHS.index("onehot"))

    monkeypatch.setattr(dist, "broadcast", broadcast)
    layer = _compacted("cols", dtype=torch.float32).eval()
    layer.path_choice = "timed"
    with torch.no_grad():
        y = layer(torch.randn(3, IN))
    assert sent == [0] and layer.last_path == "onehot"
    assert y.shape == (3, OUT)


# -------------------------------------------------------------------------- 7. prefer / compact_path
def test_setting_prefer_or_compact_path_takes_effect():
    layer = _layer(in_f=40, out_f=40, rank=4).eval()  # every row kept: speed takes the merged weight
    layer.prune_sparse()
    x = torch.randn(64, 40)
    with torch.no_grad():
        layer(x)
        assert layer.last_path == "merged" and "merged" in layer.fast_path.tensors
        layer.prefer = "memory"  # no other call needed
        layer(x)
        assert layer.last_path != "merged" and "merged" not in layer.fast_path.tensors
        layer.compact_path = "onehot"
        layer(x)
        assert layer.last_path == "onehot" and set(layer.fast_path.tensors) == {"onehot"}
        layer.compact_path = None
        layer.prefer = "speed"
        layer(x)
        assert layer.last_path == "merged"
    with pytest.raises(ValueError, match="prefer='fast'"):
        layer.prefer = "fast"


# -------------------------------------------------------------------------- 8. repr never communicates
def test_repr_of_a_sharded_layer_does_not_count_rows(monkeypatch):
    layer = _layer()
    monkeypatch.setattr(losparse.layer, "is_sharded", lambda t: t is layer.sparse.weight)
    assert "sparse_rows=sharded" in repr(nn.Sequential(layer))  # kept_rows would all-gather here


# -------------------------------------------------------------------------- 9. saved tensors
def _saved_bytes(fn, params):
    """Bytes autograd saves for backward, parameters (and their views) not counted."""
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    total = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


@pytest.mark.parametrize("case", ["frozen_weights", "x_no_grad_autocast", "all"])
def test_merged_forward_saves_what_nn_linear_saves(case):
    layer, linear = _layer(in_f=64, out_f=48, rank=4), nn.Linear(64, 48)
    x = torch.randn(32, 64, requires_grad=case != "x_no_grad_autocast")
    if case == "frozen_weights":
        layer.requires_grad_(False)
        linear.requires_grad_(False)
    amp = case == "x_no_grad_autocast"
    got, want = [], []
    for module, out in ((layer, got), (linear, want)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out.append(_saved_bytes(lambda: module(x), list(module.parameters())))
    assert got == want, (got, want)
    assert got[0] == {"frozen_weights": 0, "x_no_grad_autocast": 32 * 64 * 2, "all": 32 * 64 * 4}[case]


# -------------------------------------------------------------------------- 10 and every path: gradcheck
def _check(layer, x, names, double_backward=True):
    """gradcheck (and gradgradcheck) of the layer's output with respect to x and the parameters ``names``."""
    params = dict(layer.named_parameters())
    inputs = (x,) + tuple(params[n].detach().clone().requires_grad_() for n in names)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    if double_backward:
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


SHAPES = {"merged": [(4, IN), (2, 3, IN)], "factored": [(2, IN), (1, 2, IN)]}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["merged", "factored"])
def test_gradcheck_uncompacted_training(kind, bias):
    """float64: the bias gradient was summed in fp32 (error 5e-4, gradgradcheck failed)."""
    layer = _layer(bias=bias, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    for shape in SHAPES[kind]:
        assert losparse.layer.merge_pays(int(torch.tensor(shape[:-1]).prod()), IN, OUT) == (kind == "merged")
        _check(layer, torch.randn(*shape, dtype=torch.float64, requires_grad=True), names)
    if bias:  # the bias gradient is exact in float64
        layer.zero_grad()
        x = torch.randn(40, IN, dtype=torch.float64)
        g = torch.randn(40, OUT, dtype=torch.float64) * 1e3
        layer(x).backward(g)
        assert torch.equal(layer.bias.grad, g.sum(0))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", ["rows", "cols"])
def test_gradcheck_compacted_training_and_frozen_inference(form, bias):
    layer = _compacted(form, bias=bias)
    names = [n for n, _ in layer.named_parameters()]
    for shape in [(1, IN), (6, IN), (2, 3, IN)]:  # x [R; S]^T as one GEMM from r + k = 4 rows on
        _check(layer, torch.randn(*shape, dtype=torch.float64, requires_grad=True), names)
    layer.requires_grad_(False)  # frozen weights: the cached inference forms, under autograd for x
    for path in PATHS:
        layer.compact_path = path
        for shape in [(3, IN), (2, 2, IN)]:
            x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
            _check(layer, x, [])
            assert layer.last_path == path
