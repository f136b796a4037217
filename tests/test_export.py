"""The compact folder (``export_compact`` / ``load_compact``, losparse.export) and ``compression_report``."""
import argparse
import json
import math

import pytest
import torch
from torch import nn

import utils
from conftest import build_tiny_model
from core_helpers import BLOCK, FORM_CASES, SCRIPT_ALLOW, logits_of, losparse_layers, set_form, zero_rows_and_cols


def test_export_compact_reload_and_merge(tmp_path):
    m = build_tiny_model("bart", "seq2seq").eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    layers = losparse_layers(m)
    names = sorted(layers)
    with torch.no_grad():
        for i, name in enumerate(names):
            w = layers[name].sparse.weight
            if i == 0:
                continue  # all rows kept: compact form is bigger than dense -> stored merged
            w[:] = 0 if i == 1 else w * (torch.arange(w.shape[0]) % 4 == 0)[:, None]
    ref = logits_of(m, "bart")
    sd_before = {k: v.clone() for k, v in m.state_dict().items()}
    out = utils.export_compact(m, tmp_path / "compact", losparse_args=argparse.Namespace(final_threshold=0.25))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd_before.items())  # model untouched
    reloaded = utils.load_compact(out)
    torch.testing.assert_close(logits_of(reloaded, "bart"), ref, atol=1e-5, rtol=1e-5)
    rl = losparse_layers(reloaded)
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
    zero_rows_and_cols(m)
    utils.prune(m)
    out = utils.export_compact(m, tmp_path / "compact")
    reloaded = losparse_layers(utils.load_compact(out))
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
    zero_rows_and_cols(m)
    utils.prune(m, prefer=prefer)
    utils.export_compact(m, tmp_path / "compact")
    meta = json.loads((tmp_path / "compact" / "losparse_config.json").read_text())
    assert {e["form"] for e in meta["layers"].values()} == {"losparse", "losparse_cols"}  # nothing stored merged
    reloaded = utils.load_compact(tmp_path / "compact", prefer=prefer)
    set_form(m, prefer, path)
    set_form(reloaded, prefer, path)
    for seed, length in ((0, 9), (1, 17)):
        assert torch.equal(logits_of(reloaded, kind, length=length, seed=seed),
                           logits_of(m, kind, length=length, seed=seed))
    taken = {l.last_path for l in losparse_layers(reloaded).values()}
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
