"""The PLATON ``Pruner`` and its schedule (losparse.pruner), against an element-wise reference."""
import copy

import pytest
import torch
from torch import nn

from losparse.importance import weighted_kth
import utils
from core_helpers import QKV, losparse_layers, schedule_args


def test_schedule_matches_formula():
    args = schedule_args(initial_warmup=1, final_warmup=3, warmup_steps=10, deltaT=10, final_threshold=0.15)
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
    pr = utils.Pruner(nn.Linear(2, 2), schedule_args(), total_step=40)
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
        assert weighted_kth(scores, k, weights.double()) == torch.kthvalue(expanded, k)[0].item(), k
    for k in range(1, scores.numel() + 1):
        assert weighted_kth(scores, k) == torch.kthvalue(scores, k)[0].item()
        assert weighted_kth(scores, k, torch.ones(40, dtype=torch.float64)) == torch.kthvalue(scores, k)[0].item()
    assert weighted_kth(scores, 0, weights.double()) == float("-inf") == weighted_kth(scores, -3)


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
    assert len(losparse_layers(model)) == len(names)
    ref_model = copy.deepcopy(model)
    args = schedule_args(beta2=beta2, **akw)
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
    """The reference's schedule (used above) against numbers worked out by hand for schedule_args()'s defaults."""
    ref = RefPruner(schedule_args(), 40, "mean", "row")  # ti = 3, tf = 6: cubic on (3, 34], final from 35
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
    layers = {n.rsplit(".", 1)[-1]: l.sparse.weight for n, l in losparse_layers(model).items()}
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
    layers = losparse_layers(model).values()
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
    pr = utils.Pruner(model, schedule_args(initial_threshold=1.0, final_threshold=1.0), total_step=20)
    for n, p in model.named_parameters():
        p.grad = torch.randn_like(p)
    thr, mt = pr.update_and_pruning(model, 19)
    assert thr == 1.0 and mt == float("-inf")
    assert all(int((p == 0).sum()) == 0 for n, p in model.named_parameters() if "sparse" in n)


def test_nonfinite_gradients_are_skipped(caplog):
    torch.manual_seed(0)
    model = QKV()
    utils.substitute_layer_weights(model, ["query", "dense"], [], parameter_ratio=0.2)
    pr = utils.Pruner(model, schedule_args(), total_step=40)
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
    args = schedule_args(beta2=beta2)
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
    layers = list(losparse_layers(model).values())
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
    args = schedule_args(initial_threshold=kept / total, final_threshold=kept / total, initial_warmup=1, final_warmup=1,
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
    pr = utils.Pruner(wrapper, schedule_args(), total_step=40)
    for n, p in wrapper.named_parameters():
        p.grad = torch.randn_like(p)
    pr.update_and_pruning(wrapper, 5)
    assert set(pr.exp_avg_ipt) == {"query.sparse.weight", "dense.sparse.weight"}
    pr2 = utils.Pruner(inner, schedule_args(), total_step=40)
    pr2.load_state_dict(pr.state_dict())
    assert set(pr2.ipt) == set(pr.ipt)


def test_pruner_rejects_bad_settings():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="structured_method"):
        utils.Pruner(m, schedule_args(), 40, structured_method="median")
    with pytest.raises(ValueError, match="structured_direction"):
        utils.Pruner(m, schedule_args(), 40, structured_direction="diag")
    with pytest.raises(ValueError, match="pruner_name"):
        utils.Pruner(m, schedule_args(), 40, pruner_name="Random")
    with pytest.raises(ValueError, match="--warmup_steps"):
        utils.Pruner(m, schedule_args(warmup_steps=20), 40)
    with pytest.raises(ValueError, match="lacks"):
        utils.Pruner(m, {"beta1": 0.85}, 40)
