"""Compacted inference paths of LinearLoSparse: outputs, derived-tensor cache, path choice, aten ops, compile.

Every path of ``utils.COMPACT_PATHS`` is checked against ``left(right(x)) + sparse(x) + bias`` in float64; the
cached derived tensors against staleness (optimizer steps, in-place edits, ``.to()``, ``load_state_dict``,
``deepcopy``); GEMM shapes and op counts with a ``TorchDispatchMode`` on a tiny BERT; ``torch.compile``
(fullgraph) against eager.
"""
import collections
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import losparse.forms
import utils  # noqa: E402
from conftest import build_tiny_model  # noqa: E402

IN, OUT, RANK = 44, 40, 5  # r and k are not multiples of 8: the derived tensors are padded
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=4e-2),
       torch.float64: dict(rtol=1e-10, atol=1e-10)}
PATHS = utils.COMPACT_PATHS


def make_layer(k, has_bias=True, seed=0, in_f=IN, out_f=OUT, rank=RANK):
    """A compacted layer whose S kept ``k`` scattered rows, values O(1) at the output."""
    g = torch.Generator().manual_seed(seed)
    layer = utils.LinearLoSparse(in_f, out_f, rank, has_bias=has_bias)
    S = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    keep = torch.zeros(out_f, dtype=torch.bool)
    keep[torch.randperm(out_f, generator=g)[:k]] = True
    S[~keep] = 0
    layer.initialize_weight(torch.randn(out_f, rank, generator=g) / rank ** 0.5,
                            torch.randn(rank, in_f, generator=g) / in_f ** 0.5, S,
                            torch.randn(out_f, generator=g) if has_bias else None)
    layer.prune_sparse()
    assert layer.kept_rows == k
    return layer


def reference(layer, x):
    """``x (L R)^T + x S^T + b`` from the compacted layer's parameters, in float64."""
    L, R = layer.left.weight.detach().double(), layer.right.weight.detach().double()
    S = torch.zeros(layer.out_feature, layer.in_feature, dtype=torch.float64)
    S[layer.nonzero_idx] = layer.sparse_weight_pruned.detach().double()
    y = F.linear(F.linear(x.double(), R), L) + F.linear(x.double(), S)
    return y + layer.bias.detach().double() if layer.has_bias else y


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("k", [0, 7, OUT])
def test_every_path_equals_reference(path, dtype, has_bias, k):
    layer = make_layer(k, has_bias).to(dtype).eval()
    layer.compact_path = path
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape in [(IN,), (1, IN), (2, 3, IN), (3, 50, IN), (5, IN)]:
            x = torch.randn(*shape, generator=g).to(dtype)
            y = layer(x)
            assert layer.last_path == path
            assert y.shape == (*shape[:-1], OUT) and y.dtype == dtype and y.is_contiguous()
            torch.testing.assert_close(y.double(), reference(layer, x), **TOL[dtype])


def test_a_wrong_path_is_caught():
    """The reference check can fail: misplaced rows or a dropped sparse part change the output."""
    layer = make_layer(7).eval()
    x = torch.randn(3, 50, IN)
    with torch.no_grad():
        for path in PATHS:
            layer.compact_path = path
            ref = reference(layer, x)
            layer.nonzero_idx.copy_(layer.nonzero_idx.roll(1))  # in place: the cache must notice
            assert (layer(x).double() - ref).abs().max() > 1e-2, path
            layer.nonzero_idx.copy_(layer.nonzero_idx.roll(-1))
            torch.testing.assert_close(layer(x).double(), ref, **TOL[torch.float32])


def test_derived_tensors_are_padded_to_multiples_of_8():
    layer = make_layer(7).eval()  # r = 5 -> 8, k = 7 -> 8
    for path in ("fused", "transposed", "onehot"):
        d = losparse.forms.derive(layer, path)
        rs = d["rs"] if path == "transposed" else d["rs_t"].t()
        assert rs.shape == (16, IN) and d["r8"] == 8 and d["k"] == 7
        torch.testing.assert_close(rs[:5], layer.right.weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(rs[8:15], layer.sparse_weight_pruned.detach(), rtol=0, atol=0)
        assert not rs[5:8].any() and not rs[15:].any()
    d = losparse.forms.derive(layer, "fused")
    assert d["l_t"].shape == (8, OUT) and not d["l_t"][5:].any()
    onehot = losparse.forms.derive(layer, "onehot")["lp_t"].t()[:, 8:]
    assert onehot.shape == (OUT, 8) and onehot.sum() == 7
    assert (onehot[layer.nonzero_idx, torch.arange(7)] == 1).all()
    merged = losparse.forms.derive(layer, "merged")["w"]
    torch.testing.assert_close(merged, layer.merged_weight(), rtol=0, atol=0)


def test_derived_tensors_are_built_once_and_are_not_state():
    layer = make_layer(7).eval()
    layer.compact_path = "fused"
    keys = set(layer.state_dict())
    x = torch.randn(4, IN)
    with torch.no_grad():
        layer(x)
        first = layer.fast_path.tensors["fused"]["rs_t"]
        layer(x)
        assert layer.fast_path.tensors["fused"]["rs_t"] is first  # reused, not rebuilt
    assert set(layer.state_dict()) == keys == {"left.weight", "right.weight", "bias", "sparse_weight_pruned",
                                                "nonzero_idx"}
    assert not any(b is first for b in layer.buffers())


@pytest.mark.parametrize("path", PATHS)
def test_cache_follows_to_load_state_dict_and_deepcopy(path):
    layer = make_layer(7).eval()
    layer.compact_path = path
    x = torch.randn(2, 8, IN)
    with torch.no_grad():
        layer(x)
        layer.double()  # .to(): the next call derives float64 tensors
        y = layer(x.double())
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, reference(layer, x), **TOL[torch.float64])
        layer.float()
        other = make_layer(7, seed=5)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x).double(), reference(other, x), **TOL[torch.float32])
        twin = copy.deepcopy(layer)
        twin.left.weight.mul_(2)
        torch.testing.assert_close(twin(x).double(), reference(twin, x), **TOL[torch.float32])
        torch.testing.assert_close(layer(x).double(), reference(other, x), **TOL[torch.float32])
        layer.right.weight = nn.Parameter(torch.randn(RANK, IN))  # replaced, not modified in place
        torch.testing.assert_close(layer(x).double(), reference(layer, x), **TOL[torch.float32])


def test_frozen_weights_use_the_cache_and_still_give_input_gradients():
    layer = make_layer(7).eval()
    layer.compact_path = "fused"
    layer.requires_grad_(False)
    x = torch.randn(3, 50, IN, requires_grad=True)
    y = layer(x)
    assert layer.last_path == "fused"  # no weight needs a gradient: the inference path, under autograd
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    reference(layer, x64).backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_training_takes_the_autograd_path():
    layer = make_layer(7).train()
    layer.last_path = None
    layer(torch.randn(4, IN)).sum().backward()
    assert layer.last_path is None and layer.sparse_weight_pruned.grad is not None
    assert not layer.fast_path.tensors  # nothing derived


# -------------------------------------------------------------------------------------- path choice
def test_cost_model_is_deterministic_and_picks_the_compact_form_on_cpu():
    # BERT-base at 20 %: low-rank 0.05 (r 19-31) plus 15 % of the rows of S
    for in_f, out_f, r, k in [(768, 768, 20, 115), (768, 3072, 31, 461), (3072, 768, 31, 115)]:
        for n in (1, 128, 1024, 4096):
            c = losparse.forms.path_costs(in_f, out_f, r, k, n, 4, "cpu")
            assert c == losparse.forms.path_costs(in_f, out_f, r, k, n, 4, "cpu")
            assert min(c, key=c.get) == "fused" and c["fused"] < c["merged"] / 2
    # every row of S kept: the compact form costs more than dense, so speed takes the merged weight
    c = losparse.forms.path_costs(768, 768, 20, 768, 1024, 4, "cpu")
    assert min(c, key=c.get) == "merged"


def test_prefer_memory_never_builds_the_dense_weight():
    with pytest.raises(ValueError, match="prefer='fast'.*'speed', 'memory'"):
        utils.prune(nn.Sequential(), prefer="fast")
    bad = make_layer(3).eval()
    with pytest.raises(ValueError, match="compact_path='dense'.*'fused'"):  # when set, before any call
        bad.compact_path = "dense"
    dense_rows = make_layer(OUT).eval()  # all rows kept: "speed" takes the merged weight
    with torch.no_grad():
        x = torch.randn(64, IN)
        dense_rows(x)
        assert dense_rows.last_path == "merged"
        dense_rows.prefer = "memory"
        dense_rows(x)
        assert dense_rows.last_path != "merged" and "merged" not in dense_rows.fast_path.tensors
        torch.testing.assert_close(dense_rows(x).double(), reference(dense_rows, x), **TOL[torch.float32])


def test_compression_report_lists_the_path():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, IN))
    model[0] = make_layer(7)
    model[2] = make_layer(IN, in_f=OUT, out_f=IN)  # all rows kept
    model.eval()
    rep = utils.compression_report(model)
    assert [l["path"] for l in rep.layers] == ["pending", "pending"]
    with torch.no_grad():
        model(torch.randn(8, IN))
    paths = [l["path"] for l in utils.compression_report(model).layers]
    c = losparse.forms.path_costs(IN, OUT, RANK, 7, 8, 4, "cpu")
    assert paths == [min(c, key=c.get), "merged"]
    assert "merged" in str(utils.compression_report(model))


# ------------------------------------------------------------------------------------- aten op counts
class _Ops(TorchDispatchMode):
    """Counts aten ops; records the GEMM shapes run inside a LinearLoSparse (flag set by hooks)."""

    def __init__(self):
        super().__init__()
        self.ops, self.inside, self.gemms = collections.Counter(), False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if self.inside and name in ("mm", "addmm", "bmm"):
            a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
            self.gemms.append((name, tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


def _count(model, inputs):
    mode = _Ops()
    hooks = []
    for m in model.modules():
        if isinstance(m, utils.LinearLoSparse):
            hooks.append(m.register_forward_pre_hook(lambda *a: setattr(mode, "inside", True)))
            hooks.append(m.register_forward_hook(lambda *a: setattr(mode, "inside", False)))
    with torch.no_grad(), mode:
        model(**inputs)
    for h in hooks:
        h.remove()
    return mode


@pytest.fixture(scope="module")
def tiny_bert_pair():
    dense = build_tiny_model("bert", head="base").eval()
    compact = copy.deepcopy(dense)
    names = utils.substitute_layer_weights(compact, ["query", "key", "value", "dense"], parameter_ratio=0.05,
                                           log_level="IGNORE")
    with torch.no_grad():
        for m in compact.modules():
            if isinstance(m, utils.LinearLoSparse):
                m.sparse.weight[3:] = 0  # k = 3
    utils.prune(compact, prefer="memory")
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    return dense, compact, len(names), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("path", [None, "fused", "transposed", "onehot", "merged"])
def test_compacted_bert_gemms_aligned_no_cat_and_op_count(tiny_bert_pair, path):
    dense, compact, n_layers, inputs = tiny_bert_pair
    compact = copy.deepcopy(compact).to(torch.bfloat16)
    for m in compact.modules():
        if isinstance(m, utils.LinearLoSparse):
            m.compact_path = path
    _count(compact, inputs)  # first call builds the derived tensors (and the cat that pads them)
    ops = _count(compact, inputs)
    base = _count(dense, inputs).ops
    # every GEMM of a compacted layer: inner and output sizes multiples of 8 (r = 1 -> 8, k = 3 -> 8)
    assert len(ops.gemms) >= n_layers
    for name, a, b in ops.gemms:
        inner, out = a[-1], b[-1]
        if path == "transposed":
            inner, out = a[-1], a[0]  # [R; S] x^T and L h: the weight is the left operand
        assert inner % 8 == 0 and out % 8 == 0, (name, a, b)
    assert ops.ops["cat"] == base["cat"] and ops.ops["stack"] == base["stack"]
    # per call, a compacted layer runs at most these ops more than the nn.Linear it replaced
    # (fused: two slices + index_add_; transposed: + transposes and the row-major copy)
    extra = {"fused": 3, "transposed": 6, "onehot": 0, "merged": 0, None: 3}[path]
    total, dense_total = sum(ops.ops.values()), sum(base.values())
    if path is None:  # the cost model's choice
        assert total <= dense_total + extra * n_layers, (total, dense_total, ops.ops - base)
    else:
        assert total == dense_total + extra * n_layers, (total, dense_total, ops.ops - base)
    with torch.no_grad():
        ref = copy.deepcopy(compact).float()
        for m in ref.modules():
            if isinstance(m, utils.LinearLoSparse):
                m.compact_path = "merged"
        torch.testing.assert_close(compact(**inputs).last_hidden_state.float(),
                                   ref(**inputs).last_hidden_state, rtol=0.05, atol=0.1)


def test_op_count_bound_can_fail(tiny_bert_pair):
    """The per-call cat of the training path is counted: the check above would catch it."""
    dense, compact, n_layers, inputs = tiny_bert_pair
    _count(compact.train(), inputs)  # builds the derived tensors
    ops = _count(compact, inputs)  # no_grad: still the inference path, in train mode too
    assert ops.ops["cat"] == _count(dense, inputs).ops["cat"]
    with torch.enable_grad():
        mode = _Ops()
        with mode:
            compact(**inputs)
    compact.eval()
    assert mode.ops["cat"] >= n_layers


# ------------------------------------------------------------------------------------------ compile
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(make_layer(7), nn.GELU(), make_layer(3, in_f=OUT, out_f=IN, seed=1)).eval()
    x = torch.randn(2, 16, IN)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
        model[0].left.weight.mul_(3)  # derived inside the graph: never stale
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        assert (model(x) - eager).abs().max() > 1e-2
    c = losparse.forms.path_costs(IN, OUT, RANK, 7, 32, 4, "cpu")
    assert utils.compression_report(compiled).layers[0]["path"] == min(c, key=c.get)
    torch._dynamo.reset()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("form", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [True, False])
def test_one_token_runs_matrix_vector_products(path, form, dtype, has_bias):
    """One token on the CPU (decode): every form runs ``mv``/``addmv`` (oneDNN's bf16 GEMM with one column reads
    the weights at about 2/3 of the rate), gives ``L R x + S x + b``, and equals the same token's row of a
    multi-token call; under autocast the GEMM forms run (``mv`` has no CPU autocast rule) and cast as for
    ``nn.Linear``."""
    from test_correctness import _compacted
    layer = _compacted(form, bias=has_bias, dtype=dtype).eval()
    layer.compact_path = path
    ref_w = layer.merged_weight().double()
    ref_b = None if layer.bias is None else layer.bias.detach().double()
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(4, layer.in_feature, generator=g).to(dtype)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}[dtype]
    with torch.inference_mode():
        for x in (xs[:1], xs[0]):  # (1, in) and (in,)
            layer(x)  # derives the form's tensors (a GEMM for merged) once
            counts = _ops(lambda: layer(x))
            assert layer.last_path == path
            assert counts["mv"] + counts["addmv"] + counts["addmv_"] >= 1
            assert not counts["mm"] and not counts["addmm"] and not counts["linear"], counts
            y = layer(x)
            assert y.shape == (*x.shape[:-1], layer.out_feature) and y.dtype == dtype and y.is_contiguous()
            torch.testing.assert_close(y.double(), F.linear(x.double(), ref_w, ref_b), **tol)
        many = layer(xs)
        assert _ops(lambda: layer(xs))["mv"] == 0
        torch.testing.assert_close(layer(xs[:1]).double(), many[:1].double(), **tol)
        # autocast: fp32 weights and input, bf16 products, as nn.Linear does
        layer32 = _compacted(form, bias=has_bias, dtype=torch.float32).eval()
        layer32.compact_path = path
        lin = torch.nn.Linear(layer32.in_feature, layer32.out_feature, bias=has_bias)
        with torch.no_grad():
            lin.weight.copy_(layer32.merged_weight())
            if has_bias:
                lin.bias.copy_(layer32.bias)
        x = xs[:1].float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer32(x)
            counts = _ops(lambda: layer32(x))
            y, y_lin = layer32(x), lin(x)
        assert not counts["mv"] and not counts["addmv"] and y.dtype == y_lin.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), y_lin.double(), rtol=2e-2, atol=5e-2)


def _ops(fn):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _opcount import OpCounter
    with OpCounter() as c:
        fn()
    return c.counts


def test_cost_model_on_16_bit_cpu_weights_falls_back_to_the_dense_product():
    """bf16 on a CPU: the matrix units run a dense GEMM at several times the rate of the factored forms' thin
    ones, so a 7B-shape prefill takes the dense product (``merged``) down to 70 % kept and the compacted form at
    50 % (fp32: the dense product at 90 % only); decode (one token) takes the compacted form at every fraction, and
    so does a CUDA prefill."""
    def pick(in_f, out_f, kept, n, elt, device="cpu"):
        r, k = round(kept / 2 * in_f * out_f / (in_f + out_f)), round(kept / 2 * out_f)
        c = losparse.forms.path_costs(in_f, out_f, r, k, n, elt, device)
        return min(c, key=c.get)

    shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
    for in_f, out_f in shapes:
        for kept in (0.9, 0.8, 0.7):
            assert pick(in_f, out_f, kept, 2048, 2) == "merged"
            assert (pick(in_f, out_f, kept, 2048, 4) == "merged") == (kept == 0.9)  # fp32: thin GEMMs at ~85 %
        assert pick(in_f, out_f, 0.5, 2048, 2) != "merged" and pick(in_f, out_f, 0.7, 2048, 2, "cuda") != "merged"
        for kept in (0.9, 0.5):
            assert pick(in_f, out_f, kept, 1, 2) != "merged" and pick(in_f, out_f, kept, 1, 4) != "merged"

