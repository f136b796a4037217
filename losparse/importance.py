"""PLATON's importance statistics and the scoring maths the ``Pruner`` composes.

``Importance`` keeps ``ipt``, its EMA and uncertainty in flat float32 buffers (one segment per masked matrix,
``Segment``); ``reduce_scores`` aggregates entries per row or column; ``weighted_kth`` finds the global threshold
from aggregated scores with their multiplicities. Tensors in, tensors out: no model, no process group.
"""
import collections
import math

import torch

STAT_KINDS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def weighted_kth(scores, k, weights=None):
    """The ``k``-th smallest (1-based) of the multiset in which ``scores[i]`` occurs ``weights[i]`` times (once each
    when ``weights`` is None); ``-inf`` when ``k <= 0``. A row score that stands for the ``n`` entries of its row has
    weight ``n``: the result is the k-th smallest element-wise score, without expanding the rows."""
    if k <= 0:
        return float("-inf")
    if weights is None:
        return torch.kthvalue(scores, k)[0].item()
    sorted_scores, order = scores.sort()
    cum = weights[order].cumsum(0)
    pos = torch.searchsorted(cum, torch.tensor([float(k)], dtype=cum.dtype, device=cum.device))
    return sorted_scores[pos.clamp(max=sorted_scores.numel() - 1)].item()


def reduce_scores(score, method, dim):
    """Aggregate element scores along ``dim`` (``mean|sum|max|min``)."""
    if method == "mean":
        return score.mean(dim=dim)
    if method == "sum":
        return score.sum(dim=dim)
    return score.amax(dim=dim) if method == "max" else score.amin(dim=dim)


class Segment(collections.namedtuple("Segment", "name axis shape offset size mult split")):
    """One masked matrix's place in a flat score tensor: ``name``; ``axis`` (1: a score per row, 0: per column,
    None: per entry); ``shape`` of its scores on this rank; ``offset``/``size`` in the flat tensor; ``mult``, the
    entries each score stands for; ``split``, whether the matrix's rows are spread over the ranks (FSDP2)."""
    __slots__ = ()

    def view(self, flat):
        """This matrix's part of ``flat`` shaped like its scores, the reduced axis kept (size 1) to broadcast."""
        v = flat[self.offset:self.offset + self.size].view(self.shape)
        return v if self.axis is None else v.unsqueeze(self.axis)


def expand_counts(segments, counts, device):
    """One float64 weight per score: ``counts[i]`` for each score of ``segments[i]``."""
    return torch.cat([torch.full((s.size,), float(c), dtype=torch.float64, device=device)
                      for s, c in zip(segments, counts)] or [torch.zeros(0, dtype=torch.float64, device=device)])


class _StatGroup:
    """The flat statistics of the masked matrices on one device, and the buffers a step reuses."""

    def __init__(self, device, segments, kinds, scale):
        total = sum(s.size for s in segments)
        self.device, self.segments, self.scale = device, segments, scale
        self.flat = {kind: torch.zeros(total, dtype=torch.float32, device=device) for kind in kinds}
        self.cur = torch.empty(total, dtype=torch.float32, device=device)  # this step's |S * G|, reused every step
        self.drop = torch.empty(total, dtype=torch.bool, device=device)  # the mask step's rows (entries) to zero
        self.cur_views = [self.cur[s.offset:s.offset + s.size].view(s.shape) for s in segments]
        self.drop_views = [s.view(self.drop) for s in segments]


class Importance:
    """PLATON's importance statistics of the masked matrices, by (unwrapped) parameter name.

    ``ipt``: the mean of ``|S * G|`` over the current window of ``deltaT`` steps; ``exp_avg_ipt``: its EMA over the
    windows (``beta1``); ``exp_avg_unc``: the EMA of the uncertainty ``|ipt - exp_avg_ipt|`` (``0 < beta2 < 1``) or
    the running variance (``beta2 == 2``). Per row or column (``axis``) on the reduced path, per entry otherwise.
    They live in one flat float32 tensor per device and kind, one segment per matrix: a window step is two kernels
    per matrix (``S * G`` and its L1 norm written straight into the segment) plus a handful for all matrices together
    (EMA, window average, the non-finite guard); on a GPU each op is a launch. ``views[kind][name]`` are views of
    the segments (plain tensors after ``load``, until the next :meth:`ensure` lays them out).
    """

    def __init__(self, beta1, beta2):
        self.beta1, self.beta2 = beta1, beta2
        self.kinds = ("ipt", "exp_avg_ipt") + (("exp_avg_unc",) if beta2 > 0 and beta2 != 1 else ())
        self.views = {kind: {} for kind in STAT_KINDS}
        self.groups, self.segments, self._key = [], {}, None

    def ensure(self, entries, mean_of):
        """(Re)build the flat statistics for ``entries`` ``(name, axis, shape, mult, split, device)``, keeping the
        values of known names. ``mean_of``: divide row (column) sums by the row (column) length."""
        key = tuple(entries)
        if key == self._key:
            return
        old = {kind: {n: t.detach() for n, t in self.views[kind].items()} for kind in self.kinds}
        by_device = {}
        for entry in entries:
            by_device.setdefault(entry[-1], []).append(entry)
        self.groups, self.segments = [], {}
        self.views = {kind: {} for kind in STAT_KINDS}
        for device, items in by_device.items():
            segments, total = [], 0
            for n, axis, shape, mult, split, _ in items:
                segments.append(Segment(n, axis, shape, total, math.prod(shape), mult, split))
                total += math.prod(shape)
            scale = None
            if mean_of:  # the L1 norm is a sum: divide by the length
                scale = torch.cat([torch.full((s.size,), 1.0 / s.mult, device=device) for s in segments])
            group = _StatGroup(device, segments, self.kinds, scale)
            for kind in self.kinds:
                for s in segments:
                    view = group.flat[kind][s.offset:s.offset + s.size].view(s.shape)
                    if s.name in old[kind] and old[kind][s.name].numel() == s.size:
                        view.copy_(old[kind][s.name].reshape(s.shape))
                    self.views[kind][s.name] = view
            self.segments.update({s.name: s for s in segments})
            self.groups.append(group)
        self._key = key

    def fold(self, local_step, update_step, finite, presents):
        """Add each group's ``cur`` to the window average; at a window's start (``local_step == 0``) fold the last
        window into the EMA first. Entries with ``present`` False (no gradient) and, if not ``finite``, every entry
        keep their values."""
        b1, b2 = self.beta1, self.beta2
        for g, present in zip(self.groups, presents):
            cur = g.cur
            ok = finite.to(cur.device) if present is None else present & finite.to(cur.device)
            ipt, avg = g.flat["ipt"], g.flat["exp_avg_ipt"]
            if local_step == 0:
                new_avg = b1 * avg + (1 - b1) * ipt
                if "exp_avg_unc" in g.flat:
                    unc = g.flat["exp_avg_unc"]
                    if 0 < b2 < 1:
                        unc.copy_(torch.where(ok, b2 * unc + (1 - b2) * (ipt - new_avg).abs(), unc))
                    elif b2 == 2:
                        unc.copy_(torch.where(ok, (update_step * unc + (ipt - new_avg) ** 2) / (update_step + 1), unc))
                avg.copy_(torch.where(ok, new_avg, avg))
                ipt.copy_(torch.where(ok, cur, ipt))
            else:
                ipt.copy_(torch.where(ok, (ipt * local_step + cur) / (local_step + 1), ipt))

    def scores(self, g):
        """PLATON's scores of group ``g`` (element-wise, or per row/column when reduced)."""
        avg, b2 = g.flat["exp_avg_ipt"], self.beta2
        if 0 < b2 < 1:
            return avg * g.flat["exp_avg_unc"]
        if b2 == 1:
            return avg
        if b2 == 2:
            return avg * g.flat["exp_avg_unc"].sqrt()
        return avg * (g.flat["ipt"] - avg).abs()

    def state_dict(self, full):
        """``{kind: {name: tensor}}`` (CPU copies); ``full(tensor, segment)`` turns a rank's part into the whole."""
        return {kind: {n: full(t.detach(), self.segments.get(n)).cpu().clone() for n, t in self.views[kind].items()}
                for kind in STAT_KINDS}

    def load(self, values):
        """Take ``{kind: {name: tensor}}`` as they are; the next :meth:`ensure` lays them out."""
        self.views = {kind: dict(values[kind]) for kind in STAT_KINDS}
        self.groups, self.segments, self._key = [], {}, None
