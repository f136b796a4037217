"""Compaction (``prune_sparse``, ``utils.prune``; losparse.compact) and the compacted forward of every form."""
import pytest
import torch

import utils
from conftest import build_tiny_model
from core_helpers import BLOCK, FORM_CASES, SCRIPT_ALLOW, logits_of, losparse_layers, set_form, zero_rows_and_cols


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


@pytest.mark.parametrize("prefer,path", FORM_CASES)
@pytest.mark.parametrize("kind,head", [("bert", "seq_cls"), ("deberta", "seq_cls"), ("bart", "seq2seq")])
def test_compacted_forward_matches_for_changing_shapes(kind, head, prefer, path):
    m = build_tiny_model(kind, head).eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    zero_rows_and_cols(m)
    shapes = [(1, 7), (3, 5), (1, 12), (4, 9), (2, 3)]
    refs = [logits_of(m, kind, batch=b, length=l, seed=i) for i, (b, l) in enumerate(shapes)]
    full_params = sum(p.numel() for p in m.parameters())
    utils.prune(m, prefer=prefer)
    set_form(m, prefer, path)
    layers = losparse_layers(m).values()
    assert {l.sparse_weight_pruned_cols is not None for l in layers} == {True, False}  # both forms run
    assert sum(p.numel() for p in m.parameters()) < full_params
    for i, (b, l) in enumerate(shapes + shapes[::-1]):
        j = i if i < len(shapes) else len(shapes) * 2 - 1 - i
        torch.testing.assert_close(logits_of(m, kind, batch=b, length=l, seed=j), refs[j], atol=1e-5, rtol=1e-5)
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
