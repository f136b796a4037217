"""One-shot compression: rows of S by output energy (``one_shot_rows``) and one global budget shared over every
layer's rank and kept rows (``one_shot_allocate``), with the optional sequential refit.

The maths are plain functions: ``fisher_svds`` (the SVD of each whitened weight), ``allocation_table`` (the error of
every rank / kept-rows pair), ``allocate`` (the Lagrangian choice across layers); ``_sequential_refit`` runs the
decoder blocks one by one on captured hidden states.
"""
import math
import time
import types
import weakref

import torch
from torch import nn

from .calibration import CalibrationDone, attention_mask, block_key, run_batch, token_mask
from .common import logger, set_submodule
from .decomposition import low_rank_decomposition, whitening
from .layer import LinearLoSparse
from .substitute import input_groups, linear_targets


@torch.no_grad()
def one_shot_rows(module, input_cov, kept_fraction, normalize=True):
    """Zero the rows of S that carry the least output energy, so a fraction ``kept_fraction`` of S is kept.

    Dropping row i of a layer's S adds exactly ``E[(S_i x)^2] = S_i C S_i^T`` to that output's squared error.
    Rows are ranked globally across the (uncompacted) :class:`LinearLoSparse` layers named in ``input_cov``
    by that energy per stored entry (divided by ``in_features``); ``normalize`` (default) also divides by the
    layer's mean output energy per row ``tr(W C W^T) / out`` (so the layers' different output scales do
    not decide alone). The rows are kept best first while the kept entries fit in
    ``floor(kept_fraction * total entries of S)``. Then :func:`prune` compacts them, or a Pruner goes on.

    :return: ``{"kept_rows", "total_rows", "kept_entries", "total_entries"}``.
    """
    if not 0 <= kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in [0, 1], got {kept_fraction!r}")
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LinearLoSparse) and m.has_sparse]
    if not layers:
        raise ValueError("one_shot_rows: the module has no LinearLoSparse layer with a sparse part (run STEP 1)")
    missing = [n for n, _ in layers if n not in input_cov]
    compacted = [n for n, m in layers if m.is_compacted]
    if missing or compacted:
        raise ValueError(f"one_shot_rows: no input_cov for {missing[:3]}" if missing else
                         f"one_shot_rows: {compacted[:3]} are already compacted")
    scores, sizes = [], []
    for n, m in layers:
        C = input_cov[n].to(device=m.sparse.weight.device, dtype=torch.float64)
        S = m.sparse.weight.detach().double()
        energy = ((S @ C) * S).sum(dim=1) / m.in_feature
        if normalize:
            W = m.merged_weight().double()
            ref = float(((W @ C) * W).sum()) / m.out_feature
            energy = energy / ref if ref > 0 else energy
        scores.append(energy.cpu())
        sizes.append(torch.full((m.out_feature,), m.in_feature, dtype=torch.long))
    scores, sizes = torch.cat(scores), torch.cat(sizes)
    total = int(sizes.sum())
    budget = math.floor(kept_fraction * total)
    order = torch.sort(scores, descending=True, stable=True).indices
    fits = sizes[order].cumsum(0) <= budget
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[fits]] = True
    offset = 0
    for n, m in layers:
        k = keep[offset:offset + m.out_feature].to(m.sparse.weight.device)
        offset += m.out_feature
        m.sparse.weight.masked_fill_(~k.unsqueeze(1), 0.0)
    info = {"kept_rows": int(keep.sum()), "total_rows": int(keep.numel()), "kept_entries": int(sizes[keep].sum()),
            "total_entries": total}
    logger.info("LoSparse one-shot: kept %d of %d rows of S (%.2f%% of its entries)", info["kept_rows"],
                info["total_rows"], 100 * info["kept_entries"] / total)
    return info


def fisher_svds(targets, input_cov, output_fisher, store=None):
    """``{name: {"U", "S", "Vh", "K_inv", "d"}}``: full SVD of ``D^1/2 W K`` of every target (shared K computed once).

    Layers sharing an input (the same ``C`` object) come one after the other in ``targets`` (q/k/v, gate/up): ``K``
    is held while they are decomposed and dropped after them (``K_inv`` stays with each result). ``store``: the
    device the results are kept on (None: the layers'; ``"cpu"`` moves each to host memory as soon as it is computed,
    so that a GPU holds one layer's decomposition at a time; a shared ``K_inv`` is moved once)."""
    current, out, moved = (None, None), {}, {}

    def keep(t):
        if t is None or store is None:
            return t
        ref, copy = moved.get(id(t), (None, None))
        if ref is None or ref() is not t:  # by weak reference: a freed source's id may come back for another tensor
            copy = t.to(store)
            moved[id(t)] = (weakref.ref(t), copy)
        return copy

    for name, lin in targets:
        W = lin.weight.detach()
        kw = {}
        if input_cov is not None:
            C = input_cov[name]
            if current[0] is not C:
                current = (None, None)  # the previous input's K is freed before the next one is built
                current = (C, whitening(C.to(W.device)))
            kw = {"input_cov": C, "_whitened": current[1]}
        dec = low_rank_decomposition(W, parameter_ratio=1.0, return_dict=True, log_level="IGNORE", svd="full",
                                     output_fisher=None if output_fisher is None else output_fisher[name],
                                     _factors_only=True, **kw)
        out[name] = {key: keep(dec.get(key)) for key in ("U", "S", "Vh", "K_inv", "d")}
        del dec
    return out


def allocation_table(U, S, ranks, rows=True, dtype=torch.float64, chunk=1024):
    """``(E, res)``: ``res[j, i]`` the weighted energy of row i of ``A - A_r`` (``A = U diag(S) Vh``, r = ranks[j]);
    ``E[j, k]`` the weighted error with rank ``ranks[j]`` and the ``k`` rows of largest ``res[j]`` kept exactly.
    Computed in float64, ``chunk`` rows of ``U`` at a time (the per-row energies are never all held at once);
    ``E`` is returned in ``dtype`` (:func:`one_shot_allocate` keeps float32 tables, half the memory), ``res`` in
    float64."""
    res = torch.empty(len(ranks), U.shape[0], dtype=torch.float64, device=U.device)  # G x H
    S2 = S.double() ** 2
    for s in range(0, U.shape[0], chunk):
        P = U[s:s + chunk].double() ** 2 * S2  # energy of component k in row i
        tail = torch.cat([P.flip(1).cumsum(1).flip(1), torch.zeros_like(P[:, :1])], dim=1).clamp_min(0)
        res[:, s:s + chunk] = tail[:, ranks].mT
    total = res.sum(1, keepdim=True)
    if not rows:
        return total.to(dtype), res
    kept = torch.cat([torch.zeros_like(total), res.sort(dim=1, descending=True).values.cumsum(1)], dim=1)
    return (total - kept).clamp_min(0).to(dtype), res


def allocate(tables, budget, fill=True, iters=80):
    """Global budget allocation: per table ``(E, ranks, rank_cost, row_cost)`` a choice ``(j, k)`` (rank
    ``ranks[j]``, ``k`` rows) of cost ``ranks[j] * rank_cost + k * row_cost``, minimising ``sum E[j, k]`` with
    the total cost ``<= budget``. Lagrangian relaxation (bisection on the price ``lam`` of a parameter; the
    choice at a price is optimal for its own cost), then ``fill`` spends what is left greedily, best gain per
    parameter first. Returns ``(choices, cost, lam)``."""
    grids = []  # (E, cost of each rank (G x 1), cost of each number of rows (1 x K)): cost = their sum, not stored
    for E, ranks, rank_cost, row_cost in tables:
        grids.append((E, (ranks.to(torch.float64)[:, None] * rank_cost,
                          torch.arange(E.shape[1], dtype=torch.float64)[None] * row_cost)))

    def at(cost, j, k):
        return int(cost[0][j, 0] + cost[1][0, k])

    def choose(lam):
        out, total = [], 0
        for E, cost in grids:
            f = int(torch.argmin((E + lam * (cost[0] + cost[1])).flatten()))
            j, k = divmod(f, E.shape[1])
            out.append((j, k))
            total += at(cost, j, k)
        return out, total

    def cheapest(cost):
        c = cost[0] + cost[1]
        return float(c[c > 0].min()) if (c > 0).any() else None

    choice, total = choose(0.0)
    lam = 0.0
    if total > budget:
        lo = 0.0
        unit = min((u for u in (cheapest(c) for _, c in grids) if u is not None), default=1.0)
        hi = max(float(E.max()) for E, _ in grids) / max(1.0, unit) * 2 + 1e-300
        choice, total = choose(hi)
        for _ in range(iters):
            mid = math.sqrt(lo * hi) if lo > 0 else hi * 1e-12
            c, t = choose(mid)
            if t <= budget:
                hi, choice, total = mid, c, t
            else:
                lo = mid
            if lo > 0 and hi / lo < 1 + 1e-12:
                break
        lam = hi
    if fill:
        choice = list(choice)
        while True:
            best = None
            for i, ((j, k), (E, cost)) in enumerate(zip(choice, grids)):
                for jj, kk in ((j, k + 1), (j + 1, k)):
                    if jj < E.shape[0] and kk < E.shape[1]:
                        dc = at(cost, jj, kk) - at(cost, j, k)
                        if 0 < dc <= budget - total:
                            ratio = (float(E[j, k]) - float(E[jj, kk])) / dc
                            if best is None or ratio > best[0]:  # gains are >= 0 (up to rounding)
                                best = (ratio, i, jj, kk, dc)
            if best is None:
                break
            _, i, jj, kk, dc = best
            choice[i], total = (jj, kk), total + dc
    return choice, total, lam


def _allocated_layer(lin, d, r, k, refit, rows):
    """The :class:`LinearLoSparse` of :func:`one_shot_allocate` for one layer: rank ``r`` and ``k`` kept rows of S,
    from ``d`` (the SVD of its whitened weight, :func:`fisher_svds`). Returns ``(layer, weighted error)``."""
    W = lin.weight.detach()
    H, Win = W.shape
    d = {key: v.to(W.device) if torch.is_tensor(v) else v for key, v in d.items()}  # kept on the host: one at a time
    U, S, Vh = d["U"], d["S"], d["Vh"]
    E, res = allocation_table(U.cpu(), S.cpu(), torch.tensor([r]), rows)
    err = float(E[0, k])
    kept = torch.topk(res[0], k).indices.to(U.device) if k else torch.zeros(0, dtype=torch.long, device=U.device)
    s = S[:r].sqrt()
    Lw, Rw = U[:, :r] * s, s[:, None] * Vh[:r]
    if r and 0 < k < H:  # refit L R to the non-kept rows, re-choose the rows: the weighted error does not increase
        A = (U * S) @ Vh
        for _ in range(refit):
            Am = A.clone()
            Am[kept] = 0
            U2, S2, Vh2 = torch.linalg.svd(Am, full_matrices=False)
            s = S2[:r].sqrt()
            Lw2, Rw2 = U2[:, :r] * s, s[:, None] * Vh2[:r]
            e = ((A - Lw2 @ Rw2).double() ** 2).sum(1)
            kept2 = torch.topk(e, k).indices
            err2 = float(e.sum() - e[kept2].sum())
            if err2 > err:  # numerical noise only: keep the better one
                break
            Lw, Rw, kept, err = Lw2, Rw2, kept2, err2
    L, R = Lw.double(), Rw.double()
    if d["d"] is not None:
        L = L / d["d"][:, None].to(L.device)
    if d["K_inv"] is not None:
        R = R @ d["K_inv"].to(R.device)
    if r:  # balance each component (||L_:j|| = ||R_j:||, L R unchanged): the whitening leaves them lopsided,
        nl, nr = L.norm(dim=0), R.norm(dim=1)  # which makes gradient steps on L, R badly scaled
        g = torch.where((nl > 0) & (nr > 0), (nr / nl.clamp_min(1e-300)).sqrt(), torch.ones_like(nl))
        L, R = L * g, R / g[:, None]
    L, R = L.float(), R.float()
    Sm = None
    if rows:
        Sm = torch.zeros(H, Win, dtype=torch.float32, device=W.device)
        Sm[kept] = W.float()[kept] - (L @ R)[kept]
    kw = {"device": W.device, "dtype": W.dtype}
    layer = LinearLoSparse(Win, H, r, has_bias=lin.bias is not None, has_sparse=rows, device="meta")
    layer.initialize_weight(L.to(**kw), R.to(**kw), None if Sm is None else Sm.to(**kw),
                            None if lin.bias is None else lin.bias.detach().clone())
    return layer, err


def _blocks_of(module, names, what):
    """``(prefix, blocks, {index: [names]})``: the ``nn.ModuleList`` (at ``prefix``) whose blocks hold ``names``."""
    found = {}
    for n in names:
        key = block_key(n)
        parent, _, idx = key.rpartition(".")
        if key == n or not idx.isdigit():
            raise ValueError(f"{what}: {n} is not inside a numbered block (e.g. model.layers.3.mlp.up_proj)")
        found.setdefault(parent, {}).setdefault(int(idx), []).append(n)
    holders = sorted(found)
    blocks = module.get_submodule(holders[0]) if len(holders) == 1 else None
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{what}: the layers to replace must lie in the blocks of one nn.ModuleList (e.g. "
                         f"model.layers), got {holders[:3]}")
    return holders[0], blocks, found[holders[0]]


def _block_call(block, h, call):
    args, kwargs = call
    out = block(h, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _input_at(block, layer, h, call):
    """The input of ``layer`` (a submodule of ``block``) when ``block`` runs on ``h`` (stopped there)."""
    got = []

    def pre(mod, args):
        got.append(args[0])
        raise CalibrationDone
    handle = layer.register_forward_pre_hook(pre)
    try:
        _block_call(block, h, call)
    except CalibrationDone:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"sequential refit: a layer of {type(block).__name__} was never called")
    return got[0]


@torch.no_grad()
def _sequential_refit(module, linears, built, plan, batches, output_fisher, refit, rows, damp, chunk=4096):
    """Pass 3 of :func:`one_shot_allocate` (``sequential``): block by block, each group of layers sharing an input
    is refitted, at its rank and number of kept rows, to the original layers' outputs ``W x`` given the inputs
    ``x~`` the compressed blocks upstream produce: ``W' = argmin (1 - damp) E||W x - W' x~||^2 + damp
    E||(W - W') x||^2`` over the LoSparse form, i.e. the fit of ``W_eff = W N M^-1`` whitened by ``M``, with
    ``M = (1 - damp) E[x~ x~^T] + damp E[x x^T]`` and ``N = (1 - damp) E[x x~^T] + damp E[x x^T]``, the
    expectations over the token rows of every batch, its padding left out (``token_mask`` of its attention mask).
    Returns the summed weighted error."""
    prefix, blocks, holding = _blocks_of(module, list(built), "one_shot_allocate(sequential=...)")
    first, last = min(holding), max(holding)
    calls, hidden = {i: [] for i in range(first, last + 1)}, []  # each block's own arguments (models with sliding-
    # window and full-attention layers give each block its own mask), one forward pass per batch
    masks = []  # each batch's attention mask (or None): its padding is left out of the statistics

    def capture(i):
        def pre(mod, args, kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            for key, value in kwargs.items():  # no KV cache: every block runs several times on the same tokens
                if key in ("cache", "past_key_values", "past_key_value", "layer_past") or \
                        type(value).__name__.endswith("Cache"):
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            if i == first:
                hidden.append(h.detach())
            calls[i].append((tuple(args[1:]), kwargs))
            if i == last:
                raise CalibrationDone
        return pre
    handles = [blocks[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in calls]
    try:
        for batch in batches:
            masks.append(attention_mask(batch))
            try:
                run_batch(module, batch)
            except CalibrationDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if not hidden or len(hidden) != len(masks) or any(len(c) != len(hidden) for c in calls.values()):
        raise ValueError("one_shot_allocate(sequential=...): the calibration batches did not run every block once")
    dense_h, comp_h = hidden, list(hidden)
    total = 0.0
    for i in range(first, last + 1):
        block, names = blocks[i], holding.get(i, [])
        rel = {n: n[len(f"{prefix}.{i}."):] for n in names}

        def use(which):
            for n in names:
                set_submodule(module, n, linears[n] if which == "dense" else built[n])
        groups, order = [], []  # groups of layers called in a row on one input tensor (q/k/v, gate/up)
        use("dense")
        hooks = [block.get_submodule(rel[n]).register_forward_pre_hook(
            lambda mod, args, n=n: order.append((n, args[0]))) for n in names]
        try:
            _block_call(block, dense_h[0], calls[i][0])
        finally:
            for hk in hooks:
                hk.remove()
            use("built")
        for j, (n, x) in enumerate(order):
            if n in {m for g in groups for m in g}:
                continue
            if j and x is order[j - 1][1] and groups:
                groups[-1].append(n)
            else:
                groups.append([n])
        order.clear()
        missing = sorted(set(names) - {m for g in groups for m in g})
        if missing:
            raise RuntimeError(f"one_shot_allocate(sequential=...): {missing[:3]} were never called in their block")
        keeps = {}  # (batch, input shape): its token rows, computed once per batch and block
        for group in groups:
            cross = cov = dcov = None
            count = 0
            for b in range(len(comp_h)):
                use("dense")
                try:
                    x = _input_at(block, block.get_submodule(rel[group[0]]), dense_h[b], calls[i][b])
                finally:
                    use("built")
                xt = _input_at(block, block.get_submodule(rel[group[0]]), comp_h[b], calls[i][b])
                key = (b, tuple(x.shape[:-1]))
                if key not in keeps:  # once per batch and block: every group of the block shares it
                    keep = token_mask(masks[b], x.shape[:-1])
                    keeps[key] = None if keep is None else keep.to(x.device)
                x, xt = x.reshape(-1, x.shape[-1]), xt.reshape(-1, xt.shape[-1])
                if keeps[key] is not None:  # x and x~ are the same tokens: the same rows are padding
                    x, xt = x[keeps[key]], xt[keeps[key]]
                if cov is None:
                    cov = torch.zeros(xt.shape[1], xt.shape[1], dtype=torch.float64, device=xt.device)
                    cross, dcov = torch.zeros_like(cov), torch.zeros_like(cov)
                for s in range(0, xt.shape[0], chunk):
                    a, c = x[s:s + chunk].float(), xt[s:s + chunk].float()
                    cov += (c.mT @ c).double()
                    cross += (a.mT @ c).double()
                    dcov += (a.mT @ a).double()
                count += xt.shape[0]
            # (1 - damp) E||W x - W' x~||^2 + damp E||(W - W') x||^2 = ||(W' - W_eff) K||^2 + const, K K^T = reg
            reg = ((1 - damp) * cov + damp * dcov) / max(count, 1)
            cross = ((1 - damp) * cross + damp * dcov) / max(count, 1)
            chol = whitening(reg)[0]  # damped as the whitened SVD is (more if a singular M needs it)
            if chol is None:
                continue  # the inputs are zero: keep the fit to the original statistics
            reg = chol @ chol.mT
            for n in group:
                lin = linears[n]
                W = lin.weight.detach().double()
                W_eff = torch.cholesky_solve((W @ cross).mT, chol).mT
                target = types.SimpleNamespace(weight=W_eff.float(), bias=lin.bias)
                d = fisher_svds([(n, target)], {n: reg}, output_fisher)[n]
                new, err = _allocated_layer(target, d, *plan[n], refit, rows)
                built[n] = new.to(lin.weight.dtype)
                set_submodule(module, n, built[n])
                total += err
        for b in range(len(comp_h)):
            use("dense")
            try:
                dense_h[b] = _block_call(block, dense_h[b], calls[i][b])
            finally:
                use("built")
            comp_h[b] = _block_call(block, comp_h[b], calls[i][b])
    return total


@torch.no_grad()
def one_shot_allocate(module, input_cov, output_fisher, kept_fraction, allow_name=None, block_name=None,
                      rank_multiple=8, refit=1, parts=("lowrank", "rows"), sequential=None, sequential_damp=0.8,
                      _svds=None):
    """STEP 1 + one-shot rows with one global budget: each layer gets its own rank and kept rows of S.

    Replaces the ``nn.Linear`` layers STEP 1 would replace by :class:`LinearLoSparse` layers (uncompacted: then
    :func:`prune` compacts them, or a Pruner goes on) whose stored parameters (``r (in + out)`` for L, R and
    ``in + 1`` per kept row of S, its index counted) add up to at most ``floor(kept_fraction * sum in * out)``,
    chosen to minimise the total weighted error ``sum_i F_i E[((W - W')_i x)^2]`` over all layers (the
    second-order loss increase, in the same units for every layer when ``output_fisher`` is given):

    * per layer the full SVD of ``D^1/2 W K`` (``C = K K^T`` from ``input_cov``, ``D = diag(F)`` from
      ``output_fisher``; either may be None: identity); the rank-r part is its truncated SVD, a kept row of S
      reproduces that row of W exactly;
    * the error of every (rank in multiples of ``rank_multiple``, number of kept rows) pair, the rows being the
      ones with the largest weighted residual; then the pairs are chosen across layers by a Lagrangian
      relaxation (one price per parameter) and the rest of the budget is spent greedily. A layer may get rank 0
      or keep every row;
    * ``refit`` times: L R refitted to the non-kept rows only (kept rows are exact), then the rows re-chosen on
      the new residual (the weighted error does not increase). Each rank-1 component of the result is balanced
      (``||L_:j|| = ||R_j:||``, the product unchanged) so that fine-tuning steps on L and R are evenly scaled.

    ``parts``: ``("lowrank", "rows")`` (LoSparse), ``("lowrank",)`` (low rank only, S absent) or ``("rows",)``
    (rows of W only, rank 0).

    ``sequential``: calibration batches (as for :func:`collect_input_covariance`, their padding left out as there;
    may be the same ones). Then, with the ranks and numbers of kept rows chosen as above, the layers are refitted
    block by block (a block: an entry of the ``nn.ModuleList`` holding them, e.g. ``model.layers.3``), each group of
    layers sharing an input in call order, to the original layers' outputs given the inputs the already compressed
    blocks produce (SVD-LLM's sequential update, extended to the rows of S): ``min (1 - a) E||W x - W' x~||^2 + a
    E||(W - W') x||^2`` (``a = sequential_damp`` in (0, 1]: 1 gives back the fit to the original inputs; the second
    term keeps the refit from overfitting the calibration tokens), solved exactly over the layer's form as the fit
    of ``W_eff = W N M^-1`` whitened by ``M = (1 - a) E[x~ x~^T] + a E[x x^T]`` (``N = (1 - a) E[x x~^T] + a E[x
    x^T]``; kept rows of S then hold rows of ``W_eff``). Costs about ten forward passes over the batches plus a
    second SVD per layer; memory: the hidden states entering the blocks, twice (original and compressed), in the
    model's dtype on its device (``2 * tokens * hidden * 2`` bytes in bfloat16: 4.3 GB for 128 x 2048 tokens of
    LLaMA-7B), and one group's three ``in x in`` float64 statistics with their two whitenings (the refit's and the
    SVD's: about a dozen ``in x in`` float64 matrices at the peak, 1.6 GB each for a 14336-wide input).

    Memory: with a dict ``input_cov`` the full SVDs of all layers are held at once (3x
    the weights); with an :class:`InputCovariances` (streaming) one group's statistics and SVDs at a time, and
    the error tables of all layers (``(min(in, out)/rank_multiple + 1) * (out + 1)`` float32 per layer, computed in
    float64: 8-23 MB per LLaMA-7B matrix, 2.8 GB of CPU memory for the model, freed once the allocation is chosen):
    each group is measured and decomposed twice, once for the tables and once (last group first) to build its
    layers; the result equals the one of the dict. On a GPU the SVDs (and ``K^-1``) wait in host memory as soon as
    each is computed, and the build moves one layer's back at a time: the GPU holds the weights, one group's
    statistics and one layer's decomposition.

    :return: ``{"budget", "stored", "total_entries", "weighted_error", "weighted_error_before_refit",
              "layers": [{"name", "rank", "kept_rows", "in_features", "out_features"}]}``.
    """
    if not 0 <= kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in [0, 1], got {kept_fraction!r}")
    parts = tuple(parts)
    if not parts or any(p not in ("lowrank", "rows") for p in parts):
        raise ValueError(f"parts must be a non-empty subset of ('lowrank', 'rows'), got {parts!r}")
    if rank_multiple < 1 or refit < 0:
        raise ValueError(f"rank_multiple must be >= 1 and refit >= 0, got {rank_multiple}, {refit}")
    if not 0 < sequential_damp <= 1:
        raise ValueError(f"sequential_damp must be in (0, 1], got {sequential_damp!r}")
    targets = linear_targets(module, allow_name, block_name)
    if not targets:
        raise ValueError(f"one_shot_allocate: no nn.Linear matches allow_name={allow_name}")
    names = [n for n, _ in targets]
    if sequential is not None:
        _blocks_of(module, names, "one_shot_allocate(sequential=...)")  # before the long work
    groups = [(names, None)] if input_cov is None else input_groups(input_cov, names, "one_shot_allocate")
    missing = [] if output_fisher is None else [n for n in names if n not in output_fisher]
    if missing:
        raise ValueError(f"one_shot_allocate: output_fisher has no statistics for {len(missing)} of the "
                         f"{len(targets)} layers to replace, e.g. {missing[:3]}")
    start = time.perf_counter()
    linears, rows = dict(targets), "rows" in parts
    stream = len(groups) > 1

    # on a GPU the decompositions wait in host memory (the tables are computed there; the build moves one layer's
    # back at a time): the GPU holds the weights, one group's statistics and one layer's decomposition
    store = "cpu" if targets[0][1].weight.is_cuda else None

    def decompose(group, source):
        if _svds is not None:
            return _svds
        covs = source(group) if callable(source) else source
        return fisher_svds([(n, linears[n]) for n in group], covs, output_fisher, store=store)

    tables, svds = {}, {}
    for group, source in groups:  # pass 1: the error table of every layer
        dec = decompose(group, source)
        for n in group:
            H, Win = linears[n].weight.shape
            q = dec[n]["S"].numel()
            ranks = (torch.unique(torch.cat([torch.arange(0, q, rank_multiple), torch.tensor([q])]))
                     if "lowrank" in parts else torch.zeros(1, dtype=torch.long))
            E, _ = allocation_table(dec[n]["U"].cpu(), dec[n]["S"].cpu(), ranks, rows, dtype=torch.float32)
            tables[n] = (E, ranks, H + Win, Win + 1)
        if not stream:
            svds = dec
        del dec
    total_entries = sum(m.weight.numel() for _, m in targets)
    budget = math.floor(kept_fraction * total_entries)
    choice, stored, lam = allocate([tables[n] for n in names], budget)
    choice = dict(zip(names, choice))
    before = sum(float(tables[n][0][j, k]) for n, (j, k) in choice.items())
    ranks_of = {n: tables[n][1] for n in names}
    del tables  # the error tables are not needed any more: freed before the build and the sequential refit
    after, layers, built = 0.0, {}, {}
    for group, source in reversed(groups):  # pass 2: build, last group first (the earlier inputs stay as measured)
        dec = decompose(group, source) if stream else svds
        for n in group:
            j, k = choice[n]
            r = int(ranks_of[n][j])
            layer, err = _allocated_layer(linears[n], dec[n], r, k, refit, rows)
            after += err
            set_submodule(module, n, layer)
            built[n] = layer
            H, Win = linears[n].weight.shape
            layers[n] = {"name": n, "rank": r, "kept_rows": int(k), "in_features": Win, "out_features": H}
        del dec
    layers = [layers[n] for n in names]
    info = {"budget": budget, "stored": stored, "total_entries": total_entries, "weighted_error": after,
            "weighted_error_before_refit": before, "layers": layers}
    if sequential is not None:
        seq_start = time.perf_counter()
        plan = {x["name"]: (x["rank"], x["kept_rows"]) for x in layers}
        was_training = module.training
        module.eval()
        try:
            info["weighted_error_sequential"] = _sequential_refit(module, linears, built, plan, sequential,
                                                                  output_fisher, refit, rows, sequential_damp)
        finally:
            module.train(was_training)
        logger.info("LoSparse sequential refit: %d layers, weighted error %.4g (against the original outputs, given "
                    "the compressed inputs), %.1f s", len(built), info["weighted_error_sequential"],
                    time.perf_counter() - seq_start)
    ranks = [x["rank"] for x in layers]
    logger.info("LoSparse one-shot allocation: %d layers, rank %d-%d, %d rows of S kept; %d stored parameters of "
                "a budget of %d (%.2f%% of %d); weighted error %.4g (%.4g before refit); %s%.1f s", len(layers),
                min(ranks), max(ranks), sum(x["kept_rows"] for x in layers), stored, budget,
                100 * stored / total_entries, total_entries, after, before,
                f"{len(groups)} streamed groups, " if stream else "", time.perf_counter() - start)
    return info
