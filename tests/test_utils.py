"""Core library: decomposition, layer, walker, pruner, checkpoint I/O, reporting, argparse helper."""
import argparse
import copy
import json
import math

import pytest
import torch
from torch import nn

import losparse.importance
import utils
from conftest import build_tiny_model

ORIG_ALLOW = ["query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "dense", "attention", "fc1", "fc2"]
SCRIPT_ALLOW = ORIG_ALLOW + ["query_proj", "key_proj", "value_proj"]
BLOCK = ["pooler", "classifier", "LayerNorm", "embeddings"]


class MLP(nn.Module):
    """A LLaMA-style bias-less MLP block."""

    def __init__(self, d=24, h=40):
        super().__init__()
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.dense = nn.Linear(d, d, bias=True)

    def forward(self, x):
        return self.dense(self.down_proj(torch.relu(self.up_proj(x))))


def _inputs(kind, batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out(model, kind, **kw):
    with torch.no_grad():
        return model(**_inputs(kind, **kw)).logits


def _losparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, utils.LinearLoSparse)}


# ---------------------------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("shape,ratio,rank", [((768, 768), 0.05, 20), ((3072, 768), 0.05, 31),
                                              ((768, 3072), 0.05, 31), ((64, 32), 0.1, 3),
                                              ((8, 4), 1.0, 3), ((8, 4), 5.0, 4), ((8, 4), 1e-6, 1)])
def test_rank_formula_and_clamp(shape, ratio, rank):
    w = torch.randn(*shape)
    out = utils.low_rank_decomposition(w, parameter_ratio=ratio, return_dict=True)
    assert out["reduced_rank"] == rank
    assert out["L"].shape == (shape[0], rank) and out["R"].shape == (rank, shape[1])
    assert set(out) == {"L", "R", "U", "S", "Vh", "reduced_rank"}


def test_decomposition_is_truncated_svd_with_sqrt_split():
    torch.manual_seed(0)
    w = torch.randn(30, 20, dtype=torch.float64).to(torch.bfloat16)
    L, R = utils.low_rank_decomposition(w, parameter_ratio=0.2)
    assert L.dtype == torch.float32 and R.dtype == torch.float32
    U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
    r = math.ceil(0.2 * 600 / 50)
    torch.testing.assert_close(L @ R, (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-5, rtol=1e-5)
    # sqrt split: column norms of L equal row norms of R (= sqrt of the singular values)
    torch.testing.assert_close(L.norm(dim=0), R.norm(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(L.norm(dim=0), S[:r].sqrt(), atol=1e-5, rtol=1e-5)
    Lmin, Rmin = utils.low_rank_decomposition(w, parameter_ratio=0.2, remove_criteria="min_eigenvalue")
    torch.testing.assert_close(Lmin.norm(dim=0), S[-r:].sqrt(), atol=1e-5, rtol=1e-5)
    Lr, Rr = utils.low_rank_decomposition(w, parameter_ratio=0.2, remove_criteria="random")
    chosen = sorted(Lr.norm(dim=0).pow(2).tolist())
    assert len(set(round(c, 4) for c in chosen)) == r  # r distinct singular values
    assert all(any(abs(c - s) < 1e-3 for s in S.tolist()) for c in chosen)


def test_decomposition_rank_ratio_and_errors():
    w = torch.randn(10, 6)
    assert utils.low_rank_decomposition(w, rank_ratio=0.5, parameter_ratio=None, return_dict=True)["reduced_rank"] == 3
    with pytest.raises(ValueError, match="2-D"):
        utils.low_rank_decomposition(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="remove_criteria"):
        utils.low_rank_decomposition(w, remove_criteria="largest")
    with pytest.raises(ValueError, match="svd"):
        utils.low_rank_decomposition(w, svd="fast")


def test_randomized_svd_close_to_exact():
    torch.manual_seed(0)
    # a matrix with a decaying spectrum, like trained weights
    U, _ = torch.linalg.qr(torch.randn(256, 256))
    V, _ = torch.linalg.qr(torch.randn(128, 128))
    s = torch.logspace(0, -2, 128)
    w = (U[:, :128] * s) @ V.T
    exact = utils.low_rank_decomposition(w, parameter_ratio=0.1)
    approx = utils.low_rank_decomposition(w, parameter_ratio=0.1, svd="randomized")
    auto = utils.low_rank_decomposition(w, parameter_ratio=0.1, svd="auto", return_dict=True)
    e_exact = (w - exact[0] @ exact[1]).norm()
    e_approx = (w - approx[0] @ approx[1]).norm()
    assert e_approx <= e_exact * 1.01
    assert auto["U"].shape[1] < 128  # auto picked the randomized SVD (rank 9 << 128)


# ---------------------------------------------------------------------------------------------- walker
def test_replaced_names_bert():
    m = build_tiny_model("bert")
    rep = utils.substitute_layer_weights(m, ORIG_ALLOW, BLOCK, parameter_ratio=0.1)
    expected = []
    for i in range(2):
        p = f"bert.encoder.layer.{i}."
        expected += [p + "attention.self.query", p + "attention.self.key", p + "attention.self.value",
                     p + "attention.output.dense", p + "intermediate.dense", p + "output.dense"]
    assert sorted(r["name"] for r in rep) == sorted(expected)
    assert "bert.pooler.dense.weight" in m.state_dict() and "classifier.weight" in m.state_dict()
    keys = [k for k in m.state_dict() if k.startswith("bert.encoder.layer.0.attention.self.query.")]
    assert sorted(keys) == sorted(["bert.encoder.layer.0.attention.self.query." + s
                                   for s in ("left.weight", "right.weight", "sparse.weight", "bias")])


def test_replaced_names_deberta_original_and_script_lists():
    m = build_tiny_model("deberta")
    rep = utils.substitute_layer_weights(m, ORIG_ALLOW, BLOCK, parameter_ratio=0.1)
    expected = []
    for i in range(2):
        p = f"deberta.encoder.layer.{i}."
        expected += [p + "attention.output.dense", p + "intermediate.dense", p + "output.dense"]
    # the original list does not reach DeBERTa's query_proj/key_proj/value_proj (nor pos_* projections)
    assert sorted(r["name"] for r in rep) == sorted(expected)
    m = build_tiny_model("deberta")
    rep = utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    for i in range(2):
        p = f"deberta.encoder.layer.{i}.attention.self."
        expected += [p + "query_proj", p + "key_proj", p + "value_proj"]
    assert sorted(r["name"] for r in rep) == sorted(expected)


def test_replaced_names_bart():
    m = build_tiny_model("bart", "seq2seq")
    rep = utils.substitute_layer_weights(m, ORIG_ALLOW, BLOCK, parameter_ratio=0.1)
    expected = []
    for side, attns in (("encoder", ["self_attn"]), ("decoder", ["self_attn", "encoder_attn"])):
        for i in range(2):
            p = f"model.{side}.layers.{i}."
            for a in attns:
                expected += [p + f"{a}.{x}" for x in ("q_proj", "k_proj", "v_proj", "out_proj")]
            expected += [p + "fc1", p + "fc2"]
    assert sorted(r["name"] for r in rep) == sorted(expected)
    assert isinstance(m.lm_head, nn.Linear) and m.lm_head.weight is m.model.shared.weight


def test_default_lists_and_block():
    m = build_tiny_model("bert")
    rep = utils.substitute_layer_weights(m)  # defaults: query/key/value/dense/attention; pooler blocked
    assert len(rep) == 12 and not any("pooler" in r["name"] for r in rep)
    m = build_tiny_model("bert")
    rep = utils.substitute_layer_weights(m, ["query"], ["attention"])
    assert rep == []  # recursion never enters 'attention'


@pytest.mark.parametrize("kind,head", [("bert", "seq_cls"), ("deberta", "seq_cls"), ("bart", "seq2seq")])
def test_substitution_preserves_outputs(kind, head):
    m = build_tiny_model(kind, head).eval()
    ref = _out(m, kind)
    rep = utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    assert len(rep) > 0
    for name, layer in _losparse_layers(m).items():
        assert layer.left.weight.shape == (layer.out_feature, layer.reduced_rank)
    torch.testing.assert_close(_out(m, kind), ref, atol=1e-5, rtol=1e-5)


def test_lr_plus_s_equals_w_and_dtype_device_kept():
    torch.manual_seed(0)
    lin = nn.Linear(48, 32)
    holder = nn.Module()
    holder.dense = copy.deepcopy(lin)
    rep = utils.substitute_layer_weights(holder, parameter_ratio=0.2)
    layer = holder.dense
    assert rep == [{"name": "dense", "in_features": 48, "out_features": 32, "rank": math.ceil(0.2 * 48 * 32 / 80)}]
    torch.testing.assert_close(layer.left.weight @ layer.right.weight + layer.sparse.weight, lin.weight,
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.bias, lin.bias)
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    half = nn.Module()
    half.dense = nn.Linear(48, 32).to(torch.bfloat16)
    utils.substitute_layer_weights(half, parameter_ratio=0.2)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in half.parameters())


def test_do_svd_false_zeros_and_shared_linear_stays_shared():
    holder = nn.Module()
    holder.dense = nn.Linear(8, 6)
    holder.value = holder.dense
    rep = utils.substitute_layer_weights(holder, parameter_ratio=0.5, do_svd=False)
    assert len(rep) == 1 and holder.dense is holder.value
    assert float(holder.dense.left.weight.detach().abs().sum() + holder.dense.sparse.weight.detach().abs().sum()) == 0.0


def test_biasless_linear_and_has_sparse_false():
    torch.manual_seed(0)
    mlp = MLP()
    x = torch.randn(4, 24)
    ref = mlp(x)
    rep = utils.substitute_layer_weights(mlp, ["up_proj", "down_proj", "dense"], [], parameter_ratio=0.3)
    assert len(rep) == 3 and mlp.up_proj.bias is None and mlp.dense.bias is not None
    assert "up_proj.bias" not in mlp.state_dict()
    torch.testing.assert_close(mlp(x), ref, atol=1e-5, rtol=1e-5)
    lowrank = MLP()
    utils.substitute_layer_weights(lowrank, ["up_proj"], [], parameter_ratio=0.3, has_sparse=False)
    assert not hasattr(lowrank.up_proj, "sparse") and lowrank.up_proj.kept_rows == 0
    assert lowrank.up_proj(x).shape == (4, 40)


def test_bf16_autocast_deberta_keeps_dtype():
    m = build_tiny_model("deberta").eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
             for layer in _losparse_layers(m).values()]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = m(**_inputs("deberta")).logits
    for h in hooks:
        h.remove()
    assert len(seen) == 12 and set(seen) == {torch.bfloat16}
    assert torch.isfinite(logits.float()).all()


# ---------------------------------------------------------------------------------------------- compaction
def _zero_rows(model, frac=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _losparse_layers(model).values():
            rows = torch.rand(layer.out_feature, generator=g) < frac
            layer.sparse.weight[rows] = 0


def test_prune_sparse_keeps_rows_with_any_nonzero():
    layer = utils.LinearLoSparse(4, 5, 2)
    with torch.no_grad():
        layer.sparse.weight.copy_(torch.tensor([[1., -1., 0., 0.], [0., 0., 0., 0.], [2., 0., 0., 0.],
                                                [0., 0., 0., 0.], [0., 3., -3., 0.]]))
    layer.prune_sparse()
    assert layer.nonzero_idx.tolist() == [0, 2, 4]  # rows 0 and 4 sum to zero but are kept
    assert layer.sparse_weight_pruned.shape == (3, 4)
    assert not hasattr(layer, "sparse")
    assert sorted(layer.state_dict()) == ["bias", "left.weight", "nonzero_idx", "right.weight",
                                          "sparse_weight_pruned"]
    assert "rank=2" in repr(layer) and "sparse_rows=3/5" in repr(layer)
    assert layer.sparse_weight_pruned.requires_grad
    empty = utils.LinearLoSparse(4, 5, 2)
    with torch.no_grad():
        empty.sparse.weight.zero_()
    empty.prune_sparse()
    # no kept row: an empty, frozen parameter (DDP stops on trainable parameters that never get a gradient)
    assert empty.sparse_weight_pruned.shape == (0, 4) and not empty.sparse_weight_pruned.requires_grad


# Every compact form: the cost model's choice under both ``prefer`` values, and each form forced.
FORM_CASES = [("speed", None), ("memory", None)] + [("speed", p) for p in utils.COMPACT_PATHS]


def _set_form(model, prefer, path):
    for m in _losparse_layers(model).values():
        m.prefer, m.compact_path = prefer, path


def _zero_rows_and_cols(model, frac=0.5, seed=0):
    """Zero rows of S (columns for every third layer), as row- or column-structured pruning leaves it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(_losparse_layers(model).values()):
            if i % 3 == 1:
                layer.sparse.weight[:, torch.rand(layer.in_feature, generator=g) < frac] = 0
            else:
                layer.sparse.weight[torch.rand(layer.out_feature, generator=g) < frac] = 0


@pytest.mark.parametrize("prefer,path", FORM_CASES)
@pytest.mark.parametrize("kind,head", [("bert", "seq_cls"), ("deberta", "seq_cls"), ("bart", "seq2seq")])
def test_compacted_forward_matches_for_changing_shapes(kind, head, prefer, path):
    m = build_tiny_model(kind, head).eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    _zero_rows_and_cols(m)
    shapes = [(1, 7), (3, 5), (1, 12), (4, 9), (2, 3)]
    refs = [_out(m, kind, batch=b, length=l, seed=i) for i, (b, l) in enumerate(shapes)]
    full_params = sum(p.numel() for p in m.parameters())
    utils.prune(m, prefer=prefer)
    _set_form(m, prefer, path)
    layers = _losparse_layers(m).values()
    assert {l.sparse_weight_pruned_cols is not None for l in layers} == {True, False}  # both forms run
    assert sum(p.numel() for p in m.parameters()) < full_params
    for i, (b, l) in enumerate(shapes + shapes[::-1]):
        j = i if i < len(shapes) else len(shapes) * 2 - 1 - i
        torch.testing.assert_close(_out(m, kind, batch=b, length=l, seed=j), refs[j], atol=1e-5, rtol=1e-5)
    taken = {l.last_path for l in layers}
    assert taken == ({path} if path else taken) and (prefer == "speed" or "merged" not in taken)


def test_compacted_layer_memory_scales_with_kept_rows():
    layer = utils.LinearLoSparse(64, 128, 4)
    with torch.no_grad():
        layer.sparse.weight[10:] = 0
    layer.prune_sparse()
    n = sum(p.numel() for p in layer.parameters()) + layer.nonzero_idx.numel()
    assert n == 4 * (64 + 128) + 10 * 64 + 128 + 10
    assert layer.num_parameters() == 4 * (64 + 128) + 10 * 64 + 128


def test_compacted_layer_trains():
    torch.manual_seed(0)
    layer = utils.LinearLoSparse(6, 5, 2)
    with torch.no_grad():
        layer.sparse.weight.normal_()
        layer.sparse.weight[1] = 0
    layer.prune_sparse()
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.sparse_weight_pruned.grad.shape == (4, 6) and layer.left.weight.grad is not None


# ---------------------------------------------------------------------------------------------- checkpoints
def test_prune_then_load_checkpoint_round_trip(tmp_path):
    m = build_tiny_model("bert").eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    _zero_rows(m)
    utils.prune(m)
    ref = _out(m, "bert")
    path = utils.save_checkpoint(m, tmp_path / "pytorch_model.bin")
    fresh = build_tiny_model("bert", seed=1).eval()
    utils.substitute_layer_weights(fresh, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1, do_svd=False)
    utils.load_checkpoint(fresh, path)
    assert all(layer.is_compacted for layer in _losparse_layers(fresh).values())
    torch.testing.assert_close(_out(fresh, "bert"), ref, atol=0, rtol=0)


def test_checkpoint_at_rank_20_loads_into_model_built_at_010(tmp_path):
    torch.manual_seed(0)
    big = nn.Module()
    big.dense = nn.Linear(768, 768)
    utils.substitute_layer_weights(big, parameter_ratio=0.05)
    assert big.dense.reduced_rank == 20
    torch.save({"module." + k: v for k, v in big.state_dict().items()}, tmp_path / "ckpt.bin")
    small = nn.Module()
    small.dense = nn.Linear(768, 768)
    utils.substitute_layer_weights(small, parameter_ratio=0.10, do_svd=False)
    assert small.dense.reduced_rank == 39
    utils.load_checkpoint(small, tmp_path / "ckpt.bin")
    assert small.dense.reduced_rank == 20 and small.dense.left.weight.shape == (768, 20)
    x = torch.randn(2, 768)
    torch.testing.assert_close(small.dense(x), big.dense(x), atol=0, rtol=0)


def test_rank_zero_layers_load_from_a_safetensors_file_that_keeps_empty_tensors_once(tmp_path):
    """A one-shot allocation may give a layer rank 0 (rows of S only): its L (out x 0) and R (0 x in) are empty, and
    safetensors writers (accelerate's save_state) keep empty tensors once, as shared storage. load_checkpoint still
    rebuilds every layer at its rank from such a file (rank 0 where L and R are absent)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    saved = MLP()
    utils.substitute_layer_weights(saved, ["up_proj", "down_proj"], [], parameter_ratio=0.2)
    for name in ("up_proj", "down_proj"):  # both at rank 0, as an allocation that keeps only rows of S makes them
        old = getattr(saved, name)
        new = utils.LinearLoSparse(old.in_feature, old.out_feature, 0, has_bias=False)
        new.initialize_weight(torch.zeros(old.out_feature, 0), torch.zeros(0, old.in_feature),
                              old.sparse.weight.detach().clone())
        setattr(saved, name, new)
    full = saved.state_dict()
    empty = [k for k, v in full.items() if v.numel() == 0]
    assert len(empty) == 4
    sd = {k: v for k, v in full.items() if k not in empty[1:]}  # as accelerate's save_state writes it: one kept
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    model = MLP()
    utils.substitute_layer_weights(model, ["up_proj", "down_proj"], [], parameter_ratio=0.2, do_svd=False)
    utils.load_checkpoint(model, tmp_path / "model.safetensors")
    assert model.up_proj.reduced_rank == model.down_proj.reduced_rank == 0
    x = torch.randn(3, 24)
    torch.testing.assert_close(model(x), saved(x), atol=0, rtol=0)


def test_load_original_distilled_format_and_safetensors(tmp_path):
    """The original prune_sparse kept sparse.weight and added sparse_weight_pruned (no nonzero_idx saved)."""
    from safetensors.torch import save_file

    m = build_tiny_model("bert").eval()
    utils.substitute_layer_weights(m, ORIG_ALLOW, BLOCK, parameter_ratio=0.1)
    _zero_rows(m)
    ref = _out(m, "bert")
    sd = dict(m.state_dict())
    for name, layer in _losparse_layers(m).items():
        w = layer.sparse.weight.detach()
        sd[name + ".sparse_weight_pruned"] = w[torch.nonzero(w.sum(dim=1)).flatten()].clone()
    sd["bert.embeddings.position_ids"] = torch.arange(128)[None]  # persisted by older transformers
    fresh = build_tiny_model("bert", seed=3).eval()
    utils.substitute_layer_weights(fresh, ORIG_ALLOW, BLOCK, parameter_ratio=0.3)
    utils.load_checkpoint(fresh, sd)
    assert all(layer.is_compacted for layer in _losparse_layers(fresh).values())
    torch.testing.assert_close(_out(fresh, "bert"), ref, atol=1e-6, rtol=1e-5)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fresh2 = build_tiny_model("bert", seed=4).eval()
    utils.substitute_layer_weights(fresh2, ORIG_ALLOW, BLOCK, parameter_ratio=0.3, do_svd=False)
    utils.load_checkpoint(fresh2, tmp_path / "m.safetensors")
    torch.testing.assert_close(_out(fresh2, "bert"), ref, atol=0, rtol=0)


def test_load_checkpoint_strict_errors_name_keys(tmp_path):
    m = build_tiny_model("bert")
    utils.substitute_layer_weights(m, ORIG_ALLOW, BLOCK, parameter_ratio=0.1)
    path = utils.save_checkpoint(m, tmp_path / "pytorch_model.bin")
    three = build_tiny_model("bert", num_labels=3)
    utils.substitute_layer_weights(three, ORIG_ALLOW, BLOCK, parameter_ratio=0.1)
    before = three.classifier.weight.clone()
    with pytest.raises(utils.CheckpointMismatchError, match=r"classifier\.weight: file \(2, 32\) vs model \(3, 32\)"):
        utils.load_checkpoint(three, path)
    assert torch.equal(three.classifier.weight, before)  # nothing loaded
    bart = build_tiny_model("bart", "seq2seq")
    utils.substitute_layer_weights(bart, ORIG_ALLOW, BLOCK, parameter_ratio=0.1)
    with pytest.raises(utils.CheckpointMismatchError, match="missing keys .*model.encoder"):
        utils.load_checkpoint(bart, path)
    with pytest.raises(FileNotFoundError):
        utils.load_checkpoint(m, tmp_path / "nope.bin")


def test_load_checkpoint_into_unsubstituted_model():
    m = build_tiny_model("bert").eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    ref = _out(m, "bert")
    plain = build_tiny_model("bert", seed=5).eval()
    utils.load_checkpoint(plain, m.state_dict())
    assert len(_losparse_layers(plain)) == 12
    torch.testing.assert_close(_out(plain, "bert"), ref, atol=0, rtol=0)


class _Payload:
    """Unpickling this object runs ``Path.touch(marker)``: what a malicious checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path
        return Path.touch, (Path(self.marker),)


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    """weights_only=True: a .bin that pickles an arbitrary callable is rejected, and the callable never runs."""
    m = build_tiny_model("bert")
    utils.substitute_layer_weights(m, ORIG_ALLOW, BLOCK, parameter_ratio=0.1)
    marker = tmp_path / "code_ran"
    sd = dict(m.state_dict())
    sd["payload"] = _Payload(marker)
    torch.save(sd, tmp_path / "evil.bin")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(Exception, match="(?i)weights.only"):
        utils.load_checkpoint(m, tmp_path / "evil.bin")
    assert not marker.exists()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    torch.load(tmp_path / "evil.bin", weights_only=False)  # the file does carry the payload
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- compact export
def test_export_compact_reload_and_merge(tmp_path):
    m = build_tiny_model("bart", "seq2seq").eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    layers = _losparse_layers(m)
    names = sorted(layers)
    with torch.no_grad():
        for i, name in enumerate(names):
            w = layers[name].sparse.weight
            if i == 0:
                continue  # all rows kept: compact form is bigger than dense -> stored merged
            w[:] = 0 if i == 1 else w * (torch.arange(w.shape[0]) % 4 == 0)[:, None]
    ref = _out(m, "bart")
    sd_before = {k: v.clone() for k, v in m.state_dict().items()}
    out = utils.export_compact(m, tmp_path / "compact", losparse_args=argparse.Namespace(final_threshold=0.25))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd_before.items())  # model untouched
    reloaded = utils.load_compact(out)
    torch.testing.assert_close(_out(reloaded, "bart"), ref, atol=1e-5, rtol=1e-5)
    rl = _losparse_layers(reloaded)
    assert names[0] not in rl and isinstance(reloaded.get_submodule(names[0]), nn.Linear)
    assert not rl[names[1]].has_sparse
    assert rl[names[2]].kept_rows == math.ceil(layers[names[2]].out_feature / 4)
    rep = utils.compression_report(reloaded, out)
    assert rep.files[utils.COMPACT_WEIGHTS] > 0
    # safetensors file size ~= 4 bytes per stored parameter (+ int64 indices and a small header)
    idx_bytes = sum(8 * l.nonzero_idx.numel() for l in rl.values() if l.has_sparse)
    stored = sum(p.numel() for p in reloaded.parameters()) * 4 + idx_bytes
    assert stored <= rep.files[utils.COMPACT_WEIGHTS] <= stored * 1.05 + 20000
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.shared.weight.data_ptr()


def test_load_compact_checks_forms_first_and_shares_one_timing_memo(tmp_path):
    m = build_tiny_model("bert", "seq_cls").eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    _zero_rows_and_cols(m)
    utils.prune(m)
    out = utils.export_compact(m, tmp_path / "compact")
    reloaded = _losparse_layers(utils.load_compact(out))
    assert len(reloaded) == 12 and len({id(l.fast_path.timings) for l in reloaded.values()}) == 1
    meta = json.loads((out / utils.COMPACT_CONFIG).read_text())
    name = sorted(meta["layers"])[3]
    meta["layers"][name]["form"] = "sparse"
    (out / utils.COMPACT_CONFIG).write_text(json.dumps(meta))
    (out / "config.json").unlink()  # the form is refused before the model config is read
    with pytest.raises(utils.CheckpointMismatchError, match=rf"layer {name} has form 'sparse'; allowed values "
                                                            "are 'dense', 'losparse', 'losparse_cols', 'low_rank'"):
        utils.load_compact(out)


@pytest.mark.parametrize("prefer,path", FORM_CASES)
@pytest.mark.parametrize("kind,head", [("bert", "seq_cls"), ("bart", "seq2seq")])
def test_load_compact_reproduces_the_compacted_model_bit_for_bit(tmp_path, kind, head, prefer, path):
    """What the README claims: a compacted model (utils.prune) and its export reloaded give equal outputs, in
    every compact form (rows and columns of S)."""
    m = build_tiny_model(kind, head).eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    _zero_rows_and_cols(m)
    utils.prune(m, prefer=prefer)
    utils.export_compact(m, tmp_path / "compact")
    meta = json.loads((tmp_path / "compact" / "losparse_config.json").read_text())
    assert {e["form"] for e in meta["layers"].values()} == {"losparse", "losparse_cols"}  # nothing stored merged
    reloaded = utils.load_compact(tmp_path / "compact", prefer=prefer)
    _set_form(m, prefer, path)
    _set_form(reloaded, prefer, path)
    for seed, length in ((0, 9), (1, 17)):
        assert torch.equal(_out(reloaded, kind, length=length, seed=seed), _out(m, kind, length=length, seed=seed))
    taken = {l.last_path for l in _losparse_layers(reloaded).values()}
    assert taken == ({path} if path else taken) and (prefer == "speed" or "merged" not in taken)


def test_compression_report_numbers():
    holder = nn.Module()
    holder.dense = nn.Linear(16, 8)
    holder.other = nn.Linear(16, 8)
    utils.substitute_layer_weights(holder, ["dense"], [], parameter_ratio=0.25)  # r = ceil(0.25*128/24) = 2
    with torch.no_grad():
        holder.dense.sparse.weight[3:] = 0
    rep = utils.compression_report(holder)
    assert rep.layers == [{"name": "dense", "out_features": 8, "in_features": 16, "rank": 2, "kept_rows": 3,
                          "path": "uncompacted", "sparse_form": "rows", "kept": 3, "sparse_params": 48}]
    assert (rep.dense_params, rep.low_rank_params, rep.sparse_params) == (128, 48, 48)
    assert rep.effective_ratio == pytest.approx(96 / 128)
    assert rep.model_params == 136 + 96 + 8 and rep.model_params_dense_equivalent == 136 + 136
    assert rep.model_params_in_memory == 136 + 48 + 128 + 8
    assert "75.00% of dense" in str(rep) and rep.as_dict()["effective_ratio"] == rep.effective_ratio


# ---------------------------------------------------------------------------------------------- pruner
def _args(**kw):
    base = dict(beta1=0.85, beta2=1.0, deltaT=2, initial_threshold=1.0, final_threshold=0.3, initial_warmup=1,
                final_warmup=2, warmup_steps=3, low_rank_parameter_ratio=0.1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_schedule_matches_formula():
    args = _args(initial_warmup=1, final_warmup=3, warmup_steps=10, deltaT=10, final_threshold=0.15)
    pr = utils.Pruner(nn.Linear(2, 2), args, total_step=100)
    T, ti, tf = 100, 10, 30
    for t in [0, 5, 10, 11, 20, 35, 40, 69, 70, 71, 99]:
        thr, mask = pr.schedule_threshold_comb(t)
        if t <= ti:
            assert (thr, mask) == (1.0, False)
        elif t > T - tf:
            assert (thr, mask) == (0.15, True)
        else:
            assert thr == pytest.approx(0.15 + 0.85 * (1 - (t - ti) / (T - ti - tf)) ** 3, abs=1e-12)
            assert mask == (t % 10 == 0)
    assert pr.schedule_threshold_comb(40)[0] == pytest.approx(0.15 + 0.85 * 0.5 ** 3)


def test_cubic_schedule_exact_values():
    """The pure schedule function at a few steps (ti = 3, tf = 6 of 40), and the Pruner's method is that function."""
    kw = dict(total_step=40, initial_threshold=1.0, final_threshold=0.3, initial_warmup=1, final_warmup=2,
              warmup_steps=3, deltaT=2)
    assert utils.cubic_schedule(0, **kw) == (1.0, False) and utils.cubic_schedule(3, **kw) == (1.0, False)
    thr, mask = utils.cubic_schedule(4, **kw)  # 1 - (4 - 3) / (40 - 3 - 6) = 30/31
    assert mask is True and thr == pytest.approx(0.3 + 0.7 * 27000 / 29791, rel=0, abs=1e-15)
    thr, mask = utils.cubic_schedule(19, **kw)  # 15/31
    assert mask is False and thr == pytest.approx(0.3 + 0.7 * 3375 / 29791, rel=0, abs=1e-15)
    assert utils.cubic_schedule(34, **kw) == (0.3, True)  # progress 1: the final threshold, reached exactly
    assert utils.cubic_schedule(35, **kw) == (0.3, True) and utils.cubic_schedule(39, **kw) == (0.3, True)
    assert utils.cubic_schedule(5, **{**kw, "deltaT": 5})[1] is True
    pr = utils.Pruner(nn.Linear(2, 2), _args(), total_step=40)
    assert [pr.schedule_threshold_comb(t) for t in range(40)] == [utils.cubic_schedule(t, **kw) for t in range(40)]


@pytest.mark.parametrize("seed", range(4))
def test_weighted_kth_matches_elementwise_kth(seed):
    """One weighted k-th function for every mode: the k-th smallest of the expanded multiset, with ties and zero
    weights (scores another rank counts), for every k; unit weights (None) are ``torch.kthvalue``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 7, (40,), generator=g).float() / 7  # many ties
    weights = torch.randint(0, 5, (40,), generator=g)
    expanded = scores.repeat_interleave(weights)
    for k in range(1, expanded.numel() + 1):
        assert losparse.importance.weighted_kth(scores, k, weights.double()) == torch.kthvalue(expanded, k)[0].item(), k
    for k in range(1, scores.numel() + 1):
        assert losparse.importance.weighted_kth(scores, k) == torch.kthvalue(scores, k)[0].item()
        assert losparse.importance.weighted_kth(scores, k, torch.ones(40, dtype=torch.float64)) == torch.kthvalue(scores, k)[0].item()
    assert losparse.importance.weighted_kth(scores, 0, weights.double()) == float("-inf") == losparse.importance.weighted_kth(scores, -3)


def test_pruner_state_dict_format_is_unchanged():
    """The keys and layout of Pruner.state_dict (checkpoints written before the pruner was split still resume)."""
    _, pruner, _ = _train_pair("max", "row", 0.5, steps=6)
    sd = pruner.state_dict()
    assert list(sd) == ["layout", "ipt", "exp_avg_ipt", "exp_avg_unc", "nonfinite_steps", "nonfinite_reported"]
    assert sd["layout"] == {"pruner_name": "PLATON", "reduced": False, "beta2": 0.5, "structured_method": "max",
                            "structured_direction": "row"}
    names = ["query.sparse.weight", "dense.sparse.weight", "output.sparse.weight"]
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        assert list(sd[kind]) == names
        assert [tuple(t.shape) for t in sd[kind].values()] == [(10, 12), (16, 10), (12, 16)]
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in sd[kind].values())
    assert (sd["nonfinite_steps"], sd["nonfinite_reported"]) == (0, 0)
    _, reduced, _ = _train_pair("mean", "row", 1.0, steps=6)
    sd = reduced.state_dict()
    assert [tuple(t.shape) for t in sd["exp_avg_ipt"].values()] == [(10,), (16,), (12,)] and sd["exp_avg_unc"] == {}


# The row_col rule, written out here (not imported): rows of these projections, columns of every other matrix.
REF_ROW_NAMES = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "query_proj", "key_proj", "value_proj")


class RefPruner:
    """Straightforward element-wise PLATON (the original code's rules, with its crashes fixed)."""

    def __init__(self, args, total_step, method, direction, pruner_name="PLATON"):
        self.a, self.T, self.method, self.direction, self.name = args, total_step, method, direction, pruner_name
        self.ipt, self.avg, self.unc = {}, {}, {}

    def schedule(self, t):
        """The cubic schedule of the paper, from the formula: (kept fraction, mask at this step)."""
        a, T = self.a, self.T
        ti, tf = a.initial_warmup * a.warmup_steps, a.final_warmup * a.warmup_steps
        if t <= ti:
            return a.initial_threshold, False
        if t > T - tf:
            return a.final_threshold, True
        progress = (t - ti) / (T - ti - tf)
        return a.final_threshold + (a.initial_threshold - a.final_threshold) * (1 - progress) ** 3, t % a.deltaT == 0

    def update(self, model, t):
        a = self.a
        for n, p in model.named_parameters():
            if "sparse" not in n:
                continue
            if n not in self.ipt:
                self.ipt[n], self.avg[n], self.unc[n] = (torch.zeros_like(p) for _ in range(3))
            if self.name == "Magnitude":
                self.ipt[n] = p.detach().abs()
                continue
            local, upd = t % a.deltaT, t // a.deltaT
            if local == 0:
                self.avg[n] = a.beta1 * self.avg[n] + (1 - a.beta1) * self.ipt[n]
                if 0 < a.beta2 < 1:
                    self.unc[n] = a.beta2 * self.unc[n] + (1 - a.beta2) * (self.ipt[n] - self.avg[n]).abs()
                elif a.beta2 == 2:
                    self.unc[n] = (upd * self.unc[n] + (self.ipt[n] - self.avg[n]) ** 2) / (upd + 1)
                self.ipt[n] = (p * p.grad).abs().detach()
            else:
                self.ipt[n] = (self.ipt[n] * local + (p * p.grad).abs().detach()) / (local + 1)

    def score(self, n):
        a = self.a
        if self.name == "Magnitude":
            return self.ipt[n]
        if 0 < a.beta2 < 1:
            return self.avg[n] * self.unc[n]
        if a.beta2 == 1:
            return self.avg[n]
        if a.beta2 == 2:
            return self.avg[n] * self.unc[n].sqrt()
        return self.avg[n] * (self.ipt[n] - self.avg[n]).abs()

    def structured(self, s, n):
        if self.method is None:
            return s
        d = self.direction
        if d == "row_col":
            leaf = n.split(".")[-3]  # "<...>.<leaf>.sparse.weight"
            d = "row" if leaf in REF_ROW_NAMES else "col"
        dim = 1 if d == "row" else 0
        f = {"mean": lambda x: x.mean(dim, keepdim=True), "sum": lambda x: x.sum(dim, keepdim=True),
             "max": lambda x: x.max(dim, keepdim=True).values, "min": lambda x: x.min(dim, keepdim=True).values}
        return f[self.method](s).expand_as(s)

    def step(self, model, t):
        self.update(model, t)
        thr, mask = self.schedule(t)
        if not mask:
            return thr, None
        sc = {n: self.structured(self.score(n), n) for n, p in model.named_parameters() if "sparse" in n}
        allv = torch.cat([v.reshape(-1) for v in sc.values()])
        k = int(allv.numel() * (1 - thr))
        mt = float("-inf") if k <= 0 else torch.kthvalue(allv, k)[0].item()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "sparse" in n:
                    p.masked_fill_(sc[n] < mt, 0.0)
        return thr, mt


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(12, 10)
        self.dense = nn.Linear(10, 16)
        self.output = nn.Linear(16, 12)


class AllNames(nn.Module):
    """Every ``row_col`` row name, nested, and column-direction modules; no two matrices of the same shape."""

    COL_NAMES = ("dense", "out_proj", "fc1", "output")

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        for i, name in enumerate(REF_ROW_NAMES + self.COL_NAMES):
            setattr(self.attn, name, nn.Linear(6 + i, 19 - i))


def _train_pair(method, direction, beta2, pruner_name="PLATON", steps=40, total=40, seed=0, model_cls=None, **akw):
    torch.manual_seed(seed)
    model = (model_cls or QKV)()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    utils.substitute_layer_weights(model, [n.rsplit(".", 1)[-1] for n in names], [], parameter_ratio=0.2)
    assert len(_losparse_layers(model)) == len(names)
    ref_model = copy.deepcopy(model)
    args = _args(beta2=beta2, **akw)
    pruner = utils.Pruner(model, args, total, structured_method=method, structured_direction=direction,
                          pruner_name=pruner_name)
    ref = RefPruner(args, total, method, direction, pruner_name)
    g = torch.Generator().manual_seed(seed + 1)
    history = []
    for t in range(steps):
        grads = {n: torch.randn(p.shape, generator=g) * (1 + torch.rand(p.shape[0], 1, generator=g)
                                                         if p.dim() == 2 else 1)
                 for n, p in model.named_parameters()}
        for mdl in (model, ref_model):
            with torch.no_grad():
                for n, p in mdl.named_parameters():
                    p.grad = grads[n].clone()
                    p -= 0.01 * p.grad
        got = pruner.update_and_pruning(model, t)
        exp = ref.step(ref_model, t)
        history.append((got, exp))
        for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert torch.equal(p == 0, q == 0), f"step {t}: mask of {n} differs"
    return model, pruner, history


def _check_history(history):
    """Thresholds from the reference's own schedule, the same mask steps, the same mask thresholds."""
    for t, ((gt, gm), (et, em)) in enumerate(history):
        assert gt == pytest.approx(et, rel=1e-12, abs=1e-12), t
        assert (gm is None) == (em is None), t
        if em is not None:
            assert gm == pytest.approx(em, rel=1e-5, abs=1e-12), t
    masked = [e for _, e in history if e[1] is not None]
    assert len(masked) >= 10
    assert len({round(e[0], 12) for e in masked}) >= 5  # the schedule moved while masking
    return masked


# beta2: 1 (no uncertainty), (0, 1) (EMA), 2 (variance) and every other value (|ipt - avg|): 0, 1.5, 3
PRUNER_CASES = [(m, d, b) for m in ("mean", "sum", "max", "min") for d in ("row", "col", "row_col")
                for b in (1.0, 0.5, 2.0, 0.0)] + [(None, "row", b) for b in (1.0, 0.5, 2.0, 0.0)] + \
               [(m, d, b) for m in ("mean", "max", None) for d in ("row", "col") for b in (1.5, 3.0)]


@pytest.mark.parametrize("method,direction,beta2", PRUNER_CASES)
def test_pruner_matches_elementwise_reference(method, direction, beta2):
    _, _, history = _train_pair(method, direction, beta2)
    _check_history(history)


def test_reference_schedule_is_the_cubic_formula():
    """The reference's schedule (used above) against numbers worked out by hand for _args()'s defaults."""
    ref = RefPruner(_args(), 40, "mean", "row")  # ti = 3, tf = 6: cubic on (3, 34], final from 35
    assert ref.schedule(3) == (1.0, False)
    assert ref.schedule(4) == (pytest.approx(0.3 + 0.7 * (30 / 31) ** 3), True)
    assert ref.schedule(19) == (pytest.approx(0.3 + 0.7 * (15 / 31) ** 3), False)
    assert ref.schedule(33) == (pytest.approx(0.3 + 0.7 * (1 / 31) ** 3), False)
    assert ref.schedule(34) == (pytest.approx(0.3), True)
    assert ref.schedule(35) == (0.3, True) and ref.schedule(39) == (0.3, True)


@pytest.mark.parametrize("method", ["mean", "max"])
@pytest.mark.parametrize("beta2", [1.0, 0.5])
def test_row_col_every_row_name_and_column_modules(method, beta2):
    """row_col: rows of each of the 9 projection names, columns of dense/out_proj/fc1/output (nested modules)."""
    assert set(utils.ROW_COL_ROW_NAMES) == set(REF_ROW_NAMES)
    model, pruner, history = _train_pair(method, "row_col", beta2, model_cls=AllNames)
    _check_history(history)
    layers = {n.rsplit(".", 1)[-1]: l.sparse.weight for n, l in _losparse_layers(model).items()}
    for name, w in layers.items():
        zero = w == 0
        if name in REF_ROW_NAMES:  # whole rows are zero, and at least one row is
            assert torch.equal(zero, zero.all(dim=1, keepdim=True).expand_as(zero)), name
        else:  # whole columns
            assert torch.equal(zero, zero.all(dim=0, keepdim=True).expand_as(zero)), name
    assert any((w == 0).all(dim=1).any() for n, w in layers.items() if n in REF_ROW_NAMES)
    assert any((w == 0).all(dim=0).any() for n, w in layers.items() if n in AllNames.COL_NAMES)


@pytest.mark.parametrize("method", ["mean", "sum", "max", "min", None])
@pytest.mark.parametrize("direction", ["row", "col"])
def test_magnitude_pruner_matches_reference(method, direction):
    _, _, history = _train_pair(method, direction, 1.0, pruner_name="Magnitude")
    _check_history(history)


@pytest.mark.parametrize("final", [0.3, 0.15, 0.5])
def test_final_kept_fraction_within_one_row(final):
    model, pruner, history = _train_pair("mean", "row", 1.0, final_threshold=final, steps=40, total=40)
    assert history[-1][0][0] == final
    layers = _losparse_layers(model).values()
    total = sum(l.sparse.weight.numel() for l in layers)
    kept = sum(int((l.sparse.weight != 0).sum()) for l in layers)
    widest_row = max(l.in_feature for l in layers)
    assert abs(kept - final * total) <= widest_row
    assert kept >= final * total - widest_row
    # the report counts the same kept rows
    rep = utils.compression_report(model)
    assert rep.sparse_params == kept


def test_reduced_path_keeps_row_statistics_only():
    _, pruner, _ = _train_pair("mean", "row", 1.0, steps=6)
    assert pruner.reduced
    shapes = {n: tuple(t.shape) for n, t in pruner.exp_avg_ipt.items()}
    assert shapes == {"query.sparse.weight": (10,), "dense.sparse.weight": (16,), "output.sparse.weight": (12,)}
    _, pruner, _ = _train_pair("mean", "col", 1.0, steps=6)
    assert {tuple(t.shape) for t in pruner.exp_avg_ipt.values()} == {(12,), (10,), (16,)}


def test_k_zero_prunes_nothing():
    torch.manual_seed(0)
    model = QKV()
    utils.substitute_layer_weights(model, ["query", "dense"], [], parameter_ratio=0.2)
    pr = utils.Pruner(model, _args(initial_threshold=1.0, final_threshold=1.0), total_step=20)
    for n, p in model.named_parameters():
        p.grad = torch.randn_like(p)
    thr, mt = pr.update_and_pruning(model, 19)
    assert thr == 1.0 and mt == float("-inf")
    assert all(int((p == 0).sum()) == 0 for n, p in model.named_parameters() if "sparse" in n)


def test_nonfinite_gradients_are_skipped(caplog):
    torch.manual_seed(0)
    model = QKV()
    utils.substitute_layer_weights(model, ["query", "dense"], [], parameter_ratio=0.2)
    pr = utils.Pruner(model, _args(), total_step=40)
    for t in range(3):
        for n, p in model.named_parameters():
            p.grad = torch.randn_like(p)
        pr.update_and_pruning(model, t)
    before = {n: v.clone() for n, v in pr.ipt.items()}
    avg_before = {n: v.clone() for n, v in pr.exp_avg_ipt.items()}
    model.query.sparse.weight.grad[0, 0] = float("nan")
    with caplog.at_level("WARNING", logger="losparse"):
        pr.update_and_pruning(model, 4)
        pr.mask_with_threshold(model, 0.5)
    assert all(torch.equal(before[n], pr.ipt[n]) for n in before)
    assert all(torch.equal(avg_before[n], pr.exp_avg_ipt[n]) for n in avg_before)
    assert all(torch.isfinite(v).all() for v in pr.exp_avg_ipt.values())
    assert sum("non-finite" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("method,beta2", [("mean", 1.0), ("max", 0.5)])
def test_pruner_state_dict_resume_is_bit_exact(method, beta2, tmp_path):
    full_model, full_pruner, _ = _train_pair(method, "row", beta2, steps=30, total=30, seed=3)
    # same run, interrupted at step 13 and resumed from a saved state (through torch.save/load)
    torch.manual_seed(3)
    model = QKV()
    utils.substitute_layer_weights(model, ["query", "dense", "output"], [], parameter_ratio=0.2)
    args = _args(beta2=beta2)
    g = torch.Generator().manual_seed(4)
    pruner = utils.Pruner(model, args, 30, structured_method=method)
    for t in range(30):
        grads = {n: torch.randn(p.shape, generator=g) * (1 + torch.rand(p.shape[0], 1, generator=g)
                                                         if p.dim() == 2 else 1)
                 for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
                p -= 0.01 * p.grad
        pruner.update_and_pruning(model, t)
        if t == 13:
            torch.save(pruner.state_dict(), tmp_path / "pruner.pt")
            pruner = utils.Pruner(model, args, 30, structured_method=method)
            pruner.load_state_dict(torch.load(tmp_path / "pruner.pt", weights_only=True))
    for (n, p), (_, q) in zip(model.named_parameters(), full_model.named_parameters()):
        assert torch.equal(p, q), n
    for d in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        a, b = getattr(pruner, d), getattr(full_pruner, d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="structured_method"):
        utils.Pruner(model, args, 30, structured_method="sum").load_state_dict(pruner.state_dict())


@pytest.mark.parametrize("keep", [False, True])
def test_keep_zero_rows_holds_pruned_rows_through_warmup_and_resume(keep, tmp_path):
    """Rows of S zeroed before training (a one-shot allocation) stay zero at every step with keep_zero_rows, also
    in the warm-up that does not mask, so the kept fraction never exceeds what was allocated; without it AdamW
    regrows them. The held rows are part of the state: a pruner rebuilt mid-run and loaded holds the same rows."""
    torch.manual_seed(0)
    model = QKV()
    utils.substitute_layer_weights(model, ["query", "dense", "output"], [], parameter_ratio=0.2)
    layers = list(_losparse_layers(model).values())
    zeroed = {}
    with torch.no_grad():
        for i, m in enumerate(layers):  # rows 0, 2, 4, ... of every S (and row 1 of the first) pruned beforehand
            rows = torch.zeros(m.out_feature, dtype=torch.bool)
            rows[::2] = True
            rows[1] = i == 0
            m.sparse.weight[rows] = 0.0
            zeroed[m] = rows
    kept = sum(int((~r).sum()) * m.in_feature for m, r in zeroed.items())
    total = sum(m.out_feature * m.in_feature for m in layers)
    # initial == final threshold at the allocated fraction, 4 warm-up steps without masking (as run_clm.py --one_shot)
    args = _args(initial_threshold=kept / total, final_threshold=kept / total, initial_warmup=1, final_warmup=1,
                 warmup_steps=4, deltaT=3)
    pruner = utils.Pruner(model, args, 20, keep_zero_rows=keep)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    fractions = []
    for t in range(20):
        model.output(model.dense(model.query(torch.randn(8, 12)))).pow(2).mean().backward()
        optimizer.step()
        pruner.update_and_pruning(model, t)
        optimizer.zero_grad()
        fractions.append(sum(int((m.sparse.weight != 0).any(dim=1).sum()) * m.in_feature for m in layers) / total)
        if t == 9:  # a resumed run: a new pruner takes the state
            state = pruner.state_dict()
            torch.save(state, tmp_path / "pruner.pt")
            pruner = utils.Pruner(model, args, 20, keep_zero_rows=keep)
            pruner.load_state_dict(torch.load(tmp_path / "pruner.pt", weights_only=True))
    if not keep:
        assert max(fractions[:4]) == 1.0  # the warm-up regrew every pruned row
        assert "zero_rows" not in state and "keep_zero_rows" not in state["layout"]
        return
    assert max(fractions) == kept / total  # never above the allocation, at every step
    for m, rows in zeroed.items():
        assert torch.equal((m.sparse.weight == 0).all(dim=1), rows)  # exactly the pruned rows, nothing more
    assert state["layout"]["keep_zero_rows"] is True
    assert [r.tolist() for r in state["zero_rows"].values()] == [r.tolist() for r in zeroed.values()]
    with pytest.raises(ValueError, match="keep_zero_rows"):
        utils.Pruner(model, args, 20).load_state_dict(state)


def test_pruner_handles_ddp_style_prefix():
    torch.manual_seed(0)
    inner = QKV()
    utils.substitute_layer_weights(inner, ["query", "dense"], [], parameter_ratio=0.2)
    wrapper = nn.Module()
    wrapper.module = inner
    pr = utils.Pruner(wrapper, _args(), total_step=40)
    for n, p in wrapper.named_parameters():
        p.grad = torch.randn_like(p)
    pr.update_and_pruning(wrapper, 5)
    assert set(pr.exp_avg_ipt) == {"query.sparse.weight", "dense.sparse.weight"}
    pr2 = utils.Pruner(inner, _args(), total_step=40)
    pr2.load_state_dict(pr.state_dict())
    assert set(pr2.ipt) == set(pr.ipt)


def test_pruner_rejects_bad_settings():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="structured_method"):
        utils.Pruner(m, _args(), 40, structured_method="median")
    with pytest.raises(ValueError, match="structured_direction"):
        utils.Pruner(m, _args(), 40, structured_direction="diag")
    with pytest.raises(ValueError, match="pruner_name"):
        utils.Pruner(m, _args(), 40, pruner_name="Random")
    with pytest.raises(ValueError, match="--warmup_steps"):
        utils.Pruner(m, _args(warmup_steps=20), 40)
    with pytest.raises(ValueError, match="lacks"):
        utils.Pruner(m, {"beta1": 0.85}, 40)


# ---------------------------------------------------------------------------------------------- argparse helper
def _parse(argv):
    return utils.add_losparse_args(argparse.ArgumentParser()).parse_args(argv)


def test_add_losparse_args_defaults():
    a = _parse([])
    assert (a.low_rank_parameter_ratio, a.initial_threshold, a.final_threshold, a.initial_warmup, a.final_warmup,
            a.warmup_steps, a.beta1, a.beta2, a.deltaT, a.eval_checkpoint, a.structured_method,
            a.structured_direction, a.pruner_name, a.svd, a.no_losparse) == \
           (0.05, 1.0, 0.1, 1, 3, 6400, 0.85, 1.0, 10, None, "mean", "row", "PLATON", "full", False)
    utils.validate_losparse_args(a)


@pytest.mark.parametrize("argv,flag", [
    (["--final_threshold", "1.5"], "--final_threshold"),
    (["--final_threshold", "0"], "--final_threshold"),
    (["--low_rank_parameter_ratio", "0"], "--low_rank_parameter_ratio"),
    (["--initial_threshold", "0.5", "--final_threshold", "0.6"], "--final_threshold"),
    (["--deltaT", "0"], "--deltaT"),
    (["--beta1", "1.0"], "--beta1"),
    (["--beta2", "-1"], "--beta2"),
    (["--warmup_steps", "-5"], "--warmup_steps"),
])
def test_validate_names_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        utils.validate_losparse_args(_parse(argv))


def test_validate_warmups_fit_in_run():
    a = _parse(["--warmup_steps", "100"])
    utils.validate_losparse_args(a, total_step=401)
    with pytest.raises(ValueError, match="--initial_warmup .*--final_warmup .*--warmup_steps"):
        utils.validate_losparse_args(a, total_step=400)
    b = _parse(["--no_losparse", "--final_threshold", "0.5"])
    utils.validate_losparse_args(b, total_step=10)


def test_missing_gradients_raise_instead_of_silently_skipping():
    model = QKV()
    utils.substitute_layer_weights(model, ["query"], [], parameter_ratio=0.2)
    pr = utils.Pruner(model, _args(), total_step=40)
    with pytest.raises(RuntimeError, match="no sparse parameter has a gradient"):
        pr.update_and_pruning(model, 3)


@pytest.mark.parametrize("dtype,ok", [("NO", True), ("MULTI_GPU", True), ("MULTI_CPU", True),
                                      ("DEEPSPEED", False), ("FSDP", False), ("MEGATRON_LM", False)])
def test_check_distributed_support(dtype, ok):
    from accelerate.utils import DistributedType

    fake = argparse.Namespace(distributed_type=DistributedType(dtype))
    if ok:
        utils.check_distributed_support(fake)
    else:
        with pytest.raises(RuntimeError, match=f"distributed_type={dtype}.*Supported: a single process"):
            utils.check_distributed_support(fake)


def test_check_distributed_support_refuses_lone_processes(monkeypatch):
    """torchrun on a machine where accelerate does not initialise torch.distributed: N independent runs."""
    from accelerate.utils import DistributedType

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but accelerate runs this process alone"):
        utils.check_distributed_support(argparse.Namespace(distributed_type=DistributedType.NO, num_processes=1))
    utils.check_distributed_support(argparse.Namespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2))
    monkeypatch.setenv("WORLD_SIZE", "1")
    utils.check_distributed_support(argparse.Namespace(distributed_type=DistributedType.NO, num_processes=1))
