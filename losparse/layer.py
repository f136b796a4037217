"""The layer: ``LinearLoSparse``, ``y = x (L R + S)^T + b``, and its training forward.

``merge_pays`` and ``_MergedLinear`` are the training forward on the dense S (one GEMM on the merged weight, W
never saved); compacted inference runs through ``losparse.forms`` (``layer.fast_path``). The layer knows only its own
tensors: no schedule, no walker.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .common import is_sharded, local_part
from .forms import COMPACT_FORWARDS, COMPACT_PATHS, PATH_CHOICES, FastPath, check_prefer


def merge_pays(rows, in_f, out_f):
    """Training forward: build ``W = L R + S`` when that is cheaper than the low-rank product of the input.

    Merging costs ``out * in * r`` multiply-adds once per call, the factored path ``rows * r * (in + out)``; both
    then do the dense ``S`` product. So merge when ``rows >= out * in / (in + out)`` (384 rows for 768 x 768):
    training batches merge, token-by-token generation stays factored.
    """
    return rows * (in_f + out_f) >= in_f * out_f


def _autocast_casts(t, dtype):
    """Whether autocast casts ``t`` to ``dtype`` before a GEMM, as it does for ``nn.Linear``'s input, weight and
    bias: floating tensors other than float64 are cast, whatever their own dtype."""
    return t is not None and t.is_floating_point() and t.dtype not in (torch.float64, dtype)


class _MergedLinear(torch.autograd.Function):
    """``y = x (L R + S)^T + b`` as one dense GEMM on ``W = addmm(S, L, R)``, with W never saved.

    Backward: ``gW = gy^T x`` is the gradient of S, ``gW R^T`` that of L, ``L^T gW`` that of R (the chain rule
    through W), ``gy W`` that of x, with W rebuilt from the parameters. So a step runs the dense model's GEMMs
    plus three ``out x r x in`` ones, and keeps the dense model's activations. Under autocast (``dtype``) W is
    built in the parameters' dtype, and W, x and the bias are cast as autocast casts them for ``nn.Linear``
    (fp32/fp16/bf16 to ``dtype``, float64 left alone). Only what backward uses is saved
    (``ctx.needs_input_grad``): x only when a weight needs a gradient, the cast W only when x needs one.
    """

    @staticmethod
    def forward(ctx, x, L, R, S, bias, dtype):
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            W = torch.addmm(S, L, R)
            if dtype is not None:
                W = W.to(dtype) if _autocast_casts(W, dtype) else W
                x = x.to(dtype) if _autocast_casts(x, dtype) else x
                bias = bias.to(dtype) if _autocast_casts(bias, dtype) else bias
            y = F.linear(x, W, bias)
        need_x, need_L, need_R, need_S = ctx.needs_input_grad[:4]
        cast = W.dtype != S.dtype  # a cast copy: saved (as nn.Linear's cast weight is); else rebuilt in backward
        rebuild = need_x and not cast
        ctx.save_for_backward(x if (need_L or need_R or need_S) else None,
                              L if (need_R or rebuild) else None, R if (need_L or rebuild) else None,
                              S if rebuild else None, W if (need_x and cast) else None)
        ctx.dtype, ctx.w_dtype, ctx.in_f, ctx.has_bias = W.dtype, S.dtype, S.shape[1], bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, L, R, S, W = ctx.saved_tensors
        need_x, need_L, need_R, need_S, need_b = ctx.needs_input_grad[:5]
        gx = gL = gR = gS = gb = None
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(ctx.dtype)
            gy2 = gy.reshape(-1, gy.shape[-1])
            if need_x:
                if W is None:
                    W = torch.addmm(S, L, R)
                gx = (gy2 @ W).view(*gy.shape[:-1], ctx.in_f)
            if need_L or need_R or need_S:
                gW = (gy2.t() @ x.reshape(-1, x.shape[-1])).to(ctx.w_dtype)
                gS = gW if need_S else None
                gL = gW @ R.t() if need_L else None
                gR = L.t() @ gW if need_R else None
            if need_b and ctx.has_bias:  # summed in at least fp32 (float64 layers: in float64)
                acc = torch.float64 if gy2.dtype == torch.float64 else torch.float32  # (no dispatcher op)
                gb = gy2.sum(0, dtype=acc).to(ctx.bias_dtype)
        return gx, gL, gR, gS, gb, None


class LinearLoSparse(nn.Module):
    """``y = x (L R + S)^T + b`` with ``left`` = L (out x r), ``right`` = R (r x in), ``sparse`` = S (out x in).

    After :meth:`prune_sparse` the dense ``sparse`` is dropped and only the nonzero rows of S are kept
    (``sparse_weight_pruned``, k x in, at output positions ``nonzero_idx``), or its nonzero columns when that
    stores less (column-structured pruning: ``sparse_weight_pruned_cols``, out x k, at input positions
    ``nonzero_col_idx``), so memory and FLOPs scale with k.

    Compacted inference picks a form per token count (:data:`COMPACT_PATHS`). ``prefer`` = ``"speed"`` allows
    the merged dense weight ``L R + S`` when the cost model predicts it fastest (``path_choice = "timed"``:
    when measured fastest); ``"memory"`` never builds it. ``compact_path`` forces one form. Setting any of them
    takes effect on the next call. ``last_path`` is the form of the latest inference call. ``cache_derived =
    False`` derives the tensors on every call instead of caching them. :meth:`refresh` drops the cached tensors
    (call it after editing weights in a way PyTorch does not version, e.g. through ``.data``). All of that state
    lives in one :class:`FastPath` object, ``layer.fast_path``.
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
        self.register_parameter("sparse_weight_pruned_cols", None)  # or: kept columns of S (out x k)
        self.register_buffer("nonzero_col_idx", None)  # their column indices (k)
        self.fast_path = FastPath()
        self.register_load_state_dict_post_hook(LinearLoSparse._invalidate_derived)

    # -- inference settings (held by ``fast_path``): each takes effect on the next call ----------------------
    @property
    def prefer(self):
        return self.fast_path.prefer

    @prefer.setter
    def prefer(self, value):
        check_prefer(value)
        self.fast_path.prefer = value
        self.refresh()

    @property
    def compact_path(self):
        return self.fast_path.compact_path

    @compact_path.setter
    def compact_path(self, value):
        if value is not None and value not in COMPACT_FORWARDS:
            raise ValueError(f"compact_path={value!r}: allowed values are None, " + ", ".join(map(repr, COMPACT_PATHS)))
        self.fast_path.compact_path = value
        self.refresh()

    @property
    def path_choice(self):
        return self.fast_path.path_choice

    @path_choice.setter
    def path_choice(self, value):
        if value not in PATH_CHOICES:
            raise ValueError(f"path_choice={value!r}: allowed values are " + ", ".join(map(repr, PATH_CHOICES)))
        self.fast_path.path_choice = value
        self.refresh()

    @property
    def cache_derived(self):
        return self.fast_path.cache_derived

    @cache_derived.setter
    def cache_derived(self, value):
        self.fast_path.cache_derived = bool(value)
        self.refresh()

    @property
    def last_path(self):
        """The form of the latest compacted inference call (None before it)."""
        return self.fast_path.last_path

    @last_path.setter
    def last_path(self, value):
        self.fast_path.last_path = value

    # -- shapes ---------------------------------------------------------------------------------------
    @property
    def is_compacted(self):
        return self.sparse_weight_pruned is not None or self.sparse_weight_pruned_cols is not None

    @property
    def kept_rows(self):
        """Number of rows of S that carry a nonzero entry (what row compaction keeps)."""
        if not self.has_sparse:
            return 0
        if self.sparse_weight_pruned is not None:
            return int(self.sparse_weight_pruned.shape[0])
        w = self.sparse_weight_pruned_cols if self.is_compacted else self.sparse.weight
        rows = (w != 0).any(dim=1)
        return int((rows.full_tensor() if is_sharded(rows) else rows).sum())  # FSDP2: all ranks call this

    @property
    def kept_cols(self):
        """Number of columns of S that carry a nonzero entry (what column compaction keeps)."""
        if not self.has_sparse:
            return 0
        if self.sparse_weight_pruned_cols is not None:
            return int(self.sparse_weight_pruned_cols.shape[1])
        w = self.sparse_weight_pruned if self.is_compacted else self.sparse.weight
        cols = (local_part(w) != 0).any(dim=0).to(torch.int32)
        if is_sharded(w):  # FSDP2 row shards: a column is kept if any rank's rows keep it (all ranks call this)
            torch.distributed.all_reduce(cols, op=torch.distributed.ReduceOp.MAX, group=w.device_mesh.get_group())
        return int(cols.sum())

    def sparse_form(self):
        """``("rows" | "cols", kept count, stored parameters)``: how S is (or would be) compacted; columns only
        when they store less than rows."""
        if not self.has_sparse:
            return "rows", 0, 0
        if self.sparse_weight_pruned is not None:
            return "rows", self.kept_rows, self.kept_rows * self.in_feature
        if self.sparse_weight_pruned_cols is not None:
            return "cols", self.kept_cols, self.kept_cols * self.out_feature
        rows, cols = self.kept_rows, self.kept_cols
        if rows * self.in_feature <= cols * self.out_feature:
            return "rows", rows, rows * self.in_feature
        return "cols", cols, cols * self.out_feature

    def num_parameters(self, compact=True):
        """Parameters of L, R, the kept rows (or columns) of S and the bias (``compact=False``: with the dense S)."""
        n = self.reduced_rank * (self.in_feature + self.out_feature) + (self.out_feature if self.has_bias else 0)
        if self.has_sparse:
            n += self.sparse_form()[2] if compact or self.is_compacted else self.out_feature * self.in_feature
        return n

    def extra_repr(self):
        """Never communicates: an FSDP2-sharded S (``DTensor``) is shown as such, not counted."""
        if not self.has_sparse:
            rows = "sparse_rows=none"
        elif self.sparse_weight_pruned_cols is not None:
            rows = f"sparse_cols={self.sparse_weight_pruned_cols.shape[1]}/{self.in_feature}"
        elif self.sparse_weight_pruned is not None:
            rows = f"sparse_rows={self.sparse_weight_pruned.shape[0]}/{self.out_feature}"
        elif is_sharded(self.sparse.weight):
            rows = "sparse_rows=sharded"
        else:
            rows = f"sparse_rows={self.kept_rows}/{self.out_feature}"
        return (f"in_features={self.in_feature}, out_features={self.out_feature}, rank={self.reduced_rank}, "
                f"{rows}{', compacted' if self.is_compacted else ''}, bias={self.has_bias}")

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x):
        """Y = X (LR)^T + X S^T + B, in one of three ways (the bias rides in the GEMM epilogue throughout):

        1. uncompacted (dense S: training, and any use before :func:`prune`): :meth:`_forward_dense_s`;
        2. compacted, with a gradient to compute for the layer's weights (training a compacted model, e.g.
           distillation): :meth:`_forward_kept`, through autograd;
        3. compacted inference: one of the forms of :data:`COMPACT_PATHS` on tensors derived once from L, R
           and the kept part of S (:meth:`FastPath.forward`).
        """
        if not self.is_compacted:
            return self._forward_dense_s(x)
        if torch.is_grad_enabled() and self._weights_need_grad():
            return self._forward_kept(x)
        return self.fast_path.forward(self, x)

    def _forward_dense_s(self, x):
        """A call with many rows multiplies by the merged ``L R + S`` (:class:`_MergedLinear`), one with few
        rows runs the factored formula (:func:`merge_pays`); without S, ``x R^T L^T + b``."""
        if not self.has_sparse:
            return F.linear(self.right(x), self.left.weight, self.bias)
        if merge_pays(x.numel() // x.shape[-1], self.in_feature, self.out_feature):
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            return _MergedLinear.apply(x, self.left.weight, self.right.weight, self.sparse.weight, self.bias, dtype)
        return F.linear(self.right(x), self.left.weight, self.bias) + self.sparse(x)

    def _forward_kept(self, x):
        """``X [R; S_kept]^T`` as one GEMM when x has at least ``r + k`` rows, then ``H L^T + B`` and an in-place
        ``index_add_`` of the k sparse columns (column form: ``H L^T + B + X[..., idx] S_cols^T``)."""
        if self.sparse_weight_pruned_cols is not None:
            y = F.linear(self.right(x), self.left.weight, self.bias)
            if self.nonzero_col_idx.numel() == 0:
                return y
            return y + F.linear(x.index_select(-1, self.nonzero_col_idx), self.sparse_weight_pruned_cols)
        r, k = self.reduced_rank, self.nonzero_idx.numel()
        if k == 0:
            return F.linear(self.right(x), self.left.weight, self.bias)
        if x.numel() >= (r + k) * x.shape[-1]:
            t = F.linear(x, torch.cat([self.right.weight, self.sparse_weight_pruned]))
            h, z = t[..., :r], t[..., r:]
        else:
            h, z = self.right(x), F.linear(x, self.sparse_weight_pruned)
        return F.linear(h, self.left.weight, self.bias).index_add_(-1, self.nonzero_idx, z)

    def _weights_need_grad(self):
        return any(p.requires_grad for p in (self.left.weight, self.right.weight, self.sparse_weight_pruned,
                                             self.sparse_weight_pruned_cols, self.bias) if p is not None)

    def kept_index(self):
        """The positions of the kept rows (``nonzero_idx``) or, column form, kept columns (``nonzero_col_idx``)."""
        return self.nonzero_idx if self.sparse_weight_pruned is not None else self.nonzero_col_idx

    def source_tensors(self):
        """L, R, the kept part of S, its indices and the bias (read from the module dicts: called every call)."""
        p, b = self._parameters, self._buffers
        return [t for t in (self._modules["left"]._parameters["weight"], self._modules["right"]._parameters["weight"],
                            p["sparse_weight_pruned"], b["nonzero_idx"], p["sparse_weight_pruned_cols"],
                            b["nonzero_col_idx"], p["bias"]) if t is not None]

    # -- invalidation of what inference derived ------------------------------------------------------------
    def refresh(self):
        """Forget the derived inference tensors and the forms chosen so far; the next call rebuilds them.

        Needed only after an edit PyTorch does not version: in place through ``.data``, in place on inference
        tensors inside ``torch.inference_mode``, or under ``torch.autograd._unsafe_preserve_version_counter``.
        Replaced tensors, in-place edits (optimizer steps, ``copy_``), ``.to()``, ``load_state_dict``,
        ``prune`` and setting ``prefer`` / ``compact_path`` / ``path_choice`` are noticed without it.
        A layer prepared by :func:`prepare_for_inference` re-derives its buffers in place (a compiled model or a
        captured CUDA graph then reads the new values).
        """
        self.fast_path.refresh(self)

    def _invalidate_derived(self, *args, **kwargs):  # load_state_dict post-hook
        self.refresh()

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda(): derived tensors follow on next use
        self.fast_path.moved()
        return super()._apply(fn, *args, **kwargs)

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
        """Compact S: keep the rows with any nonzero entry, or the columns with any nonzero entry when they
        store fewer parameters (column-structured pruning); drop the dense ``sparse`` module."""
        if not self.has_sparse or self.is_compacted:
            return
        w = self.sparse.weight
        nz = w.detach() != 0
        rows, cols = torch.nonzero(nz.any(dim=1)).flatten(), torch.nonzero(nz.any(dim=0)).flatten()
        if rows.numel() * self.in_feature <= cols.numel() * self.out_feature:
            self.set_compact_rows(w.detach()[rows].clone(), rows, requires_grad=w.requires_grad)
        else:
            self.set_compact_cols(w.detach()[:, cols].clone(), cols, requires_grad=w.requires_grad)

    def set_compact_rows(self, rows, idx, requires_grad=True):
        """Row form: ``rows`` (k x in) are the rows ``idx`` of S; the dense ``sparse`` module is dropped."""
        if hasattr(self, "sparse"):
            del self.sparse
        # No kept row: the forward never uses the (empty) parameter, so it must not ask for a gradient (under
        # DDP a trainable parameter without one stops the run).
        self.sparse_weight_pruned = nn.Parameter(rows, requires_grad=requires_grad and rows.numel() > 0)
        self.nonzero_idx = idx.to(device=rows.device, dtype=torch.long)
        self.refresh()

    def set_compact_cols(self, cols, idx, requires_grad=True):
        """Column form: ``cols`` (out x k) are the columns ``idx`` of S."""
        if hasattr(self, "sparse"):
            del self.sparse
        self.sparse_weight_pruned_cols = nn.Parameter(cols, requires_grad=requires_grad and cols.numel() > 0)
        self.nonzero_col_idx = idx.to(device=cols.device, dtype=torch.long)
        self.refresh()

    def merged_weight(self):
        """The dense ``L @ R + S`` (out x in), in the layer's dtype (summed in at least fp32)."""
        acc = torch.promote_types(self.left.weight.dtype, torch.float32)
        w = self.left.weight.to(acc) @ self.right.weight.to(acc)
        if self.has_sparse:
            if self.sparse_weight_pruned is not None:
                w.index_add_(0, self.nonzero_idx, self.sparse_weight_pruned.to(acc))
            elif self.sparse_weight_pruned_cols is not None:
                w.index_add_(1, self.nonzero_col_idx, self.sparse_weight_pruned_cols.to(acc))
            else:
                w += self.sparse.weight.to(acc)
        return w.to(self.left.weight.dtype)
