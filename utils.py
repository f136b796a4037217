"""LoSparse: low-rank + structured-sparse compression of ``nn.Linear`` layers (ICML 2023).

One drop-in module, in reading order:

1. decomposition      ``low_rank_decomposition``
2. the layer          ``LinearLoSparse`` (forward, compaction, parameter count)
3. the walker         ``substitute_layer_weights``, ``prune``
4. the pruner         ``Pruner`` (cubic schedule, PLATON importance, masking, ``state_dict``)
5. checkpoint I/O     ``load_checkpoint``, ``save_checkpoint``, ``export_compact``, ``load_compact``,
   and reporting      ``compression_report``
6. argparse helper    ``add_losparse_args``, ``validate_losparse_args``

The three hooks of the original README::

    utils.substitute_layer_weights(model, allow_name, block_name, parameter_ratio=0.05)     # STEP 1
    pruner = utils.Pruner(model, args, total_step=args.max_train_steps)                   # STEP 2
    threshold, mask_threshold = pruner.update_and_pruning(model, completed_steps)          # STEP 3

Public names, signatures and state-dict keys (``left.weight``, ``right.weight``, ``sparse.weight``,
``bias``, ``sparse_weight_pruned``) are those of the original code; differences are listed in README.md.
"""
import argparse
import json
import logging
import math
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("losparse")

__all__ = [
    "low_rank_decomposition", "LinearLoSparse", "substitute_layer_weights", "prune", "Pruner",
    "load_checkpoint", "save_checkpoint", "export_compact", "load_compact", "compression_report",
    "CompressionReport", "CheckpointMismatchError", "add_losparse_args", "validate_losparse_args",
    "check_distributed_support",
]

SVD_METHODS = ("full", "randomized", "auto")
REMOVE_CRITERIA = ("max_eigenvalue", "min_eigenvalue", "random")
LOG_LEVELS = ("IGNORE", "INFO", "DEBUG")


# ----------------------------------------------------------------------------------------------------
# 1. Decomposition
# ----------------------------------------------------------------------------------------------------
def _reduced_rank(H, W, parameter_ratio=None, rank_ratio=0.1, rank=None):
    """``ceil(parameter_ratio * H * W / (H + W))`` (or ``ceil(rank * rank_ratio)``), clamped to ``[1, min(H, W)]``."""
    if parameter_ratio is not None:
        r = math.ceil(parameter_ratio * H * W / (H + W))
    else:
        r = math.ceil((min(H, W) if rank is None else rank) * rank_ratio)
    return max(1, min(int(r), min(H, W)))


def _use_randomized(svd, H, W, r, oversample):
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    if svd == "auto":
        return 4 * (r + oversample) <= min(H, W)
    return svd == "randomized"


def low_rank_decomposition(weight, rank_ratio=0.1, parameter_ratio=0.15, remove_criteria="max_eigenvalue",
                           log_level="INFO", return_dict=False, svd="full", niter=4, oversample=None):
    """Truncated SVD ``weight ≈ L @ R`` with the singular values split as ``sqrt`` into both factors.

    :param weight:          2-D tensor (H, W); decomposed in float32 on its own device, whatever its dtype.
    :param rank_ratio:      reduced_rank / rank(weight); used only when ``parameter_ratio`` is None.
    :param parameter_ratio: (H + W) * r / (H * W); ``r = ceil(parameter_ratio * H * W / (H + W))``.
    :param remove_criteria: ``max_eigenvalue`` (keep the r largest), ``min_eigenvalue`` (the r smallest) or
                            ``random`` (r distinct random singular triplets).
    :param log_level:       ``IGNORE`` | ``INFO`` | ``DEBUG``; details go to the ``losparse`` logger at DEBUG.
    :param return_dict:     return ``{"L", "R", "U", "S", "Vh", "reduced_rank"}`` instead of ``(L, R)``.
    :param svd:             ``full`` (exact, ``torch.linalg.svd``), ``randomized`` (``torch.svd_lowrank`` with
                            ``oversample`` extra columns and ``niter`` power iterations) or ``auto``
                            (randomized when ``4 * (r + oversample) <= min(H, W)``). Only ``max_eigenvalue`` can
                            use the randomized SVD; the others always use the full one.
    :return: ``(L, R)`` in float32, or the dict.
    """
    if weight.dim() != 2:
        raise ValueError(f"low_rank_decomposition supports 2-D matrices only, got shape {tuple(weight.shape)}")
    if remove_criteria not in REMOVE_CRITERIA:
        raise ValueError(f"remove_criteria must be one of {REMOVE_CRITERIA}, got {remove_criteria!r}")
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {log_level!r}")
    H, W = weight.shape
    A = weight.detach().to(torch.float32)
    r = _reduced_rank(H, W, parameter_ratio, rank_ratio) if parameter_ratio is not None else None
    oversample = max(10, (r or 0) // 2) if oversample is None else oversample

    if r is not None and remove_criteria == "max_eigenvalue" and _use_randomized(svd, H, W, r, oversample):
        q = min(r + oversample, min(H, W))
        U, S, V = torch.svd_lowrank(A, q=q, niter=niter)
        Vh = V.mT
        method = "randomized"
    else:
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        method = "full"
        if r is None:
            r = _reduced_rank(H, W, None, rank_ratio, rank=int(torch.count_nonzero(S)))

    if remove_criteria == "max_eigenvalue":
        idx = torch.arange(r, device=A.device)
    elif remove_criteria == "min_eigenvalue":
        idx = torch.arange(S.numel() - r, S.numel(), device=A.device)
    else:
        idx = torch.tensor(sorted(random.sample(range(S.numel()), r)), device=A.device)
    sqrt_s = S[idx].sqrt()
    L = U[:, idx] * sqrt_s
    R = sqrt_s[:, None] * Vh[idx]

    if log_level != "IGNORE":
        logger.debug("SVD (%s) of %dx%d -> rank %d, %d parameters", method, H, W, r, r * (H + W))
    if return_dict:
        return {"L": L, "R": R, "U": U, "S": S, "Vh": Vh, "reduced_rank": r}
    return L, R


# ----------------------------------------------------------------------------------------------------
# 2. The layer
# ----------------------------------------------------------------------------------------------------
class LinearLoSparse(nn.Module):
    """``y = x (L R + S)^T + b`` with ``left`` = L (out x r), ``right`` = R (r x in), ``sparse`` = S (out x in).

    After :meth:`prune_sparse` the dense ``sparse`` is dropped and only its nonzero rows are kept
    (``sparse_weight_pruned``, k x in, at output positions ``nonzero_idx``), so memory and FLOPs scale with k.
    """

    def __init__(self, in_feature, out_feature, reduced_rank, has_bias=True, has_sparse=True, device=None,
                 dtype=None):
        super().__init__()
        self.in_feature = in_feature
        self.out_feature = out_feature
        self.reduced_rank = reduced_rank
        self.has_bias = has_bias
        self.has_sparse = has_sparse
        kw = {"device": device, "dtype": dtype}
        self.right = nn.Linear(in_feature, reduced_rank, bias=False, **kw)
        self.left = nn.Linear(reduced_rank, out_feature, bias=False, **kw)
        if has_sparse:
            self.sparse = nn.Linear(in_feature, out_feature, bias=False, **kw)
        if has_bias:
            self.bias = nn.Parameter(torch.zeros(out_feature, **kw))
        else:
            self.register_parameter("bias", None)
        self.register_parameter("sparse_weight_pruned", None)  # set by prune_sparse: kept rows of S (k x in)
        self.register_buffer("nonzero_idx", None)  # their row indices (k)

    # -- shapes ---------------------------------------------------------------------------------------
    @property
    def is_compacted(self):
        return self.sparse_weight_pruned is not None

    @property
    def kept_rows(self):
        """Number of rows of S that carry a nonzero entry (what compaction keeps)."""
        if not self.has_sparse:
            return 0
        if self.is_compacted:
            return int(self.sparse_weight_pruned.shape[0])
        return int((self.sparse.weight != 0).any(dim=1).sum())

    def num_parameters(self, compact=True):
        """Parameters of L, R, the kept rows of S and the bias (``compact=False``: with the dense S)."""
        n = self.reduced_rank * (self.in_feature + self.out_feature) + (self.out_feature if self.has_bias else 0)
        if self.has_sparse:
            n += (self.kept_rows if compact or self.is_compacted else self.out_feature) * self.in_feature
        return n

    def extra_repr(self):
        rows = f"{self.kept_rows}/{self.out_feature}" if self.has_sparse else "none"
        return (f"in_features={self.in_feature}, out_features={self.out_feature}, rank={self.reduced_rank}, "
                f"sparse_rows={rows}{', compacted' if self.is_compacted else ''}, bias={self.has_bias}")

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x):
        """Y = X (LR)^T + X S^T + B. The bias rides in the GEMM epilogue, so autocast keeps one dtype.

        Compacted, the cost is that of the parameters: ``X [R; S_kept]^T`` is one GEMM (x is read once)
        when x has at least ``r + k`` rows (below that, copying the weights together costs more than
        reading x twice), then ``H L^T + B`` and an in-place ``index_add_`` of the k sparse columns into
        the output's last (contiguous) dimension. No state depends on the input shape; nothing is cached.
        """
        if not self.has_sparse:
            return F.linear(self.right(x), self.left.weight, self.bias)
        if not self.is_compacted:
            return F.linear(self.right(x), self.left.weight, self.bias).add_(self.sparse(x))
        r, k = self.reduced_rank, self.nonzero_idx.numel()
        if k == 0:
            return F.linear(self.right(x), self.left.weight, self.bias)
        if x.numel() >= (r + k) * x.shape[-1]:
            t = F.linear(x, torch.cat([self.right.weight, self.sparse_weight_pruned]))
            h, z = t[..., :r], t[..., r:]
        else:
            h, z = self.right(x), F.linear(x, self.sparse_weight_pruned)
        return F.linear(h, self.left.weight, self.bias).index_add_(-1, self.nonzero_idx, z)

    # -- weights --------------------------------------------------------------------------------------
    def initialize_weight(self, left_weight, right_weight, sparse_weight=None, bias=None):
        """Set L, R, S and the bias (as the original). ``None`` keeps the current tensor."""
        self.left.weight = nn.Parameter(left_weight, requires_grad=True)
        self.right.weight = nn.Parameter(right_weight, requires_grad=True)
        if self.has_sparse and sparse_weight is not None:
            self.sparse.weight = nn.Parameter(sparse_weight, requires_grad=True)
        if self.has_bias and bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=True)

    def prune_sparse(self):
        """Compact S: keep the rows with any nonzero entry; drop the dense ``sparse`` module."""
        if not self.has_sparse or self.is_compacted:
            return
        w = self.sparse.weight
        idx = torch.nonzero((w != 0).any(dim=1)).flatten()
        self._set_compact(w.detach()[idx].clone(), idx, requires_grad=w.requires_grad)

    def _set_compact(self, rows, idx, requires_grad=True):
        if hasattr(self, "sparse"):
            del self.sparse
        # No kept row: the forward never uses the (empty) parameter, so it must not ask for a gradient (under
        # DDP a trainable parameter without one stops the run).
        self.sparse_weight_pruned = nn.Parameter(rows, requires_grad=requires_grad and rows.numel() > 0)
        self.nonzero_idx = idx.to(device=rows.device, dtype=torch.long)

    def merged_weight(self):
        """The dense ``L @ R + S`` (out x in), in the layer's dtype."""
        w = self.left.weight.float() @ self.right.weight.float()
        if self.has_sparse:
            if self.is_compacted:
                w.index_add_(0, self.nonzero_idx, self.sparse_weight_pruned.float())
            else:
                w += self.sparse.weight.float()
        return w.to(self.left.weight.dtype)


# ----------------------------------------------------------------------------------------------------
# 3. The walker
# ----------------------------------------------------------------------------------------------------
DEFAULT_ALLOW_NAME = ["query", "key", "value", "dense", "attention"]
DEFAULT_BLOCK_NAME = ["pooler", "classifier", "LayerNorm", "embeddings"]


def substitute_layer_weights(module, allow_name=None, block_name=None, parameter_ratio=0.15, has_sparse=True,
                             do_svd=True, **kwargs):
    """STEP 1: replace ``nn.Linear`` children by :class:`LinearLoSparse`, recursively.

    A child attribute ``name`` that is exactly an ``nn.Linear`` is replaced iff ``any(name in a for a in
    allow_name)``; the walk does not enter a child ``name`` iff ``any(name in b for b in block_name)``
    (substring tests, as the original: they decide the checkpoint keys). ``do_svd=False`` initialises
    L, R and S to zeros. Extra ``kwargs`` go to :func:`low_rank_decomposition` (``svd="randomized"``,
    ``remove_criteria``, ``log_level``, ...). New weights keep the replaced layer's device and dtype.

    :return: list of ``{"name", "in_features", "out_features", "rank"}``, one per replaced layer.
    """
    allow_name = DEFAULT_ALLOW_NAME if allow_name is None else list(allow_name)
    block_name = DEFAULT_BLOCK_NAME if block_name is None else list(block_name)
    replaced, memo = [], {}
    _substitute(module, allow_name, block_name, parameter_ratio, has_sparse, do_svd, kwargs, "", replaced, memo)
    if replaced:
        ranks = [r["rank"] for r in replaced]
        dense = sum(r["in_features"] * r["out_features"] for r in replaced)
        low = sum(r["rank"] * (r["in_features"] + r["out_features"]) for r in replaced)
        logger.info("LoSparse: replaced %d Linear layers (rank %d-%d); low-rank parameters %d = %.2f%% of %d",
                    len(replaced), min(ranks), max(ranks), low, 100 * low / dense, dense)
    else:
        logger.warning("LoSparse: no Linear layer matched allow_name=%s", allow_name)
    return replaced


def _substitute(module, allow_name, block_name, ratio, has_sparse, do_svd, kwargs, prefix, replaced, memo):
    for name, child in list(module._modules.items()):  # not named_children(): it hides aliases
        if child is None:
            continue
        qual = prefix + name
        if type(child) is nn.Linear and any(name in a for a in allow_name):
            if id(child) not in memo:  # a Linear shared by two parents stays shared
                memo[id(child)] = _losparse_from_linear(child, ratio, has_sparse, do_svd, kwargs)
                layer = memo[id(child)]
                replaced.append({"name": qual, "in_features": layer.in_feature, "out_features": layer.out_feature,
                                 "rank": layer.reduced_rank})
            setattr(module, name, memo[id(child)])
        elif _is_conv1d(child) and any(name in a for a in allow_name):
            raise TypeError(
                f"LoSparse: {qual} is a transformers Conv1D (GPT-2 style, weight stored in x out), not an nn.Linear; "
                "it is not supported. Leave its name out of allow_name, or use a model with nn.Linear projections.")
        elif not any(name in b for b in block_name):
            _substitute(child, allow_name, block_name, ratio, has_sparse, do_svd, kwargs, qual + ".", replaced, memo)


def _is_conv1d(module):
    """transformers' ``Conv1D`` (GPT-2, ...): a linear layer with its weight stored transposed (in x out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


@torch.no_grad()
def _losparse_from_linear(linear, parameter_ratio, has_sparse, do_svd, kwargs):
    W = linear.weight
    H, Win = W.shape
    kw = {"device": W.device, "dtype": W.dtype}
    if do_svd:
        out = low_rank_decomposition(W, parameter_ratio=parameter_ratio, return_dict=True, **kwargs)
        L, R, r = out["L"], out["R"], out["reduced_rank"]
        S = W.float() - L @ R if has_sparse else None
    else:
        r = _reduced_rank(H, Win, parameter_ratio, kwargs.get("rank_ratio", 0.1))
        L, R = torch.zeros(H, r), torch.zeros(r, Win)
        S = torch.zeros(H, Win) if has_sparse else None
    layer = LinearLoSparse(Win, H, r, has_bias=linear.bias is not None, has_sparse=has_sparse, device="meta")
    layer.initialize_weight(L.to(**kw), R.to(**kw), None if S is None else S.to(**kw),
                            None if linear.bias is None else linear.bias.detach().clone())
    return layer


def prune(module):
    """Compact every :class:`LinearLoSparse` in ``module`` (see :meth:`LinearLoSparse.prune_sparse`).

    Returns the number of layers compacted. Re-create the optimizer afterwards: the parameters changed.
    """
    layers = [m for m in module.modules() if isinstance(m, LinearLoSparse)]
    for m in layers:
        m.prune_sparse()
    logger.info("LoSparse: compacted %d layers", len(layers))
    return len(layers)


# ----------------------------------------------------------------------------------------------------
# 4. The pruner
# ----------------------------------------------------------------------------------------------------
PRUNER_NAMES = ("PLATON", "Magnitude")
STRUCTURED_METHODS = ("mean", "sum", "max", "min")
STRUCTURED_DIRECTIONS = ("row", "col", "row_col")
# ``row_col`` prunes rows of these projections and columns of the others.
ROW_COL_ROW_NAMES = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "query_proj", "key_proj", "value_proj")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _clean_name(n):
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if n.startswith(p):
                n, changed = n[len(p):], True
    return n


def _config_get(args, key, default=None):
    if isinstance(args, dict):
        return args.get(key, default)
    return getattr(args, key, default)


class Pruner(object):
    """PLATON pruner of the sparse matrices (STEP 2; drive it with :meth:`update_and_pruning`, STEP 3).

    Reads ``beta1, beta2, deltaT, initial_threshold, final_threshold, initial_warmup, final_warmup,
    warmup_steps`` from ``args`` (a Namespace or a mapping). ``structured_method`` is ``mean|sum|max|min`` or
    None / ``"none"`` (unstructured); ``structured_direction`` is ``row|col|row_col``.

    With ``beta2 == 1`` and ``mean``/``sum`` aggregation (the paper's setting) only per-row (per-column)
    statistics are kept: the mean of an EMA is the EMA of the mean, so scores and masks are those of the
    element-wise computation, without full-size copies of S. The threshold is the k-th smallest of the
    element-wise scores, found from the aggregated scores weighted by their multiplicity.
    """

    def __init__(self, model, args, total_step, tb_writer=None, mask_param_name=None, non_mask_name=None,
                 use_no_mask=False, pruner_name="PLATON", structured_method="mean", structured_direction="row"):
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
        self.config = {k: _config_get(args, k) for k in ("beta1", "beta2", "deltaT", "initial_threshold",
                                                          "final_threshold", "initial_warmup", "final_warmup",
                                                          "warmup_steps")}
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
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}
        self.reduced = pruner_name == "PLATON" and self.beta2 == 1.0 and structured_method in ("mean", "sum")
        self._nonfinite = None  # device counter of skipped updates (read only at mask steps: no sync)
        self._nonfinite_reported = 0
        self._check_sharding(model)

    # -- which parameters, which axis -----------------------------------------------------------------
    def whether_mask_para(self, n):
        if not self.use_no_mask:
            return any(nd in n for nd in self.mask_param_name)
        return not any(nd in n for nd in self.non_mask_name)

    def _masked_params(self, model):
        return [(_clean_name(n), p) for n, p in model.named_parameters() if self.whether_mask_para(_clean_name(n))]

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

    @staticmethod
    def _check_sharding(model):
        for n, p in model.named_parameters():
            if hasattr(p, "ds_id") or hasattr(p, "ds_numel") or type(p).__name__ == "FlatParameter" or \
                    getattr(p, "_is_sharded", False) or type(p).__name__ == "DTensor":
                raise RuntimeError(
                    f"Pruner: parameter {n!r} is sharded (DeepSpeed ZeRO-3 / FSDP). LoSparse pruning needs full "
                    "parameters and gradients on every rank: use a single process or DDP (accelerate launch "
                    "--multi_gpu); see utils.check_distributed_support.")

    # -- schedule -------------------------------------------------------------------------------------
    def schedule_threshold_comb(self, step: int):
        """Cubic schedule of the kept fraction of S; returns ``(threshold, mask_now)``."""
        c = self.config
        ti = c["initial_warmup"] * c["warmup_steps"]
        tf = c["final_warmup"] * c["warmup_steps"]
        if step <= ti:
            return c["initial_threshold"], False
        if step > self.total_step - tf:
            return c["final_threshold"], True
        mul_coeff = 1 - (step - ti) / (self.total_step - ti - tf)
        threshold = c["final_threshold"] + (c["initial_threshold"] - c["final_threshold"]) * (mul_coeff ** 3)
        return threshold, step % self.deltaT == 0

    cubic_remaining_ratio = schedule_threshold_comb

    # -- importance -----------------------------------------------------------------------------------
    def _reduce(self, t, axis):
        if axis is None:
            return t.float()
        if self.structured_method == "mean":
            return t.mean(dim=axis, dtype=torch.float32)
        return t.sum(dim=axis, dtype=torch.float32)

    @torch.no_grad()
    def update_ipt_with_local_window(self, model, global_step):
        """Accumulate ``|p * grad|`` over the window; at its start, fold the last window into the EMA."""
        if self.pruner_name == "Magnitude":
            return  # the score is |p| at mask time
        masked = self._masked_params(model)
        params = [(n, p) for n, p in masked if p.grad is not None]
        if not params:
            if any(p.requires_grad for _, p in masked):
                raise RuntimeError(
                    "Pruner.update_and_pruning: no sparse parameter has a gradient. Call it after "
                    "loss.backward()/optimizer.step() and before optimizer.zero_grad(); under DeepSpeed ZeRO or "
                    "FSDP gradients are sharded, which LoSparse does not support (see check_distributed_support).")
            return
        cur = []
        for n, p in params:
            s = torch.mul(p, p.grad).abs_()
            cur.append(self._reduce(s, self._axis(n, p) if self.reduced else None))
        finite = torch.stack([torch.isfinite(c).all() for c in cur]).all()
        if self._nonfinite is None:
            self._nonfinite = torch.zeros((), dtype=torch.long, device=finite.device)
        self._nonfinite += (~finite).long()

        local_step = global_step % self.deltaT
        update_step = global_step // self.deltaT
        b1, b2 = self.beta1, self.beta2
        for (n, p), c in zip(params, cur):
            if n not in self.ipt:
                self.ipt[n] = torch.zeros_like(c)
                self.exp_avg_ipt[n] = torch.zeros_like(c)
                if b2 > 0 and b2 != 1:
                    self.exp_avg_unc[n] = torch.zeros_like(c)
            ipt, avg = self.ipt[n].to(c.device), self.exp_avg_ipt[n].to(c.device)
            if local_step == 0:
                new_avg = b1 * avg + (1 - b1) * ipt
                if n in self.exp_avg_unc:
                    unc = self.exp_avg_unc[n].to(c.device)
                    if 0 < b2 < 1:
                        new_unc = b2 * unc + (1 - b2) * (ipt - new_avg).abs()
                    elif b2 == 2:
                        new_unc = (update_step * unc + (ipt - new_avg) ** 2) / (update_step + 1)
                    else:
                        new_unc = unc
                    self.exp_avg_unc[n] = torch.where(finite, new_unc, unc)
                self.exp_avg_ipt[n] = torch.where(finite, new_avg, avg)
                self.ipt[n] = torch.where(finite, c, ipt)
            else:
                self.ipt[n] = torch.where(finite, (ipt * local_step + c) / (local_step + 1), ipt)

    def _score(self, n, p):
        """Importance of ``p`` (element-wise, or per row/column on the reduced path)."""
        if self.pruner_name == "Magnitude":
            return p.detach().abs().float()
        if n not in self.exp_avg_ipt:
            return torch.zeros(p.shape[1 - self._axis(n, p)] if self.reduced and self._axis(n, p) is not None
                               else p.shape, device=p.device)
        avg, ipt = self.exp_avg_ipt[n].to(p.device), self.ipt[n].to(p.device)
        b2 = self.beta2
        if 0 < b2 < 1:
            return avg * self.exp_avg_unc[n].to(p.device)
        if b2 == 1:
            return avg
        if b2 == 2:
            return avg * self.exp_avg_unc[n].to(p.device).sqrt()
        return avg * (ipt - avg).abs()

    def _aggregate(self, score, n, p):
        """Return ``(scores, multiplicity, axis)``: one score per row/column (or per entry)."""
        axis = self._axis(n, p)
        if axis is None:
            return score.reshape(-1), 1, None
        if not (self.reduced and score.dim() == 1):
            m = self.structured_method
            if m == "mean":
                score = score.mean(dim=axis)
            elif m == "sum":
                score = score.sum(dim=axis)
            elif m == "max":
                score = score.amax(dim=axis)
            else:
                score = score.amin(dim=axis)
        return score, p.shape[axis], axis

    @torch.no_grad()
    def mask_with_threshold(self, model, threshold):
        """Zero the lowest-scoring rows (entries) so that a fraction ``threshold`` of S is kept."""
        params = self._masked_params(model)
        if not params:
            return None
        groups = [(n, p) + self._aggregate(self._score(n, p), n, p) for n, p in params]
        device = params[0][1].device
        scores = torch.cat([g[2].reshape(-1).float().to(device) for g in groups])
        scores = _broadcast_from_rank0(scores)
        if self._nonfinite is not None:
            skipped = int(self._nonfinite)
            if skipped > self._nonfinite_reported:
                logger.warning("Pruner: %d update(s) with non-finite gradients were skipped so far",
                               skipped)
                self._nonfinite_reported = skipped
        mult = [g[3] for g in groups]
        lengths = [g[2].numel() for g in groups]
        total = sum(m * l for m, l in zip(mult, lengths))
        k = int(total * (1 - threshold))
        if k <= 0:
            mask_threshold = float("-inf")
        elif all(m == 1 for m in mult):
            mask_threshold = torch.kthvalue(scores, k)[0].item()
        else:
            weights = torch.cat([torch.full((l,), m, dtype=torch.float64, device=device)
                                 for m, l in zip(mult, lengths)])
            sorted_scores, order = scores.sort()
            cum = weights[order].cumsum(0)
            pos = torch.searchsorted(cum, torch.tensor([float(k)], dtype=torch.float64, device=device))
            mask_threshold = sorted_scores[pos.clamp(max=sorted_scores.numel() - 1)].item()
        offset = 0
        for (n, p, s, m, axis), l in zip(groups, lengths):
            drop = scores[offset:offset + l] < mask_threshold
            offset += l
            if axis is None:
                p.masked_fill_(drop.view(p.shape), 0.0)
            else:
                p.masked_fill_(drop.unsqueeze(axis), 0.0)
        return mask_threshold

    def update_and_pruning(self, model, global_step):
        """STEP 3: call after ``optimizer.step()`` and before ``zero_grad()``; returns ``(threshold, mask_threshold)``.

        ``mask_threshold`` is None on steps that do not mask.
        """
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
        return {"pruner_name": self.pruner_name, "reduced": self.reduced, "beta2": self.beta2,
                "structured_method": self.structured_method, "structured_direction": self.structured_direction}

    def state_dict(self):
        """Every statistic and counter, so that a resumed run is bit-exact."""
        return {"layout": self._layout(),
                "ipt": {n: t.detach().cpu().clone() for n, t in self.ipt.items()},
                "exp_avg_ipt": {n: t.detach().cpu().clone() for n, t in self.exp_avg_ipt.items()},
                "exp_avg_unc": {n: t.detach().cpu().clone() for n, t in self.exp_avg_unc.items()},
                "nonfinite_steps": 0 if self._nonfinite is None else int(self._nonfinite),
                "nonfinite_reported": self._nonfinite_reported}

    def load_state_dict(self, state_dict):
        layout = state_dict.get("layout", {})
        if layout != self._layout():
            raise ValueError(f"Pruner.load_state_dict: saved with {layout}, this pruner is {self._layout()}; "
                             "use the same --pruner_name/--beta2/--structured_method/--structured_direction")
        self.ipt = dict(state_dict["ipt"])
        self.exp_avg_ipt = dict(state_dict["exp_avg_ipt"])
        self.exp_avg_unc = dict(state_dict["exp_avg_unc"])
        self._nonfinite = torch.tensor(int(state_dict.get("nonfinite_steps", 0)))
        self._nonfinite_reported = int(state_dict.get("nonfinite_reported", 0))
        dev = next((p.device for _, p in self._masked_params(self.model)), None) if self.model is not None else None
        if dev is not None:
            for d in (self.ipt, self.exp_avg_ipt, self.exp_avg_unc):
                for n in d:
                    d[n] = d[n].to(dev)
            self._nonfinite = self._nonfinite.to(dev)


def _broadcast_from_rank0(t):
    """Under torch.distributed, make every rank use rank 0's scores (masks can then never drift apart)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(t, src=0)
    return t


# ----------------------------------------------------------------------------------------------------
# 5. Checkpoint I/O and reporting
# ----------------------------------------------------------------------------------------------------
class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists the keys."""


def _unwrap(model):
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _read_state_dict(path_or_state_dict):
    if isinstance(path_or_state_dict, dict):
        return dict(path_or_state_dict)
    path = Path(path_or_state_dict)
    if path.is_dir():
        for cand in ("pytorch_model.bin", "model.safetensors", "losparse_model.safetensors"):
            if (path / cand).is_file():
                path = path / cand
                break
        else:
            raise FileNotFoundError(f"no pytorch_model.bin or model.safetensors in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _set_submodule(root, name, new):
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _layer_for(sd, prefix, in_f, out_f, has_bias, like):
    """Build a LinearLoSparse shaped like the checkpoint entries under ``prefix``."""
    rank = sd[prefix + "left.weight"].shape[1]
    compact = prefix + "sparse_weight_pruned" in sd
    has_sparse = compact or prefix + "sparse.weight" in sd
    kw = {"device": like.device, "dtype": like.dtype}
    layer = LinearLoSparse(in_f, out_f, rank, has_bias=has_bias, has_sparse=has_sparse, **kw)
    if compact:
        k = sd[prefix + "sparse_weight_pruned"].shape[0]
        layer._set_compact(torch.zeros(k, in_f, **kw), torch.zeros(k, dtype=torch.long, device=like.device))
    return layer


def _nonzero_rows_from_dense(dense, k, prefix):
    idx = torch.nonzero((dense != 0).any(dim=1)).flatten()
    if idx.numel() != k:  # the original kept rows whose signed sum was nonzero
        idx = torch.nonzero(dense.sum(dim=1)).flatten()
    if idx.numel() != k:
        raise CheckpointMismatchError(f"{prefix}sparse_weight_pruned has {k} rows but {prefix}sparse.weight has "
                                      f"{idx.numel()} nonzero rows; cannot place the kept rows")
    return idx


def load_checkpoint(model, path_or_state_dict, strict=True):
    """Load a LoSparse checkpoint into ``model`` (already passed through :func:`substitute_layer_weights`).

    Accepts the original ``torch.save(model.state_dict())`` ``.bin`` files, ``.safetensors`` files, a
    directory holding one of them, or a state dict; ``module.`` prefixes are stripped. Each
    :class:`LinearLoSparse` is rebuilt at the rank found in the file (``left.weight``), compacted when the
    file holds ``sparse_weight_pruned`` (distilled checkpoints). A ``nn.Linear`` of the model whose name has
    ``left.weight`` in the file is converted too. With ``strict=True`` missing, unexpected or mis-shaped keys
    raise :class:`CheckpointMismatchError` listing them; nothing is loaded in that case.
    """
    target = _unwrap(model)
    sd = {}
    for k, v in _read_state_dict(path_or_state_dict).items():
        sd[_clean_name(k)] = v

    modules = dict(target.named_modules())
    for prefix in sorted({k[: -len("left.weight")] for k in sd if k.endswith("left.weight")}):
        name = prefix[:-1]
        mod = modules.get(name)
        if isinstance(mod, LinearLoSparse):
            in_f, out_f, has_bias, like = mod.in_feature, mod.out_feature, mod.has_bias, mod.left.weight
        elif type(mod) is nn.Linear:
            in_f, out_f, has_bias, like = mod.in_features, mod.out_features, mod.bias is not None, mod.weight
        else:
            continue
        if prefix + "sparse_weight_pruned" in sd and prefix + "nonzero_idx" not in sd:
            if prefix + "sparse.weight" not in sd:
                raise CheckpointMismatchError(f"{prefix}sparse_weight_pruned without {prefix}nonzero_idx or "
                                              f"{prefix}sparse.weight: cannot place the kept rows")
            dense = sd.pop(prefix + "sparse.weight")
            sd[prefix + "nonzero_idx"] = _nonzero_rows_from_dense(dense, sd[prefix + "sparse_weight_pruned"].shape[0],
                                                                  prefix)
        new = _layer_for(sd, prefix, in_f, out_f, has_bias, like)
        old_shapes = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
        new_shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
        if not isinstance(mod, LinearLoSparse) or old_shapes != new_shapes:
            _set_submodule(target, name, new)

    own = target.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    # Tied parameters (e.g. lm_head <-> embeddings) may be saved once; buffers that this transformers
    # version no longer persists (e.g. position_ids) may be present in older files.
    ptr_keys = {}
    for k, v in own.items():
        ptr_keys.setdefault(v.data_ptr(), []).append(k)
    missing = [k for k in missing if not any(o in sd for o in ptr_keys[own[k].data_ptr()] if o != k)]
    nonpersistent = {n for n, _ in target.named_buffers()} - set(own)
    unexpected = [k for k in unexpected if k not in nonpersistent]
    if missing or unexpected or mismatched:
        msg = _mismatch_message(missing, unexpected, mismatched)
        if strict:
            raise CheckpointMismatchError(msg)
        logger.warning(msg)
    load = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    target.load_state_dict(load, strict=False)
    logger.info("LoSparse: loaded %d tensors from checkpoint", len(load))
    return model


def _mismatch_message(missing, unexpected, mismatched, limit=20):
    parts = ["checkpoint does not fit the model (wrong base model or task head?)"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{title} ({len(keys)}): " + ", ".join(keys[:limit]) + more)
    return "\n".join(parts)


def save_checkpoint(model, path):
    """``torch.save(model.state_dict())`` in the original key layout (what ``--eval_checkpoint`` loads).

    Written to a temporary file first and renamed, so an existing file is never left half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, str(tmp))
    os.replace(tmp, path)
    return path


class CompressionReport:
    """What STEP 1 replaced and what is left of it. ``str(report)`` is a printable table."""

    def __init__(self, layers, model_params, model_params_dense_equivalent, model_params_in_memory, files=None):
        self.layers = layers
        self.dense_params = sum(l["out_features"] * l["in_features"] for l in layers)
        self.low_rank_params = sum(l["rank"] * (l["out_features"] + l["in_features"]) for l in layers)
        self.sparse_params = sum(l["kept_rows"] * l["in_features"] for l in layers)
        self.effective_ratio = ((self.low_rank_params + self.sparse_params) / self.dense_params
                                if self.dense_params else 1.0)
        self.model_params = model_params
        self.model_params_dense_equivalent = model_params_dense_equivalent
        self.model_params_in_memory = model_params_in_memory
        self.files = files or {}
        self.file_size_bytes = sum(self.files.values()) if files else None

    def as_dict(self):
        keys = ("layers", "dense_params", "low_rank_params", "sparse_params", "effective_ratio", "model_params",
                "model_params_dense_equivalent", "model_params_in_memory", "files", "file_size_bytes")
        return {k: getattr(self, k) for k in keys}

    def table(self):
        lines = [f"{'layer':<60} {'out':>6} {'in':>6} {'rank':>5} {'rows':>6} {'ratio':>7}"]
        for l in self.layers:
            ratio = (l["rank"] * (l["out_features"] + l["in_features"]) + l["kept_rows"] * l["in_features"]) / \
                    (l["out_features"] * l["in_features"])
            lines.append(f"{l['name'][-60:]:<60} {l['out_features']:>6} {l['in_features']:>6} {l['rank']:>5} "
                         f"{l['kept_rows']:>6} {ratio:>7.2%}")
        lines += [
            f"substituted matrices: {len(self.layers)}, dense parameters {self.dense_params:,}",
            f"low-rank parameters {self.low_rank_params:,} + kept sparse parameters {self.sparse_params:,} "
            f"= {self.effective_ratio:.2%} of dense",
            f"whole model: {self.model_params:,} parameters stored compactly vs {self.model_params_dense_equivalent:,}"
            f" dense ({self.model_params / max(1, self.model_params_dense_equivalent):.2%}); "
            f"{self.model_params_in_memory:,} in memory now",
        ]
        if self.files:
            lines.append(f"files: {self.file_size_bytes / 2**20:.2f} MiB "
                         + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in self.files.items()))
        return "\n".join(lines)

    __str__ = table


def compression_report(model, export_dir=None):
    """Per-layer shapes, ranks and kept rows, totals, and whole-model parameter counts.

    ``model_params`` counts what a compact export stores (L, R, kept rows of S, biases and every other
    parameter once); ``model_params_dense_equivalent`` the same model with dense matrices. With
    ``export_dir`` (an :func:`export_compact` directory) the sizes of its files are reported too.
    """
    target = _unwrap(model)
    layers, seen = [], set()
    in_losparse = set()
    for name, m in target.named_modules():
        if isinstance(m, LinearLoSparse):
            layers.append({"name": name, "out_features": m.out_feature, "in_features": m.in_feature,
                           "rank": m.reduced_rank, "kept_rows": m.kept_rows})
            for p in m.parameters():
                in_losparse.add(id(p))
    other = 0
    in_memory = 0
    for p in target.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        in_memory += p.numel()
        if id(p) not in in_losparse:
            other += p.numel()
    compact, dense = other, other
    for name, m in target.named_modules():
        if isinstance(m, LinearLoSparse):
            compact += min(m.num_parameters(compact=True), m.out_feature * m.in_feature +
                           (m.out_feature if m.has_bias else 0))
            dense += m.out_feature * m.in_feature + (m.out_feature if m.has_bias else 0)
    files = None
    if export_dir is not None:
        files = {f.name: f.stat().st_size for f in sorted(Path(export_dir).iterdir()) if f.is_file()}
    return CompressionReport(layers, compact, dense, in_memory, files)


COMPACT_WEIGHTS = "model.safetensors"
COMPACT_CONFIG = "losparse_config.json"


@torch.no_grad()
def export_compact(model, output_dir, tokenizer=None, losparse_args=None):
    """Write a directory that :func:`load_compact` rebuilds without the dense model, SVD or network.

    Holds the model config (``config.json``), the tokenizer if given, ``model.safetensors`` with only L, R,
    the kept rows of S (``sparse_weight_pruned`` + ``nonzero_idx``), biases and the untouched weights, and
    ``losparse_config.json`` (per-layer form, rank, kept rows; the LoSparse flags). A layer whose compact form
    has at least as many parameters as the dense matrix is stored merged as a plain ``weight``; a layer
    whose S lost every row keeps only L and R. The model itself is not modified.
    """
    from safetensors.torch import save_file

    target = _unwrap(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, layers = {}, {}
    losparse = {name: m for name, m in target.named_modules() if isinstance(m, LinearLoSparse)}
    skip = tuple(name + "." for name in losparse)
    for k, v in target.state_dict().items():
        if not k.startswith(skip):
            tensors[k] = v
    for name, m in losparse.items():
        p = name + "."
        entry = {"in_features": m.in_feature, "out_features": m.out_feature, "rank": m.reduced_rank,
                 "has_bias": m.has_bias}
        if m.has_sparse and m.is_compacted:
            rows, idx = m.sparse_weight_pruned, m.nonzero_idx
        elif m.has_sparse:
            idx = torch.nonzero((m.sparse.weight != 0).any(dim=1)).flatten()
            rows = m.sparse.weight[idx]
        else:
            rows, idx = None, None
        k = 0 if idx is None else idx.numel()
        if m.num_parameters(compact=True) - (m.out_feature if m.has_bias else 0) >= m.out_feature * m.in_feature:
            entry.update(form="dense", kept_rows=m.out_feature)
            tensors[p + "weight"] = m.merged_weight()
        else:
            tensors[p + "left.weight"] = m.left.weight
            tensors[p + "right.weight"] = m.right.weight
            if k:
                tensors[p + "sparse_weight_pruned"] = rows
                tensors[p + "nonzero_idx"] = idx
            entry.update(form="losparse" if k else "low_rank", kept_rows=k)
        if m.has_bias:
            tensors[p + "bias"] = m.bias
        layers[name] = entry
    # safetensors stores no shared storage: keep one key per tied tensor and record the others.
    tied, by_ptr, flat = {}, {}, {}
    for k, v in tensors.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in by_ptr:
            tied[k] = by_ptr[key]
            continue
        if key is not None:
            by_ptr[key] = k
        flat[k] = v.detach().contiguous().cpu().clone()
    save_file(flat, str(out / COMPACT_WEIGHTS), metadata={"format": "pt", "losparse": "1"})
    if hasattr(target, "config") and hasattr(target.config, "save_pretrained"):
        target.config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    meta = {"format_version": 1, "model_class": type(target).__name__, "layers": layers, "tied": tied,
            "losparse_args": _jsonable(losparse_args)}
    (out / COMPACT_CONFIG).write_text(json.dumps(meta, indent=1))
    logger.info("LoSparse: exported compact model to %s", out)
    return out


def _jsonable(args):
    if args is None:
        return None
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list))}


def load_compact(output_dir, model_class=None, device=None, dtype=None):
    """Rebuild a model written by :func:`export_compact`, from that directory alone (eval mode)."""
    from safetensors.torch import load_file
    import transformers

    out = Path(output_dir)
    meta = json.loads((out / COMPACT_CONFIG).read_text())
    config = transformers.AutoConfig.from_pretrained(str(out))
    if model_class is None:
        model_class = getattr(transformers, meta.get("model_class", ""), None) or transformers.AutoModel
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else \
        model_class._from_config(config)
    sd = load_file(str(out / COMPACT_WEIGHTS))
    for name, entry in meta["layers"].items():
        if entry["form"] == "dense":
            continue
        like = model.get_submodule(name).weight
        layer = LinearLoSparse(entry["in_features"], entry["out_features"], entry["rank"],
                               has_bias=entry["has_bias"], has_sparse=entry["form"] == "losparse",
                               device=like.device, dtype=like.dtype)
        if entry["form"] == "losparse":
            k = entry["kept_rows"]
            layer._set_compact(torch.zeros(k, entry["in_features"], dtype=like.dtype), torch.zeros(k, dtype=torch.long))
        _set_submodule(model, name, layer)
    for k, src in meta.get("tied", {}).items():
        sd[k] = sd[src]
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(_mismatch_message(missing, unexpected, mismatched))
    model.load_state_dict(sd, strict=True)
    if hasattr(model, "tie_weights") and meta.get("tied"):
        model.tie_weights()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# 6. argparse helper
# ----------------------------------------------------------------------------------------------------
def add_losparse_args(parser):
    """Add the LoSparse flags shared by run_glue.py, run_qa.py and run_summarization.py (original defaults)."""
    g = parser.add_argument_group("LoSparse")
    g.add_argument("--low_rank_parameter_ratio", type=float, default=0.05,
                   help="Proportion of the dense parameters kept in the low-rank factors L and R, e.g. 0.10.")
    g.add_argument("--initial_threshold", type=float, default=1.0, help="Kept fraction of S at the start.")
    g.add_argument("--final_threshold", type=float, default=0.1,
                   help="Kept fraction of the sparse matrix S at the end, e.g. 0.20.")
    g.add_argument("--initial_warmup", type=int, default=1,
                   help="Steps (in units of --warmup_steps) fine-tuning only, before pruning starts.")
    g.add_argument("--final_warmup", type=int, default=3,
                   help="Steps (in units of --warmup_steps) at the end with the final kept fraction.")
    g.add_argument("--warmup_steps", type=int, default=6400, help="Unit of --initial_warmup/--final_warmup.")
    g.add_argument("--beta1", type=float, default=0.85, help="EMA coefficient of the importance score.")
    g.add_argument("--beta2", type=float, default=1.0,
                   help="Uncertainty term: 1 = none (paper), in (0,1) = EMA of |ipt-avg|, 2 = running variance.")
    g.add_argument("--deltaT", type=int, default=10, help="Prune every deltaT steps (and average over them).")
    g.add_argument("--structured_method", type=str, default="mean", choices=list(STRUCTURED_METHODS) + ["none"],
                   help="How scores of a row/column are aggregated; 'none' = unstructured.")
    g.add_argument("--structured_direction", type=str, default="row", choices=list(STRUCTURED_DIRECTIONS),
                   help="Prune rows, columns, or rows of q/k/v and columns elsewhere (row_col).")
    g.add_argument("--pruner_name", type=str, default="PLATON", choices=list(PRUNER_NAMES),
                   help="Importance score: PLATON (|S*grad| with EMA) or Magnitude (|S|).")
    g.add_argument("--svd", type=str, default="full", choices=list(SVD_METHODS),
                   help="SVD used by STEP 1: full (exact), randomized (torch.svd_lowrank) or auto.")
    g.add_argument("--eval_checkpoint", type=str, default=None,
                   help="Evaluate this LoSparse checkpoint (.bin/.safetensors); use with --num_train_epochs 0.")
    g.add_argument("--no_losparse", action="store_true",
                   help="Plain fine-tuning baseline: skip STEP 1-3 (no substitution, no pruning).")
    return parser


def validate_losparse_args(args, total_step=None, check_all=True):
    """Raise ``ValueError`` naming the flag when a LoSparse flag is out of range.

    ``total_step`` (the number of optimizer steps) also checks that the warm-ups fit in the run.
    """
    get = lambda k, d=None: _config_get(args, k, d)  # noqa: E731
    if get("no_losparse", False) and total_step is None:
        return
    checks = []
    if check_all:
        checks.append(("low_rank_parameter_ratio", get("low_rank_parameter_ratio"), lambda v: 0 < v <= 1, "in (0, 1]"))
    checks += [
        ("initial_threshold", get("initial_threshold"), lambda v: 0 < v <= 1, "in (0, 1]"),
        ("final_threshold", get("final_threshold"), lambda v: 0 < v <= 1, "in (0, 1]"),
        ("deltaT", get("deltaT"), lambda v: v >= 1 and int(v) == v, "an integer >= 1"),
        ("beta1", get("beta1"), lambda v: 0 <= v < 1, "in [0, 1)"),
        ("beta2", get("beta2"), lambda v: v >= 0, ">= 0 (1 = no uncertainty, (0,1) = EMA, 2 = variance)"),
        ("warmup_steps", get("warmup_steps"), lambda v: v >= 0, ">= 0"),
        ("initial_warmup", get("initial_warmup"), lambda v: v >= 0, ">= 0"),
        ("final_warmup", get("final_warmup"), lambda v: v >= 0, ">= 0"),
    ]
    for flag, value, ok, allowed in checks:
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
            raise ValueError(f"--{flag} must be {allowed}, got {value!r}")
    fi, ii = get("final_threshold"), get("initial_threshold")
    if fi is not None and ii is not None and fi > ii:
        raise ValueError(f"--final_threshold ({fi}) must be <= --initial_threshold ({ii})")
    sm, sd = get("structured_method"), get("structured_direction")
    if sm is not None and sm not in STRUCTURED_METHODS + ("none",):
        raise ValueError(f"--structured_method must be one of {STRUCTURED_METHODS + ('none',)}, got {sm!r}")
    if sd is not None and sd not in STRUCTURED_DIRECTIONS:
        raise ValueError(f"--structured_direction must be one of {STRUCTURED_DIRECTIONS}, got {sd!r}")
    if get("svd") is not None and get("svd") not in SVD_METHODS:
        raise ValueError(f"--svd must be one of {SVD_METHODS}, got {get('svd')!r}")
    if total_step is not None and not get("no_losparse", False):
        warm = (get("initial_warmup") + get("final_warmup")) * get("warmup_steps")
        if total_step < 1:
            raise ValueError(f"the run has {total_step} optimizer steps; LoSparse pruning needs at least one")
        if warm >= total_step:
            raise ValueError(
                f"--initial_warmup ({get('initial_warmup')}) + --final_warmup ({get('final_warmup')}) times "
                f"--warmup_steps ({get('warmup_steps')}) = {warm} warm-up steps, but the run has only {total_step} "
                "optimizer steps: lower --warmup_steps or train longer")


SUPPORTED_DISTRIBUTED = ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_MUSA",
                         "MULTI_SDAA", "MULTI_HPU")


def check_distributed_support(accelerator):
    """Stop at start-up, with a message, under DeepSpeed, FSDP or Megatron-LM.

    Their shards hold part of each parameter or gradient, so importance scores and row masks computed on a
    rank would be wrong. Supported: one process, and data parallel (DDP) on one or several machines.
    """
    dt = getattr(getattr(accelerator, "distributed_type", None), "value", str(accelerator.distributed_type))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world} but accelerate runs this process alone (distributed_type={dt}): the {world} "
            "processes would train independently and overwrite each other's output. On CPU launch with "
            "ACCELERATE_USE_CPU=1 (or `accelerate launch --cpu` with a multi-CPU config); on GPUs check that "
            "CUDA is visible to every process.")
    if dt not in SUPPORTED_DISTRIBUTED:
        raise RuntimeError(
            f"LoSparse does not support accelerate distributed_type={dt}: DeepSpeed ZeRO, FSDP and Megatron-LM "
            "shard parameters or gradients, and pruning needs full ones on every rank. Supported: a single "
            "process, or data parallel with `accelerate launch --multi_gpu --num_processes N` (one or several "
            "machines; `--cpu` for CPU processes). For the full fine-tuning baseline use --no_losparse.")
