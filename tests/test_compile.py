"""``utils.prepare_for_inference``: compacted models under ``torch.compile`` and CUDA graphs.

The prepared layer equals the float64 reference on every path and refreshes its buffers in eager mode after an
in-place weight change; the buffers are not state. A compacted tiny BERT compiled with ``fullgraph=True``
traces no op computed from the LoSparse weights alone once prepared (counted in the FX graph that dynamo hands
to a recording backend; unprepared it traces at least two per layer), equals eager, and picks up new weights
through ``prepare_for_inference`` without recompiling; under inductor in bf16 it equals eager. Greedy
generation of a compiled compacted tiny LLaMA with a static KV cache equals eager generation. On CUDA, a
``reduce-overhead`` (CUDA-graph) model replays with new weights after the refresh.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import losparse.forms
import utils  # noqa: E402
from conftest import build_tiny_model, tiny_config  # noqa: E402
from test_compact_forward import OUT, PATHS, TOL, make_layer, reference  # noqa: E402

BERT_LINEARS = ["query", "key", "value", "dense"]


def _compacted(model, names, keep=3, prefer="speed"):
    """STEP 1 at low-rank 0.05, every S but its first ``keep`` rows zeroed, then compacted."""
    utils.substitute_layer_weights(model, names, parameter_ratio=0.05, log_level="IGNORE")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, utils.LinearLoSparse):
                m.sparse.weight[keep:] = 0
                m.sparse.weight[:keep] += 0.1  # the kept rows weigh in the output
    utils.prune(model, prefer=prefer)
    return model


@pytest.fixture
def tiny_bert():
    """A compacted one-layer tiny BERT (one layer: compile time on CPU grows with the layers)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = _compacted(AutoModel.from_config(tiny_config("bert", num_hidden_layers=1)), BERT_LINEARS).eval()
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class Recorder:
    """A dynamo backend that keeps every FX graph it is given (with its example inputs), then runs it as is or,
    ``inductor=True``, compiled by inductor (what ``torch.compile``'s default backend does with it)."""

    def __init__(self, inductor=False):
        self.graphs, self.inductor = [], inductor

    def __call__(self, gm, example_inputs):
        self.graphs.append((gm, list(example_inputs)))
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward


def weight_derivation_ops(gm, example_inputs, weights, activations):
    """Call nodes of ``gm`` computed from ``weights`` and from no activation: at least one input is a weight or
    such a node, and no input is an ``activations`` tensor or follows from one. Other inputs (buffers, other
    parameters, sizes, constants) are neutral."""
    wptr = {w.data_ptr() for w in weights if w.numel()}
    aptr = {a.data_ptr() for a in activations}
    derived, tainted = set(), set()

    def classify(node, value):
        if isinstance(value, torch.Tensor) and value.numel():
            if value.data_ptr() in wptr:
                derived.add(node)
            elif value.data_ptr() in aptr:
                tainted.add(node)

    for node, ex in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs):
        classify(node, ex)
    ops = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            classify(node, obj)
        elif node.op in ("call_function", "call_method", "call_module"):
            inputs = node.all_input_nodes
            if any(i in tainted for i in inputs):
                tainted.add(node)
            elif any(i in derived for i in inputs):
                derived.add(node)
                ops.append(node)
    return ops


def losparse_weights(model):
    return [t for m in model.modules() if isinstance(m, utils.LinearLoSparse)
            for t in (m.left.weight, m.right.weight, m.sparse_weight_pruned, m.bias) if t is not None]


def compile_and_count(model, call, inductor=False):
    """Compile ``model`` (fullgraph) with a :class:`Recorder`, run ``call(compiled)`` once: (ops computed from
    the LoSparse weights alone in the one graph, output, compiled model, recorder)."""
    torch._dynamo.reset()
    rec = Recorder(inductor)
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        out, activations = call(compiled)
    assert len(rec.graphs) == 1
    gm, ex = rec.graphs[0]
    return weight_derivation_ops(gm, ex, losparse_weights(model), activations), out, compiled, rec


def n_layers(model):
    return sum(isinstance(m, utils.LinearLoSparse) for m in model.modules())


# ------------------------------------------------------------------------------------------ the layer
def test_prepare_rejects_bad_arguments(tiny_bert):
    model, _ = tiny_bert
    with pytest.raises(ValueError, match=r"path='fast'.*'fused', 'transposed', 'onehot', 'merged'"):
        utils.prepare_for_inference(model, path="fast")
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=r"tokens=.*positive int"):
            utils.prepare_for_inference(model, tokens=bad)
    dense = build_tiny_model("bert", head="base")
    with pytest.raises(ValueError, match=r"no compacted LinearLoSparse.*utils.prune"):
        utils.prepare_for_inference(dense)
    assert all(m.fast_path.prepared is None for m in model.modules() if isinstance(m, utils.LinearLoSparse))


def _tensor_keys(layer, path):
    """The tensors the form ``path`` multiplies by (its derived entries that are tensors)."""
    with torch.no_grad():
        return [k for k, v in losparse.forms.derive(layer, path).items() if torch.is_tensor(v)]


@pytest.mark.parametrize("path", PATHS)
def test_prepared_layer_equals_reference_and_refreshes_in_eager(path):
    layer = make_layer(7).eval()
    assert utils.prepare_for_inference(layer, path=path) == 1
    assert layer.fast_path.prepared == path and utils.compression_report(layer).layers[0]["path"] == path
    names = sorted(n for n, _ in layer.named_buffers() if n.startswith("_prepared_"))
    assert names == sorted("_prepared_" + k for k in _tensor_keys(layer, path))
    assert set(layer.state_dict()) == {"left.weight", "right.weight", "bias", "sparse_weight_pruned",
                                       "nonzero_idx"}
    x = torch.randn(3, 9, 44)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference(layer, x), **TOL[torch.float32])
        ptrs = {n: b.data_ptr() for n, b in layer.named_buffers() if n.startswith("_prepared_")}
        layer.left.weight.mul_(3)
        layer.sparse_weight_pruned.add_(1)
        y = layer(x)  # eager: the version counters changed, the buffers are re-derived in place
        assert (y.double() - reference(make_layer(7).eval(), x)).abs().max() > 0.5
        torch.testing.assert_close(y.double(), reference(layer, x), **TOL[torch.float32])
        assert {n: b.data_ptr() for n, b in layer.named_buffers() if n.startswith("_prepared_")} == ptrs
        assert layer.last_path == path


def test_prepare_keeps_the_form_unless_asked_and_drops_old_buffers():
    layer = make_layer(7).eval()
    utils.prepare_for_inference(layer, path="onehot")
    utils.prepare_for_inference(layer)  # a refresh: the form stays
    assert layer.fast_path.prepared == "onehot"
    utils.prepare_for_inference(layer, tokens=1)  # the layer's own choice for one row per call
    c = losparse.forms.path_costs(44, OUT, 5, 7, 1, 4, "cpu")
    assert layer.fast_path.prepared == min(c, key=c.get)
    assert {n for n, _ in layer.named_buffers() if n.startswith("_prepared_")} == {
        "_prepared_" + k for k in _tensor_keys(layer, layer.fast_path.prepared)}


# ------------------------------------------------------------------------------------------ compile
def test_unprepared_compiled_layers_derive_weights_every_call():
    """What the count below catches: without preparation the graph builds [R; S_kept] and the padded L."""
    model = torch.nn.Sequential(make_layer(7), torch.nn.GELU(), make_layer(3, in_f=OUT, out_f=44, seed=1)).eval()
    x = torch.randn(2, 16, 44)
    ops, out, _, _ = compile_and_count(model, lambda m: (m(x), [x]))
    heavy = [n for n in ops if any(name in str(n.target) for name in ("cat", "mm", "index_add"))]
    assert len(heavy) >= 2 * 2  # per layer: the cats of [R; S_kept] and padded L, or mm + index_add (merged)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    utils.prepare_for_inference(model)
    ops, out, _, _ = compile_and_count(model, lambda m: (m(x), [x]))
    assert ops == []
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_inductor_fullgraph_bf16_bert_no_derivation_equals_eager_and_follows_a_refresh(tiny_bert):
    model, inputs = tiny_bert
    model = model.to(torch.bfloat16)
    assert utils.prepare_for_inference(model, tokens=32) == n_layers(model) == 6
    with torch.no_grad():
        eager = model(**inputs).last_hidden_state.float()
    ops, out, compiled, rec = compile_and_count(model, lambda m: (m(**inputs), inputs.values()), inductor=True)
    assert ops == []  # no op computed from L, R, S or the bias alone: they are not re-derived per call
    torch.testing.assert_close(out.last_hidden_state.float(), eager, rtol=2e-2, atol=5e-2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, utils.LinearLoSparse):
                m.right.weight.mul_(-2)
                m.sparse_weight_pruned.mul_(3)
        utils.prepare_for_inference(model)  # the documented refresh: the buffers are re-derived in place
        new = compiled(**inputs).last_hidden_state.float()
        assert len(rec.graphs) == 1  # no recompilation: the buffers are graph inputs
        assert (new - eager).abs().max() > 0.5
        torch.testing.assert_close(new, model(**inputs).last_hidden_state.float(), rtol=2e-2, atol=5e-2)
    torch._dynamo.reset()


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_compiled_llama_static_cache_greedy_generation_equals_eager():
    """As transformers documents for torch.compile: a static KV cache and ``model.forward`` compiled."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    _compacted(model, LLAMA_LINEARS)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=8, do_sample=False, cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, **kw)
        utils.prepare_for_inference(model, tokens=1)
        torch._dynamo.reset()
        rec = Recorder()
        model.forward = torch.compile(model.forward, backend=rec, fullgraph=True, dynamic=False)
        out = model.generate(ids, **kw)
    assert len(rec.graphs) == 2  # prefill and one decoding step, replayed for every new token
    weights = losparse_weights(model)
    assert all(weight_derivation_ops(gm, ex, weights, [ids]) == [] for gm, ex in rec.graphs)
    assert out.shape == (1, 14)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_after_in_place_weight_change(tiny_bert):
    model, inputs = tiny_bert
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    utils.prepare_for_inference(model, tokens=32)
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        eager = model(**inputs).last_hidden_state.float()
        for _ in range(3):  # warm-up, record, replay
            out = compiled(**inputs).last_hidden_state.float()
        torch.testing.assert_close(out, eager, rtol=2e-2, atol=5e-2)
        for m in model.modules():
            if isinstance(m, utils.LinearLoSparse):
                m.left.weight.mul_(-2)
                m.sparse_weight_pruned.mul_(3)
        utils.prepare_for_inference(model)
        new = compiled(**inputs).last_hidden_state.float()
        assert (new - eager).abs().max() > 0.5
        torch.testing.assert_close(new, model(**inputs).last_hidden_state.float(), rtol=2e-2, atol=5e-2)
    torch._dynamo.reset()


def _col_layer(seed=0, in_f=44, out_f=OUT, rank=5, k=6):
    """A compacted layer whose S kept ``k`` columns (column-structured pruning: stored as columns)."""
    g = torch.Generator().manual_seed(seed)
    layer = utils.LinearLoSparse(in_f, out_f, rank)
    S = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    S[:, k:] = 0
    layer.initialize_weight(torch.randn(out_f, rank, generator=g) / rank ** 0.5,
                            torch.randn(rank, in_f, generator=g) / in_f ** 0.5, S, torch.randn(out_f, generator=g))
    layer.prune_sparse()
    assert layer.sparse_weight_pruned_cols is not None and layer.kept_cols == k
    return layer


def _dense_reference(layer, x):
    return torch.nn.functional.linear(x.double(), layer.merged_weight().double(), layer.bias.double())


@pytest.mark.parametrize("form", ["rows", "cols"])
@pytest.mark.parametrize("path", PATHS)
def test_refresh_rederives_prepared_buffers_in_place(form, path):
    """``.data`` edits bump no version: ``utils.refresh`` re-derives a prepared layer's buffers in the same storage
    (what a compiled graph or a captured CUDA graph reads), for row and column compaction alike; a layer built and
    prepared inside ``inference_mode`` works outside it."""
    with torch.inference_mode():
        layer = (make_layer(7) if form == "rows" else _col_layer()).eval()
        utils.prepare_for_inference(layer, path=path)
    x = torch.randn(3, 44)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _dense_reference(layer, x), **TOL[torch.float32])
        ptrs = {n: b.data_ptr() for n, b in layer.named_buffers() if n.startswith("_prepared_")}
        with torch.inference_mode():  # inference tensors: edited only inside inference_mode, and unversioned
            layer.left.weight.data.mul_(2)
        assert (layer(x).double() - _dense_reference(layer, x)).abs().max() > 1e-2  # what refresh() is for
        assert utils.refresh(layer) == 1
        torch.testing.assert_close(layer(x).double(), _dense_reference(layer, x), **TOL[torch.float32])
        assert {n: b.data_ptr() for n, b in layer.named_buffers() if n.startswith("_prepared_")} == ptrs
        assert layer.last_path == path
