"""STEP 1, the walker ``substitute_layer_weights`` (losparse.substitute): names, outputs, dtypes."""
import copy
import math

import pytest
import torch
from torch import nn

import utils
from conftest import build_tiny_model
from core_helpers import BLOCK, MLP, ORIG_ALLOW, SCRIPT_ALLOW, batch_inputs, logits_of, losparse_layers


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
    ref = logits_of(m, kind)
    rep = utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    assert len(rep) > 0
    for name, layer in losparse_layers(m).items():
        assert layer.left.weight.shape == (layer.out_feature, layer.reduced_rank)
    torch.testing.assert_close(logits_of(m, kind), ref, atol=1e-5, rtol=1e-5)


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
             for layer in losparse_layers(m).values()]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = m(**batch_inputs("deberta")).logits
    for h in hooks:
        h.remove()
    assert len(seen) == 12 and set(seen) == {torch.bfloat16}
    assert torch.isfinite(logits.float()).all()
