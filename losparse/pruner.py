"""STEP 2 and 3: the PLATON ``Pruner`` and its cubic schedule (``cubic_schedule``).

``Pruner`` composes the schedule, the importance statistics (``losparse.importance``) and the distribution
(``losparse.distributed``); it masks the sparse matrices in place and never rebuilds modules.
"""
import torch

from .common import clean_name, logger
from .config import (PRUNER_NAMES, SCHEDULE_KEYS, STRUCTURED_DIRECTIONS, STRUCTURED_METHODS, config_get,
                     validate_losparse_args)
from .distributed import distribution_for, distribution_kind
from .importance import STAT_KINDS, Importance, Segment, reduce_scores, weighted_kth

ROW_COL_ROW_NAMES = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "query_proj", "key_proj", "value_proj")


def cubic_schedule(step, total_step, initial_threshold, final_threshold, initial_warmup, final_warmup, warmup_steps,
                   deltaT=1):
    """The paper's cubic schedule of the kept fraction of S: ``(threshold, mask_now)`` at ``step``.

    ``initial_threshold`` for the first ``initial_warmup * warmup_steps`` steps (no masking), then
    ``final + (initial - final) * (1 - progress) ** 3`` with masking every ``deltaT`` steps, and ``final_threshold``
    (masking every step) for the last ``final_warmup * warmup_steps`` steps of ``total_step``.
    """
    ti = initial_warmup * warmup_steps
    tf = final_warmup * warmup_steps
    if step <= ti:
        return initial_threshold, False
    if step > total_step - tf:
        return final_threshold, True
    mul_coeff = 1 - (step - ti) / (total_step - ti - tf)
    threshold = final_threshold + (initial_threshold - final_threshold) * (mul_coeff ** 3)
    return threshold, step % deltaT == 0


class Pruner(object):
    """PLATON pruner of the sparse matrices (STEP 2; drive it with :meth:`update_and_pruning`, STEP 3).

    Reads ``beta1, beta2, deltaT, initial_threshold, final_threshold, initial_warmup, final_warmup,
    warmup_steps`` from ``args`` (a Namespace or a mapping). ``structured_method`` is ``mean|sum|max|min`` or
    None / ``"none"`` (unstructured); ``structured_direction`` is ``row|col|row_col``.

    With ``beta2 == 1`` and ``mean``/``sum`` aggregation (the paper's setting) only per-row (per-column)
    statistics are kept: the mean of an EMA is the EMA of the mean, so scores and masks are those of the
    element-wise computation, without full-size copies of S. The threshold is the k-th smallest of the
    element-wise scores, found from the aggregated scores weighted by their multiplicity.

    FSDP2 (parameters and gradients are ``DTensor`` row shards): statistics are kept for the local rows; column
    sums are all-reduced; at a mask step the aggregated scores of all ranks (with their multiplicities) are
    all-gathered, every rank finds the same global threshold as one process would, and masks its own rows.
    ``state_dict`` gathers the statistics into the single-process layout (a collective: call it on every rank).

    ``keep_zero_rows=True`` (new; off by default, as the original): the rows of S that are entirely zero when the
    Pruner is built stay zero for the whole run, re-zeroed at every :meth:`update_and_pruning` call (after the
    optimizer step that may have regrown them). For S pruned before training (a one-shot allocation,
    :func:`losparse.one_shot_allocate` / :func:`losparse.one_shot_rows`): the kept fraction never rises above what
    was allocated, also during the warm-up steps that do not mask, and PLATON's scores of those rows stay zero, so
    it prunes on from the allocated rows. The rows are part of :meth:`state_dict`.
    """

    def __init__(self, model, args, total_step, tb_writer=None, mask_param_name=None, non_mask_name=None,
                 use_no_mask=False, pruner_name="PLATON", structured_method="mean", structured_direction="row",
                 keep_zero_rows=False):
        if structured_method in ("none", "None", ""):
            structured_method = None
        if pruner_name not in PRUNER_NAMES:
            raise ValueError(f"pruner_name must be one of {PRUNER_NAMES}, got {pruner_name!r}")
        if structured_method is not None and structured_method not in STRUCTURED_METHODS:
            raise ValueError(f"structured_method must be one of {STRUCTURED_METHODS} or None, got {structured_method!r}")
        if structured_direction not in STRUCTURED_DIRECTIONS:
            raise ValueError(f"structured_direction must be one of {STRUCTURED_DIRECTIONS}, got {structured_direction!r}")
        self.model = model
        self.args = args
        self.config = {k: config_get(args, k) for k in SCHEDULE_KEYS}
        missing = [k for k, v in self.config.items() if v is None]
        if missing:
            raise ValueError(f"Pruner: args lacks {missing} (use utils.add_losparse_args)")
        validate_losparse_args(args, total_step=total_step, check_all=False)
        self.mask_param_name = ["sparse"] if mask_param_name is None else list(mask_param_name)
        self.non_mask_name = ["embedding", "norm"] if non_mask_name is None else list(non_mask_name)
        self.use_no_mask = use_no_mask
        self.total_step = int(total_step)
        self.tb_writer = tb_writer
        self.pruner_name = pruner_name
        self.beta1 = float(self.config["beta1"])
        self.beta2 = float(self.config["beta2"])
        self.deltaT = int(self.config["deltaT"])
        self.structured_method = structured_method
        self.structured_direction = structured_direction
        # Statistics per (unwrapped) parameter name; reduced to rows/columns on the fast path.
        self.reduced = pruner_name == "PLATON" and self.beta2 == 1.0 and structured_method in ("mean", "sum")
        self._stats = Importance(self.beta1, self.beta2)
        self._weights = None  # (layout, the multiplicities of every rank's scores or None, their sum)
        self._nonfinite = None  # device counter of skipped updates (read only at mask steps: no sync)
        self._nonfinite_reported = 0
        self._frozen_reported = set()
        self._dist = distribution_for(model.named_parameters(), self.whether_mask_para)
        self.keep_zero_rows = bool(keep_zero_rows)
        self._zero_rows, self._zero_rows_local = {}, None  # name -> rows to hold at zero (all of them; this rank's)
        if self.keep_zero_rows:
            self._zero_rows = self._find_zero_rows(model)

    # The statistics (views of the flat buffers), by parameter name.
    ipt = property(lambda self: self._stats.views["ipt"])
    exp_avg_ipt = property(lambda self: self._stats.views["exp_avg_ipt"])
    exp_avg_unc = property(lambda self: self._stats.views["exp_avg_unc"])

    # -- which parameters, which axis -----------------------------------------------------------------
    def whether_mask_para(self, n):
        if not self.use_no_mask:
            return any(nd in n for nd in self.mask_param_name)
        return not any(nd in n for nd in self.non_mask_name)

    def _masked_params(self, model):
        """The masked matrices that train. A frozen one (``requires_grad=False``) has no importance score: it is
        left out of the budget and of the masking (said once in the log)."""
        params, frozen = [], []
        for n, p in model.named_parameters():
            n = clean_name(n)
            if self.whether_mask_para(n):
                (params if p.requires_grad else frozen).append((n, p))
        new = sorted({n for n, _ in frozen} - self._frozen_reported)
        if new:
            logger.info("Pruner: %d frozen matrices (requires_grad=False) are not pruned and not counted in the "
                        "budget: %s", len(new), ", ".join(new[:10]) + (" ..." if len(new) > 10 else ""))
            self._frozen_reported.update(new)
        return params

    def _axis(self, name, p):
        """Dimension that is reduced: 1 -> one score per row, 0 -> per column, None -> element-wise."""
        if self.structured_method is None or p.dim() != 2:
            return None
        direction = self.structured_direction
        if direction == "row_col":
            parts = name.split(".")  # "<...>.query.sparse.weight" -> "query"
            parts = parts[:-2] if parts[-2:] == ["sparse", "weight"] else parts[:-1]
            direction = "row" if parts and parts[-1] in ROW_COL_ROW_NAMES else "col"
        return 1 if direction == "row" else 0

    def _stat_axis(self, name, p):
        """The axis the statistics of ``p`` are reduced along (None: kept per entry)."""
        return self._axis(name, p) if self.reduced else None

    def _follow_distribution(self, params):
        """Pick the distribution again if the parameters were sharded (or torch.distributed started) since."""
        if distribution_kind(params) is not type(self._dist):
            self._dist = distribution_for(params)

    # -- schedule -------------------------------------------------------------------------------------
    def schedule_threshold_comb(self, step: int):
        """Cubic schedule of the kept fraction of S; returns ``(threshold, mask_now)`` (see :func:`cubic_schedule`)."""
        c = self.config
        return cubic_schedule(step, self.total_step, c["initial_threshold"], c["final_threshold"],
                              c["initial_warmup"], c["final_warmup"], c["warmup_steps"], self.deltaT)

    cubic_remaining_ratio = schedule_threshold_comb

    # -- importance -----------------------------------------------------------------------------------
    def _ensure_stats(self, params):
        """Lay out the statistics for ``params`` (name, parameter) (see :class:`Importance`)."""
        self._follow_distribution(params)
        entries = []
        for n, p in params:
            t, axis = self._dist.local(p), self._stat_axis(n, p)  # FSDP2: the local rows; p.shape is the global one
            shape = (t.shape[1 - axis],) if axis is not None else tuple(t.shape)
            entries.append((n, axis, shape, 1 if axis is None else p.shape[axis], self._dist.splits(p), t.device))
        self._stats.ensure(entries, mean_of=self.reduced and self.structured_method == "mean")

    def _measure(self, group, params, grads):
        """Write this step's importance ``|S * G|`` (its L1 norm per row/column when reduced) of every matrix of
        ``group`` into ``group.cur``. Returns which entries have a gradient (None: all)."""
        cur, present = group.cur, None
        for s, out in zip(group.segments, group.cur_views):
            if s.name not in grads:  # no gradient this step (unused branch): leave this matrix's statistics alone
                present = torch.ones_like(cur, dtype=torch.bool) if present is None else present
                present[s.offset:s.offset + s.size] = False
                out.zero_()
                continue
            prod = torch.mul(params[s.name], grads[s.name])
            if s.axis is None:
                torch.abs(prod, out=out)
            else:  # sum_j |s_ij| (or over i), accumulated in float32
                torch.linalg.vector_norm(prod, 1, dim=s.axis, dtype=torch.float32, out=out)
        self._dist.sum_columns(cur, group.segments)  # FSDP2: a column's sum over the rows of every rank
        if group.scale is not None:
            cur.mul_(group.scale)
        return present

    def _all_finite(self):
        """Whether this step's importance is finite everywhere (on every rank); counts the skipped steps."""
        curs = [g.cur for g in self._stats.groups]
        finite = torch.isfinite(curs[0]).all()
        for cur in curs[1:]:
            finite = finite & torch.isfinite(cur).all().to(finite.device)
        finite = self._dist.all_finite(finite)  # FSDP2: skip the update on every rank if any rank saw inf/nan
        if self._nonfinite is None:
            self._nonfinite = torch.zeros((), dtype=torch.long, device=finite.device)
        self._nonfinite += (~finite).long()
        return finite

    @torch.no_grad()
    def update_ipt_with_local_window(self, model, global_step):
        """Accumulate ``|p * grad|`` over the window; at its start, fold the last window into the EMA."""
        if self.pruner_name == "Magnitude":
            return  # the score is |p| at mask time
        masked = self._masked_params(model)
        grads = {n: p.grad for n, p in masked if p.grad is not None}
        if not grads:
            if masked:
                raise RuntimeError(
                    "Pruner.update_and_pruning: no sparse parameter has a gradient. Call it after "
                    "loss.backward()/optimizer.step() and before optimizer.zero_grad(); under DeepSpeed ZeRO or "
                    "FSDP1 gradients are sharded, which LoSparse does not support (see check_distributed_support).")
            return
        self._ensure_stats(masked)
        params = {n: self._dist.local(p) for n, p in masked}
        grads = {n: self._dist.local(g) for n, g in grads.items()}
        presents = [self._measure(g, params, grads) for g in self._stats.groups]
        self._stats.fold(global_step % self.deltaT, global_step // self.deltaT, self._all_finite(), presents)

    # -- masking --------------------------------------------------------------------------------------
    def _layout_scores(self, params):
        """``(scores, segments, drop buffer)`` straight from the flat statistics, when their only group holds
        ``params`` in order and needs no aggregation (the reduced path, unstructured PLATON); else None."""
        if self.pruner_name == "Magnitude" or not (self.reduced or self.structured_method is None):
            return None
        self._ensure_stats(params)
        groups = self._stats.groups
        if len(groups) != 1 or [s.name for s in groups[0].segments] != [n for n, _ in params]:
            return None
        g = groups[0]
        scores = self._stats.scores(g)
        scores = scores.clone() if scores is g.flat["exp_avg_ipt"] else scores  # DDP's broadcast writes into it
        return scores, g.segments, g

    def _element_scores(self, n, p, flat_scores):
        """The scores of ``p`` as this rank holds them: from the statistics (``flat_scores``: name -> its group's
        scores), or ``|p|`` for Magnitude."""
        if self.pruner_name == "Magnitude":
            return self._dist.local(p).detach().abs().float()
        s = self._stats.segments.get(n)
        if s is None:  # never scored
            t, axis = self._dist.local(p), self._stat_axis(n, p)
            return torch.zeros(t.shape[1 - axis] if axis is not None else t.shape, device=t.device)
        return flat_scores[n][s.offset:s.offset + s.size].view(s.shape)

    def _aggregated_scores(self, params):
        """``(scores, segments)``: one score per row/column (or entry) of every matrix, concatenated in order."""
        device = self._dist.local(params[0][1]).device
        flat_scores = {}
        if self.pruner_name != "Magnitude":
            self._ensure_stats(params)
            for g in self._stats.groups:
                scores = self._stats.scores(g)
                flat_scores.update({s.name: scores for s in g.segments})
        per, segments, offset = [], [], 0
        for n, p in params:
            score, axis = self._element_scores(n, p, flat_scores), self._axis(n, p)
            if axis is not None and score.dim() == 2:  # aggregate the entries of each row (column)
                score = reduce_scores(score, self.structured_method, 1) if axis == 1 else \
                    self._dist.columns(score, self.structured_method, p)
            shape = tuple(score.shape) if axis is None else (score.numel(),)
            segments.append(Segment(n, axis, shape, offset, score.numel(), 1 if axis is None else p.shape[axis],
                                     self._dist.splits(p)))
            offset += score.numel()
            per.append(score.reshape(-1).float().to(device))
        return torch.cat(per), segments

    def _weights_for(self, segments, device):
        """``(weights, total)`` of :meth:`Local.multiplicities`; the same at every mask step: built (and gathered)
        once per layout."""
        key = (tuple((s.size, s.mult, s.split) for s in segments), device, type(self._dist))
        if self._weights is None or self._weights[0] != key:
            self._weights = (key, *self._dist.multiplicities(segments, device))
        return self._weights[1], self._weights[2]

    def _report_nonfinite(self):
        if self._nonfinite is not None:
            skipped = int(self._nonfinite)
            if skipped > self._nonfinite_reported:
                logger.warning("Pruner: %d update(s) with non-finite gradients were skipped so far", skipped)
                self._nonfinite_reported = skipped

    @torch.no_grad()
    def mask_with_threshold(self, model, threshold):
        """Zero the lowest-scoring rows (entries) so that a fraction ``threshold`` of S is kept."""
        params = self._masked_params(model)
        if not params:
            return None
        self._follow_distribution(params)
        laid_out = self._layout_scores(params)
        scores, segments, group = laid_out if laid_out is not None else (*self._aggregated_scores(params), None)
        scores = self._dist.agree(scores)  # DDP: rank 0's scores
        self._report_nonfinite()
        weights, total = self._weights_for(segments, scores.device)
        mask_threshold = weighted_kth(self._dist.gather(scores.float()), int(total * (1 - threshold)), weights)
        if group is not None:  # the drop masks straight into the reused buffer
            torch.lt(scores, mask_threshold, out=group.drop)
            drops = group.drop_views
        else:
            drop = scores < mask_threshold
            drops = [s.view(drop) for s in segments]
        for (_, p), d in zip(params, drops):
            p = self._dist.local(p)
            p.masked_fill_(d.to(p.device), 0.0)
        return mask_threshold

    # -- rows held at zero (keep_zero_rows) -----------------------------------------------------------
    @torch.no_grad()
    def _find_zero_rows(self, model):
        """``{name: bool (rows,)}`` (CPU, every row of the matrix): the rows of each masked matrix that are all zero."""
        found = {}
        for n, p in self._masked_params(model):
            if p.dim() != 2:
                continue
            rows = (self._dist.local(p) == 0).all(dim=1).to(torch.uint8)  # uint8: gloo gathers no bool
            rows = self._dist.whole_rows(rows, p).bool().cpu()  # FSDP2: every rank's rows (a collective)
            if bool(rows.any()):
                found[n] = rows
        logger.info("Pruner: keep_zero_rows: %d rows of %d matrices stay zero",
                    sum(int(rows.sum()) for rows in found.values()), len(found))
        return found

    @torch.no_grad()
    def _hold_zero_rows(self, model):
        """Zero again the rows of :meth:`_find_zero_rows` (this rank's part of them), in place."""
        params = dict(self._masked_params(model))
        if self._zero_rows_local is None:  # on the parameters' devices, this rank's rows, once
            self._zero_rows_local = {}
            for n, rows in self._zero_rows.items():
                if n in params:
                    local = self._dist.local(params[n])
                    own = self._dist.own(rows, params[n], 1).to(local.device)
                    self._zero_rows_local[n] = own[:, None]
        for n, rows in self._zero_rows_local.items():
            self._dist.local(params[n]).masked_fill_(rows, 0.0)

    def update_and_pruning(self, model, global_step):
        """STEP 3: call after ``optimizer.step()`` and before ``zero_grad()``; returns ``(threshold, mask_threshold)``.

        ``mask_threshold`` is None on steps that do not mask.
        """
        if self._zero_rows:  # keep_zero_rows: what the step regrew there is zeroed before it is scored
            self._hold_zero_rows(model)
        self.update_ipt_with_local_window(model, global_step)
        threshold, mask_ind = self.schedule_threshold_comb(global_step)
        mask_threshold = self.mask_with_threshold(model, threshold) if mask_ind else None
        if self.tb_writer is not None:
            self.tb_writer.add_scalar("losparse/threshold", threshold, global_step)
            if mask_threshold is not None:
                self.tb_writer.add_scalar("losparse/mask_threshold", mask_threshold, global_step)
        return threshold, mask_threshold

    # -- state ----------------------------------------------------------------------------------------
    def _layout(self):
        layout = {"pruner_name": self.pruner_name, "reduced": self.reduced, "beta2": self.beta2,
                  "structured_method": self.structured_method, "structured_direction": self.structured_direction}
        if self.keep_zero_rows:  # (absent otherwise: the original layout)
            layout["keep_zero_rows"] = True
        return layout

    def state_dict(self):
        """Every statistic and counter, so that a resumed run is bit-exact.

        FSDP2: the rows of every rank are gathered, so the layout is that of one process (call it on every rank).
        """
        state = {"layout": self._layout(), **self._stats.state_dict(self._dist.full),
                 "nonfinite_steps": 0 if self._nonfinite is None else int(self._nonfinite),
                 "nonfinite_reported": self._nonfinite_reported}
        if self.keep_zero_rows:
            state["zero_rows"] = {n: rows.clone() for n, rows in self._zero_rows.items()}
        return state

    def load_state_dict(self, state_dict):
        layout = state_dict.get("layout", {})
        if layout != self._layout():
            raise ValueError(f"Pruner.load_state_dict: saved with {layout}, this pruner is {self._layout()}; "
                             "use the same --pruner_name/--beta2/--structured_method/--structured_direction (and "
                             "keep_zero_rows)")
        if self.keep_zero_rows:
            self._zero_rows = {n: rows.bool().cpu().clone() for n, rows in state_dict["zero_rows"].items()}
            self._zero_rows_local = None
        masked = self._masked_params(self.model) if self.model is not None else []
        values = {kind: dict(state_dict[kind]) for kind in STAT_KINDS}
        if masked:
            self._follow_distribution(masked)
        for n, p in masked:  # FSDP2: keep this rank's rows of the (single-process layout) statistics
            for kind in self._stats.kinds:
                if n in values[kind]:
                    values[kind][n] = self._dist.own(values[kind][n], p, self._stat_axis(n, p))
        self._stats.load(values)  # kept as plain tensors until laid out next to the parameters
        self._nonfinite = torch.tensor(int(state_dict.get("nonfinite_steps", 0)))
        self._nonfinite_reported = int(state_dict.get("nonfinite_reported", 0))
        if masked and self.pruner_name != "Magnitude":
            self._ensure_stats(masked)
        if masked:
            self._nonfinite = self._nonfinite.to(masked[0][1].device)
