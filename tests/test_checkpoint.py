"""Checkpoints in the original key layout: ``load_checkpoint`` / ``save_checkpoint`` (losparse.checkpoint)."""
import pytest
import torch
from torch import nn

import utils
from conftest import build_tiny_model
from core_helpers import BLOCK, MLP, ORIG_ALLOW, SCRIPT_ALLOW, logits_of, losparse_layers, zero_random_rows


def test_prune_then_load_checkpoint_round_trip(tmp_path):
    m = build_tiny_model("bert").eval()
    utils.substitute_layer_weights(m, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1)
    zero_random_rows(m)
    utils.prune(m)
    ref = logits_of(m, "bert")
    path = utils.save_checkpoint(m, tmp_path / "pytorch_model.bin")
    fresh = build_tiny_model("bert", seed=1).eval()
    utils.substitute_layer_weights(fresh, SCRIPT_ALLOW, BLOCK, parameter_ratio=0.1, do_svd=False)
    utils.load_checkpoint(fresh, path)
    assert all(layer.is_compacted for layer in losparse_layers(fresh).values())
    torch.testing.assert_close(logits_of(fresh, "bert"), ref, atol=0, rtol=0)


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
    zero_random_rows(m)
    ref = logits_of(m, "bert")
    sd = dict(m.state_dict())
    for name, layer in losparse_layers(m).items():
        w = layer.sparse.weight.detach()
        sd[name + ".sparse_weight_pruned"] = w[torch.nonzero(w.sum(dim=1)).flatten()].clone()
    sd["bert.embeddings.position_ids"] = torch.arange(128)[None]  # persisted by older transformers
    fresh = build_tiny_model("bert", seed=3).eval()
    utils.substitute_layer_weights(fresh, ORIG_ALLOW, BLOCK, parameter_ratio=0.3)
    utils.load_checkpoint(fresh, sd)
    assert all(layer.is_compacted for layer in losparse_layers(fresh).values())
    torch.testing.assert_close(logits_of(fresh, "bert"), ref, atol=1e-6, rtol=1e-5)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fresh2 = build_tiny_model("bert", seed=4).eval()
    utils.substitute_layer_weights(fresh2, ORIG_ALLOW, BLOCK, parameter_ratio=0.3, do_svd=False)
    utils.load_checkpoint(fresh2, tmp_path / "m.safetensors")
    torch.testing.assert_close(logits_of(fresh2, "bert"), ref, atol=0, rtol=0)


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
    ref = logits_of(m, "bert")
    plain = build_tiny_model("bert", seed=5).eval()
    utils.load_checkpoint(plain, m.state_dict())
    assert len(losparse_layers(plain)) == 12
    torch.testing.assert_close(logits_of(plain, "bert"), ref, atol=0, rtol=0)


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
