"""LoSparse: low-rank + structured-sparse compression of ``nn.Linear`` layers (ICML 2023).

One drop-in module, in reading order:

1. decomposition      ``low_rank_decomposition``
2. the layer          ``LinearLoSparse`` (forward, compaction, parameter count)
3. the walker         ``substitute_layer_weights``, ``prune``, ``refresh``, ``prepare_for_inference``;
   calibration         ``collect_input_covariance``, one-shot rows ``one_shot_rows``
4. the pruner         ``Pruner`` (composes the cubic schedule ``cubic_schedule``, the importance statistics and one
                      weighted k-th score; one process, DDP and FSDP2 row shards behind one small interface)
5. checkpoint I/O     ``load_checkpoint``, ``save_checkpoint``, ``export_compact``, ``load_compact``,
   and reporting      ``compression_report``
6. argparse helper    ``add_losparse_args``, ``validate_losparse_args``, ``check_distributed_support``
7. FSDP2              ``apply_fsdp2``, ``fsdp2_checkpointing``, ``fsdp2_full_model``: forwarders to ``utils_fsdp.py``
                      (models bigger than one GPU; the only run that needs that second file)
8. safe runs          ``check_run_paths`` (``check_output_dir``, ``check_checkpoint_file``, ``check_data_file``,
   (the scripts)      ``check_resume_folder``), ``save_state_atomic``, ``latest_checkpoint``, ``checkpoint_problem``,
                      ``one_line_errors``

The three hooks of the original README::

    utils.substitute_layer_weights(model, allow_name, block_name, parameter_ratio=0.05)     # STEP 1
    pruner = utils.Pruner(model, args, total_step=args.max_train_steps)                   # STEP 2
    threshold, mask_threshold = pruner.update_and_pruning(model, completed_steps)          # STEP 3

Public names, signatures and state-dict keys (``left.weight``, ``right.weight``, ``sparse.weight``,
``bias``, ``sparse_weight_pruned``) are those of the original code (a column-compacted S adds
``sparse_weight_pruned_cols`` and ``nonzero_col_idx``); differences are listed in README.md.
"""
import argparse
import collections
import contextlib
import copy
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
import types
import weakref
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # FSDP2 parameters
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover  (torch 2.4)
    try:
        from torch.distributed._tensor import DTensor as _DTensor
    except ImportError:
        _DTensor = None

logger = logging.getLogger("losparse")

__all__ = [
    "low_rank_decomposition", "LinearLoSparse", "substitute_layer_weights", "prune", "Pruner",
    "collect_input_covariance", "one_shot_rows", "collect_output_fisher", "one_shot_allocate",
    "load_checkpoint", "save_checkpoint", "export_compact", "load_compact", "compression_report",
    "CompressionReport", "CheckpointMismatchError", "add_losparse_args", "validate_losparse_args",
    "check_distributed_support", "apply_fsdp2", "fsdp2_checkpointing", "fsdp2_full_model", "refresh",
    "prepare_for_inference",
    "cubic_schedule",
]

SVD_METHODS = ("full", "randomized", "auto")
REMOVE_CRITERIA = ("max_eigenvalue", "min_eigenvalue", "random")
LOG_LEVELS = ("IGNORE", "INFO", "DEBUG")


def _is_sharded(t):
    """Whether ``t`` is a ``DTensor`` (a parameter, gradient or result of FSDP2's ``fully_shard``)."""
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t):
    """The part of ``t`` this rank holds: the local rows of an FSDP2 ``DTensor``, any other tensor itself."""
    return t.to_local() if _is_sharded(t) else t


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


def _whitening(input_cov, damp=1e-6):
    """``(K, K_inv, info)`` with ``C + delta I = K K^T`` (Cholesky, float64) for the activation-aware SVD.

    ``C`` is symmetrised and damped by ``delta = damp * mean(diag C)`` (SVD-LLM's remedy): a singular ``C``
    (inputs confined to a subspace, e.g. dead features) still gives an invertible ``K``, and the fit in the
    directions the inputs never take is left to S. If the Cholesky factorisation still fails, ``delta`` grows
    tenfold (up to ``0.1 * mean(diag C)``). A zero or empty ``C`` (the layer saw no input) returns ``K = None``
    (the caller falls back to the plain SVD). A non-finite ``C`` raises ``ValueError``.
    """
    C = input_cov.detach().to(torch.float64)
    if not torch.isfinite(C).all():
        raise ValueError("input_cov has non-finite entries (inf/nan in the calibration activations)")
    C = (C + C.mT) / 2
    scale = float(C.diagonal().mean()) if C.numel() else 0.0
    if not scale > 0:
        return None, None, {"fallback": "zero input_cov: plain SVD"}
    singular = int(torch.linalg.cholesky_ex(C)[1]) != 0
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    delta = damp * scale
    while True:
        K, err = torch.linalg.cholesky_ex(C + delta * eye)
        if int(err) == 0 or delta >= 0.1 * scale:
            break
        delta *= 10
    if int(err) != 0:
        raise ValueError("input_cov is not positive semi-definite, even damped by 0.1 * mean(diag)")
    K_inv = torch.linalg.solve_triangular(K, eye, upper=False)
    return K, K_inv, {"fallback": "singular input_cov: damped" if singular else None, "delta": delta}


def _output_scale(output_fisher, H, damp=1e-6):
    """``D^1/2`` (float64 vector) of the output weights ``F`` (damped by ``damp * mean(F)``; all ones if F is 0)."""
    F = output_fisher.detach().to(torch.float64).flatten()
    if F.numel() != H:
        raise ValueError(f"output_fisher must have {H} entries (out_features), got {F.numel()}")
    if not torch.isfinite(F).all() or bool((F < 0).any()):
        raise ValueError("output_fisher must be finite and non-negative")
    scale = float(F.mean())
    if not scale > 0:
        logger.warning("output_fisher is zero (the outputs never reached the loss): outputs weighted equally")
        return torch.ones_like(F)
    return (F + damp * scale).sqrt()


def low_rank_decomposition(weight, rank_ratio=0.1, parameter_ratio=0.15, remove_criteria="max_eigenvalue",
                           log_level="INFO", return_dict=False, svd="full", niter=4, oversample=None, input_cov=None,
                           _whitened=None, output_fisher=None):
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
    :param input_cov:       ``C = E[x x^T]`` (in x in) of the layer's inputs (:func:`collect_input_covariance`):
                            fit ``L R`` to minimise ``E||(W - L R) x||^2`` instead of ``||W - L R||_F`` (the
                            activation-aware, "whitened" SVD of SVD-LLM: truncated SVD of ``W K`` with
                            ``C = K K^T`` (Cholesky), mapped back by ``K^-1``; whitening in float64, SVD in
                            float32). ``C`` is damped by ``1e-6 * mean(diag C)`` (more if a singular ``C`` needs
                            it); a zero ``C`` falls back to the plain SVD (with a warning). Then ``U, S, Vh`` of
                            the dict are those of ``W K`` and the dict also holds ``K_inv``.
    :param output_fisher:   ``F = E[(dLoss/dy)^2]`` (out) of the layer's outputs (:func:`collect_output_fisher`):
                            weight each output by ``F`` too, i.e. minimise ``E[sum_i F_i ((W - L R) x)_i^2]``, the
                            second-order loss increase (two-sided whitening, as FWSVD + SVD-LLM): truncated SVD of
                            ``D^1/2 W K`` (``D = diag(F)``, damped by ``1e-6 * mean(F)``), mapped back by
                            ``D^-1/2``. The dict then also holds ``d`` (the ``D^1/2`` vector). ``F = 1`` gives the
                            one-sided (or, without ``input_cov``, the plain) SVD.
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
    K_inv = None
    if input_cov is not None:
        if tuple(input_cov.shape) != (W, W):
            raise ValueError(f"input_cov must be {W}x{W} (in_features of the {H}x{W} weight), got "
                             f"{tuple(input_cov.shape)}")
        K, K_inv, info = _whitened if _whitened is not None else _whitening(input_cov.to(A.device))
        if K is None:
            logger.warning("low_rank_decomposition: %s", info["fallback"])
        else:
            if info["fallback"]:
                logger.debug("low_rank_decomposition: %s by %.3g", info["fallback"], info["delta"])
            A = (weight.detach().to(torch.float64) @ K).float()  # whitened in float64, SVD in float32
    d = None
    if output_fisher is not None:
        d = _output_scale(output_fisher, H).to(A.device)
        A = (d[:, None] * A.double()).float()
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
    if K_inv is not None:  # back from the whitened coordinates: (W K)_r K^-1
        L, R = L.float(), (R.double() @ K_inv).float()
    if d is not None:  # and D^-1/2 (D^1/2 W K)_r
        L = (L.double() / d[:, None]).float()

    if log_level != "IGNORE":
        logger.debug("SVD (%s) of %dx%d -> rank %d, %d parameters", method, H, W, r, r * (H + W))
    if return_dict:
        out = {"L": L, "R": R, "U": U, "S": S, "Vh": Vh, "reduced_rank": r}
        if K_inv is not None:
            out["K_inv"] = K_inv
        if d is not None:
            out["d"] = d
        return out
    return L, R


# ----------------------------------------------------------------------------------------------------
# 2. The layer
# ----------------------------------------------------------------------------------------------------
# -- Training forward on the dense S ---------------------------------------------------------------------------
def _merge_pays(rows, in_f, out_f):
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


# -- Compacted inference: the forms, their cost model and timing, and the per-layer state (_FastPath) -----------
# Forms of a compacted layer's inference forward (x2: tokens x in; y: tokens x out); :func:`_derive` builds the
# tensors each one multiplies by. Row form (S keeps k rows at output positions idx):
# "fused":      T = x [R; S_kept]^T, one GEMM; y = T[:, :r] L^T + b; y[:, idx] += T[:, r:r+k].
# "transposed": T' = [R; S_kept] x^T; y' = L T'[:r] + b; y'[idx] += T'[r:r+k] (contiguous rows); y = y'^T
#               copied to row-major.
# "onehot":     T = x [R; S_kept]^T; y = T [L | P]^T + b, P the one-hot columns of idx: two GEMMs, no scatter.
# "merged":     y = x (L R + S)^T + b with the dense weight (as fast as the dense layer; costs its memory).
# Column form (S keeps k columns at input positions idx, ``sparse_weight_pruned_cols`` out x k):
# "fused":      y = (x R^T) L^T + b, then y += x[:, idx] S_cols^T (a gather and an accumulating GEMM).
# "transposed": the same on x^T; y copied to row-major.
# "onehot":     T = x [R; E]^T with E the one-hot rows of idx (the gather as part of the GEMM);
#               y = T [L | S_cols]^T + b: two GEMMs.
# "merged":     as for rows.
COMPACT_PATHS = ("fused", "transposed", "onehot", "merged")
PREFER_CHOICES = ("speed", "memory")
PATH_CHOICES = ("cost", "timed")


def _check_prefer(prefer):
    if prefer not in PREFER_CHOICES:
        raise ValueError(f"prefer={prefer!r}: allowed values are {', '.join(map(repr, PREFER_CHOICES))}")


def _ceil8(n):
    return -(-n // 8) * 8


def _derive(layer, path):
    """Tensors that ``path`` multiplies by, from the current weights of the compacted ``layer`` (no gradient).

    Row form: ``rs`` = ``[R; 0; S_kept; 0]`` with r and k rounded up to multiples of 8 (zero rows), so the
    GEMMs' inner and output sizes stay multiples of 8; ``L`` gets matching zero columns. Column form:
    ``R`` and ``L`` padded the same way, ``S_cols`` as it is (``onehot``: ``[R; 0; E; 0]`` and
    ``[L | 0 | S_cols | 0]``). ``merged`` is the dense ``L R + S``.
    """
    L, R = layer.left.weight.detach(), layer.right.weight.detach()
    cols = layer.sparse_weight_pruned_cols is not None
    S = (layer.sparse_weight_pruned_cols if cols else layer.sparse_weight_pruned).detach()
    idx = layer._kept_index()
    r, k = layer.reduced_rank, idx.numel()
    if path == "merged":
        acc = torch.promote_types(L.dtype, torch.float32)  # bf16/fp16 weights: summed in fp32
        return {"w": torch.mm(L.to(acc), R.to(acc)).index_add_(1 if cols else 0, idx, S.to(acc)).to(L.dtype)}
    r8, k8 = _ceil8(r), _ceil8(k)
    lpad = torch.cat([L, L.new_zeros(L.shape[0], r8 - r)], dim=1)
    b_col = None if layer.bias is None else layer.bias.detach()[:, None]
    if cols:
        rpad = torch.cat([R, R.new_zeros(r8 - r, R.shape[1])])
        if path == "onehot":  # E[j, idx[j]] = 1: x E^T = x[:, idx]
            onehot = R.new_zeros(k8, R.shape[1])
            onehot[torch.arange(k, device=idx.device), idx] = 1
            return {"rs_t": torch.cat([rpad, onehot]).t(),
                    "lp_t": torch.cat([lpad, S, S.new_zeros(S.shape[0], k8 - k)], dim=1).t(), "r8": r8, "k": k}
        if path == "transposed":
            return {"r": rpad, "l": lpad, "s": S, "b_col": b_col, "r8": r8, "k": k, "cols": True}
        return {"r_t": rpad.t(), "l_t": lpad.t(), "s_t": S.t(), "r8": r8, "k": k, "cols": True}
    rs = torch.cat([R, R.new_zeros(r8 - r, R.shape[1]), S, S.new_zeros(k8 - k, S.shape[1])])
    if path == "onehot":  # [L | P] with P[idx[j], j] = 1: the sparse rows' add becomes part of the GEMM
        onehot = L.new_zeros(L.shape[0], k8)
        onehot[idx, torch.arange(k, device=idx.device)] = 1
        return {"rs_t": rs.t(), "lp_t": torch.cat([lpad, onehot], dim=1).t(), "r8": r8, "k": k}
    if path == "transposed":
        return {"rs": rs, "l": lpad, "b_col": b_col, "r8": r8, "k": k}
    return {"rs_t": rs.t(), "l_t": lpad.t(), "r8": r8, "k": k}


def _fwd_fused(x, d, idx, bias):
    if d.get("cols"):
        y = torch.mm(torch.mm(x, d["r_t"]), d["l_t"]) if bias is None else \
            torch.addmm(bias, torch.mm(x, d["r_t"]), d["l_t"])
        return y.addmm_(x.index_select(1, idx), d["s_t"]) if d["k"] else y
    t = torch.mm(x, d["rs_t"])
    h = t[:, :d["r8"]]
    y = torch.mm(h, d["l_t"]) if bias is None else torch.addmm(bias, h, d["l_t"])
    if d["k"]:
        y.index_add_(1, idx, t[:, d["r8"]:d["r8"] + d["k"]])
    return y


def _fwd_transposed(x, d, idx, bias):
    if d.get("cols"):
        h = torch.mm(d["r"], x.t())
        y = torch.mm(d["l"], h) if bias is None else torch.addmm(d["b_col"], d["l"], h)
        if d["k"]:
            y.addmm_(d["s"], x.index_select(1, idx).t())
        return y.t().contiguous()
    t = torch.mm(d["rs"], x.t())
    h = t[:d["r8"]]
    y = torch.mm(d["l"], h) if bias is None else torch.addmm(d["b_col"], d["l"], h)
    if d["k"]:
        y.index_add_(0, idx, t[d["r8"]:d["r8"] + d["k"]])
    return y.t().contiguous()  # a transposed view would push later ops (attention, views) off their fast paths


def _fwd_onehot(x, d, idx, bias):
    t = torch.mm(x, d["rs_t"])
    return torch.mm(t, d["lp_t"]) if bias is None else torch.addmm(bias, t, d["lp_t"])


def _fwd_merged(x, d, idx, bias):
    return F.linear(x, d["w"], bias)


_COMPACT_FORWARDS = {"fused": _fwd_fused, "transposed": _fwd_transposed, "onehot": _fwd_onehot,
                     "merged": _fwd_merged}
# Cost model (seconds) per device type: FLOP/s, bytes/s, fixed cost per kernel, cost factor of a scattered
# (strided) element update relative to a streamed one.
_MACHINE = {"cpu": (1.0e11, 2.0e10, 4e-6, 4.0), "cuda": (4.0e14, 2.5e12, 6e-6, 16.0)}


def _path_costs(in_f, out_f, r, k, n, elt, device_type, cols=False):
    """Predicted seconds of each path of :data:`COMPACT_PATHS` for ``n`` tokens (FLOPs + bytes moved + kernels).

    ``cols``: the column form (k kept columns of S). Deterministic: a function of the shapes, the element size
    and the device type only, so every process of a distributed run picks the same forms.
    """
    flops, bw, kernel, scatter = _MACHINE.get(device_type, _MACHINE["cpu"])
    r8, k8 = _ceil8(r), _ceil8(k)
    rk = r8 + k8
    x, y = n * in_f, n * out_f
    merged = (2 * n * in_f * out_f) / flops + elt * (x + in_f * out_f + y) / bw + kernel
    onehot = (2 * n * in_f * rk + 2 * n * rk * out_f) / flops + elt * (x + rk * in_f + 2 * n * rk + out_f * rk + y) \
        / bw + 2 * kernel
    if cols:  # x R^T, (.) L^T + b, gather x[:, idx], += x_idx S_cols^T
        gemms = (2 * n * in_f * r8 + 2 * n * r8 * out_f + 2 * n * k * out_f) / flops
        moved = x + r8 * in_f + 2 * n * r8 + out_f * r8 + y + (scatter * n * k + n * k + k * out_f + 2 * y if k else 0)
        fused = gemms + elt * moved / bw + (4 if k else 2) * kernel
        return {"merged": merged, "fused": fused, "transposed": fused + elt * 2 * y / bw + kernel, "onehot": onehot}
    first_f = 2 * n * in_f * rk  # x [R; S]^T
    first_b = x + rk * in_f + n * rk
    add = n * k * 3  # read z, read and write y
    return {
        "merged": merged,
        "fused": (first_f + 2 * n * r8 * out_f) / flops
        + elt * (first_b + n * r8 + out_f * r8 + y + scatter * add) / bw + (3 if k else 2) * kernel,
        "transposed": (first_f + 2 * n * r8 * out_f) / flops
        + elt * (first_b + n * r8 + out_f * r8 + y + add + 2 * y) / bw + (3 if k else 2) * kernel,
        "onehot": onehot,
    }


def _time_forms(layer, x2, candidates, reps=3):
    """Milliseconds of ``reps`` calls of each candidate form on ``x2`` (CUDA events on CUDA, a clock elsewhere)."""
    times = {}
    for path in candidates:
        d = layer._fast.derived(layer, path)
        fn, idx = _COMPACT_FORWARDS[path], layer._kept_index()
        fn(x2, d, idx, layer.bias)  # warm-up
        if x2.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn(x2, d, idx, layer.bias)
            end.record()
            end.synchronize()
            times[path] = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(x2, d, idx, layer.bias)
            times[path] = 1e3 * (time.perf_counter() - t0)
    return times


def _rank0_choice(index, device):
    """Under torch.distributed, every rank takes rank 0's ``index`` (one broadcast; all ranks must call it)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return index
    t = torch.tensor([index], dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


class _TimedChoices:
    """The forms chosen by timing (``layer.path_choice = "timed"``), one per shape class.

    Shape class: device, dtype, in/out features, r and k rounded up to multiples of 8 (k: to a power of two),
    row or column form, bias, token bucket and candidates; the layers of a class share one timing. One object
    is shared by the layers of a model (:func:`prune`, :func:`load_checkpoint` and :func:`load_compact` hand one
    to all the layers of the model they work on; a layer compacted on its own has its own), so the memo lives
    and dies with the model. Rank 0 times, every rank takes its choice (all ranks run the same forms).
    """

    def __init__(self):
        self.chosen = {}

    def choose(self, layer, x2, candidates, reps=3):
        cols, k = layer.sparse_weight_pruned_cols is not None, layer._kept_index().numel()
        key = (x2.device.type, x2.dtype, layer.in_feature, layer.out_feature, _ceil8(layer.reduced_rank),
               _ceil8(k).bit_length(), cols, layer.bias is not None, max(1, x2.shape[0]).bit_length(), candidates)
        if key not in self.chosen:
            dist = torch.distributed
            first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
            index = 0
            if first:
                times = _time_forms(layer, x2, candidates, reps)
                index = candidates.index(min(candidates, key=times.__getitem__))
            device = x2.device if x2.is_cuda else torch.device("cpu")
            self.chosen[key] = candidates[_rank0_choice(index, device)]
        return self.chosen[key]


def _tensor_stamp(t):
    """What changes when a tensor is re-pointed (``.data =``, ``.to()``), reshaped, or modified in place through
    itself or a view (its version).

    An in-place edit through ``.data`` bumps no version counter (PyTorch gives ``.data`` its own), and neither
    do FSDP2's re-gathers or ``torch.autograd._unsafe_preserve_version_counter``: see
    :meth:`LinearLoSparse.refresh`. Inference tensors have no version counter.
    """
    return None if t.is_inference() else t._version, t.data_ptr(), t.shape


def _sources_key(layer):
    """The layer's source tensors (by weak reference: a new tensor at a freed address is not taken for the old
    one) with their stamps (:func:`_tensor_stamp`)."""
    return tuple((weakref.ref(t), _tensor_stamp(t)) for t in layer._sources())


def _key_holds(layer, key):
    """Whether ``key`` (from :func:`_sources_key`) still describes the layer's source tensors."""
    sources = layer._sources()
    return key is not None and len(key) == len(sources) and all(
        ref() is t and stamp == _tensor_stamp(t) for (ref, stamp), t in zip(key, sources))


_PREPARED_PREFIX = "_prepared_"  # prepared tensors: non-persistent buffers of the layer, _prepared_<key of _derive>


class _FastPath:
    """A compacted layer's inference state, in one object per layer (``layer._fast``).

    - settings: ``prefer``, ``compact_path``, ``path_choice``, ``cache_derived`` (set through the layer's
      properties of those names, which call :meth:`refresh`);
    - the cache: ``tensors`` (form -> what :func:`_derive` built), ``key`` (the source tensors and their stamps
      they were built from, :func:`_sources_key`), ``paths`` (token bucket -> chosen form);
    - the choice: the cost model (:func:`_path_costs`), or with ``path_choice = "timed"`` ``timings``
      (:class:`_TimedChoices`, shared by the layers of a model); ``last_path``, the latest call's form;
    - the prepared form (:func:`prepare_for_inference`): ``prepared`` (the form, or None), ``prepared_meta`` (its
      non-tensor entries) and ``prepared_key``; its tensors are the layer's non-persistent buffers
      ``_prepared_<name>``, so they follow ``.to()`` and a compiled graph reads them as inputs.

    Pickling and deep copies keep the settings, the shared timings and the prepared form, not the cache.
    """

    def __init__(self):
        self.prefer, self.compact_path, self.path_choice, self.cache_derived = "speed", None, "cost", True
        self.timings = _TimedChoices()
        self.last_path = None
        self.prepared = self.prepared_meta = self.prepared_key = None
        self.forget()

    def forget(self):
        """Drop the derived tensors and the forms chosen per token bucket."""
        self.key, self.tensors, self.paths = None, {}, {}

    def __getstate__(self):
        state = dict(self.__dict__, prepared_key=None)  # weak references: the prepared buffers are re-derived
        state.update(key=None, tensors={}, paths={})
        return state

    # -- invalidation -------------------------------------------------------------------------------------
    def refresh(self, layer):
        """Forget the cache; re-derive the prepared buffers in place (see :meth:`LinearLoSparse.refresh`)."""
        self.forget()
        if self.prepared is not None:
            self.refresh_prepared(layer)

    def moved(self):
        """After ``.to()``/``.half()``: the cache is rebuilt and the prepared buffers re-derived on next use."""
        self.forget()
        self.prepared_key = None

    # -- choice ---------------------------------------------------------------------------------------------
    def path_for(self, layer, x2):
        """The form for this many tokens: ``compact_path`` if set, else the cheapest by :func:`_path_costs`
        (deterministic, the same on every rank), or with ``path_choice = "timed"`` the fastest by one timing per
        shape class (:class:`_TimedChoices`); the choice is kept per token bucket (powers of two)."""
        if self.compact_path is not None:
            return self.compact_path
        bucket = max(1, x2.shape[0]).bit_length()
        if bucket in self.paths:
            return self.paths[bucket]
        candidates = COMPACT_PATHS if self.prefer == "speed" else COMPACT_PATHS[:-1]
        compiling = torch.compiler.is_compiling()
        capturing = x2.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.path_choice == "timed" and not compiling and not capturing:
            path = self.timings.choose(layer, x2, candidates)
            keep = set(self.paths.values()) | {path}
            self.tensors = {p: d for p, d in self.tensors.items() if p in keep}  # only the chosen forms stay
        else:
            costs = _path_costs(layer.in_feature, layer.out_feature, layer.reduced_rank,
                                layer._kept_index().numel(), 1 << (bucket - 1), x2.element_size(), x2.device.type,
                                cols=layer.sparse_weight_pruned_cols is not None)
            path = min(candidates, key=costs.__getitem__)
        if not compiling:
            self.paths[bucket] = path
        return path

    def path_for_tokens(self, layer, tokens):
        """The form the layer's own rule picks for ``tokens`` rows per call; leaves nothing cached."""
        w = layer.left.weight
        if w.is_cuda:  # a timed choice runs on real memory
            x2 = torch.zeros(tokens, layer.in_feature, device=w.device, dtype=w.dtype)
        else:  # the cost model reads only the shape, the element size and the device type
            x2 = torch.zeros((), device=w.device, dtype=w.dtype).expand(tokens, layer.in_feature)
        with torch.no_grad():
            path = self.path_for(layer, x2)
        self.forget()
        return path

    def describe(self):
        """The forms taken so far, by token count: ``"fused"``, ``"fused<=127,merged"`` (up to 127 tokens
        ``fused``, above ``merged``); ``"pending"`` before the first inference call."""
        if self.prepared is not None:  # prepare_for_inference: one form for every call
            return self.prepared
        if self.compact_path is not None:
            return self.compact_path
        paths = sorted(self.paths.items())
        if not paths:  # under torch.compile the choice is not stored; the latest call's is known
            return self.last_path or "pending"
        parts = [p if b == paths[-1][0] else f"{p}<={(1 << b) - 1}" for b, p in paths]
        runs = [parts[0]]
        for (b, p), part in zip(paths[1:], parts[1:]):  # one entry per run of the same path
            if p == runs[-1].split("<=")[0]:
                runs[-1] = part
            else:
                runs.append(part)
        return ",".join(runs)

    # -- derived tensors ------------------------------------------------------------------------------------
    def derived(self, layer, path):
        """The cached tensors of ``path``; all rebuilt when a source tensor was replaced or modified in place."""
        if not _key_holds(layer, self.key):
            self.tensors, self.key = {}, _sources_key(layer)
        if path not in self.tensors:
            with torch.inference_mode(False), torch.no_grad():
                self.tensors[path] = _derive(layer, path)
        return self.tensors[path]

    def prepare(self, layer, path):
        """Hold ``path``'s tensors as the layer's buffers from now on (:func:`prepare_for_inference`)."""
        self.prepared = path
        self.refresh_prepared(layer)

    def refresh_prepared(self, layer):
        """Re-derive the prepared form's tensors into the layer's buffers: in place when shape, dtype and device
        hold (a compiled graph or a CUDA graph keeps reading the same storage), else as new buffers."""
        with torch.inference_mode(False), torch.no_grad():
            d = _derive(layer, self.prepared)
            tensors = {key: t for key, t in d.items() if torch.is_tensor(t)}
            for name in [b for b in layer._buffers if b.startswith(_PREPARED_PREFIX)]:
                if name[len(_PREPARED_PREFIX):] not in tensors:  # another form's, from an earlier preparation
                    del layer._buffers[name]
            params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
            for key, t in tensors.items():
                name = _PREPARED_PREFIX + key
                if t.untyped_storage().data_ptr() in params:
                    t = t.clone()  # a view of a parameter (the bias column): a buffer of its own
                buf = layer._buffers.get(name)
                if buf is not None and buf.shape == t.shape and buf.dtype == t.dtype and buf.device == t.device:
                    buf.copy_(t)
                else:
                    layer.register_buffer(name, t, persistent=False)
        self.prepared_meta = {key: v for key, v in d.items() if key not in tensors}
        self.prepared_key = _sources_key(layer)

    def _prepared_tensors(self, layer, x2):
        """The prepared form's tensors (buffers); eager calls re-derive stale ones first."""
        if not torch.compiler.is_compiling() and not (x2.is_cuda and torch.cuda.is_current_stream_capturing()):
            if not _key_holds(layer, self.prepared_key):
                self.refresh_prepared(layer)
        d = dict(self.prepared_meta)
        d.update({name[len(_PREPARED_PREFIX):]: t for name, t in layer._buffers.items()
                  if name.startswith(_PREPARED_PREFIX)})
        return d

    # -- the forward -----------------------------------------------------------------------------------------
    def forward(self, layer, x):
        """Inference of a compacted layer: x flattened to 2-D (the bias stays in the GEMM), one form of
        :data:`COMPACT_PATHS` run on derived tensors: the prepared buffers, else the cached tensors of the form
        chosen for this token bucket, reused while L, R, S, the bias and the kept indices are the same tensors,
        unmodified. Under ``torch.compile`` (and with ``cache_derived = False``) they are derived on every call,
        inside the graph."""
        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
        if self.prepared is not None:
            path, d = self.prepared, self._prepared_tensors(layer, x2)
        else:
            path = self.path_for(layer, x2)
            if torch.compiler.is_compiling() or not self.cache_derived:
                d = _derive(layer, path)
            else:
                d = self.derived(layer, path)
        self.last_path = path
        y = _COMPACT_FORWARDS[path](x2, d, layer._kept_index(), layer.bias)
        return y if x.dim() == 2 else y.view(*shape[:-1], layer.out_feature)


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
    lives in one :class:`_FastPath` object, ``layer._fast``.
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
        self._fast = _FastPath()
        self.register_load_state_dict_post_hook(LinearLoSparse._invalidate_derived)

    # -- inference settings (held by ``_fast``): each takes effect on the next call ----------------------
    @property
    def prefer(self):
        return self._fast.prefer

    @prefer.setter
    def prefer(self, value):
        _check_prefer(value)
        self._fast.prefer = value
        self.refresh()

    @property
    def compact_path(self):
        return self._fast.compact_path

    @compact_path.setter
    def compact_path(self, value):
        if value is not None and value not in _COMPACT_FORWARDS:
            raise ValueError(f"compact_path={value!r}: allowed values are None, " + ", ".join(map(repr, COMPACT_PATHS)))
        self._fast.compact_path = value
        self.refresh()

    @property
    def path_choice(self):
        return self._fast.path_choice

    @path_choice.setter
    def path_choice(self, value):
        if value not in PATH_CHOICES:
            raise ValueError(f"path_choice={value!r}: allowed values are " + ", ".join(map(repr, PATH_CHOICES)))
        self._fast.path_choice = value
        self.refresh()

    @property
    def cache_derived(self):
        return self._fast.cache_derived

    @cache_derived.setter
    def cache_derived(self, value):
        self._fast.cache_derived = bool(value)
        self.refresh()

    @property
    def last_path(self):
        """The form of the latest compacted inference call (None before it)."""
        return self._fast.last_path

    @last_path.setter
    def last_path(self, value):
        self._fast.last_path = value

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
        return int((rows.full_tensor() if _is_sharded(rows) else rows).sum())  # FSDP2: all ranks call this

    @property
    def kept_cols(self):
        """Number of columns of S that carry a nonzero entry (what column compaction keeps)."""
        if not self.has_sparse:
            return 0
        if self.sparse_weight_pruned_cols is not None:
            return int(self.sparse_weight_pruned_cols.shape[1])
        w = self.sparse_weight_pruned if self.is_compacted else self.sparse.weight
        cols = (_local(w) != 0).any(dim=0).to(torch.int32)
        if _is_sharded(w):  # FSDP2 row shards: a column is kept if any rank's rows keep it (all ranks call this)
            torch.distributed.all_reduce(cols, op=torch.distributed.ReduceOp.MAX, group=w.device_mesh.get_group())
        return int(cols.sum())

    def _sparse_form(self):
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
            n += self._sparse_form()[2] if compact or self.is_compacted else self.out_feature * self.in_feature
        return n

    def extra_repr(self):
        """Never communicates: an FSDP2-sharded S (``DTensor``) is shown as such, not counted."""
        if not self.has_sparse:
            rows = "sparse_rows=none"
        elif self.sparse_weight_pruned_cols is not None:
            rows = f"sparse_cols={self.sparse_weight_pruned_cols.shape[1]}/{self.in_feature}"
        elif self.sparse_weight_pruned is not None:
            rows = f"sparse_rows={self.sparse_weight_pruned.shape[0]}/{self.out_feature}"
        elif _is_sharded(self.sparse.weight):
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
           and the kept part of S (:meth:`_FastPath.forward`).
        """
        if not self.is_compacted:
            return self._forward_dense_s(x)
        if torch.is_grad_enabled() and self._weights_need_grad():
            return self._forward_kept(x)
        return self._fast.forward(self, x)

    def _forward_dense_s(self, x):
        """A call with many rows multiplies by the merged ``L R + S`` (:class:`_MergedLinear`), one with few
        rows runs the factored formula (:func:`_merge_pays`); without S, ``x R^T L^T + b``."""
        if not self.has_sparse:
            return F.linear(self.right(x), self.left.weight, self.bias)
        if _merge_pays(x.numel() // x.shape[-1], self.in_feature, self.out_feature):
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

    def _kept_index(self):
        return self.nonzero_idx if self.sparse_weight_pruned is not None else self.nonzero_col_idx

    def _sources(self):
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
        self._fast.refresh(self)

    def _invalidate_derived(self, *args, **kwargs):  # load_state_dict post-hook
        self.refresh()

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda(): derived tensors follow on next use
        self._fast.moved()
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
            self._set_compact(w.detach()[rows].clone(), rows, requires_grad=w.requires_grad)
        else:
            self._set_compact_cols(w.detach()[:, cols].clone(), cols, requires_grad=w.requires_grad)

    def _set_compact(self, rows, idx, requires_grad=True):
        if hasattr(self, "sparse"):
            del self.sparse
        # No kept row: the forward never uses the (empty) parameter, so it must not ask for a gradient (under
        # DDP a trainable parameter without one stops the run).
        self.sparse_weight_pruned = nn.Parameter(rows, requires_grad=requires_grad and rows.numel() > 0)
        self.nonzero_idx = idx.to(device=rows.device, dtype=torch.long)
        self.refresh()

    def _set_compact_cols(self, cols, idx, requires_grad=True):
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

    ``input_cov`` (optional keyword): ``{qualified layer name: C}`` from :func:`collect_input_covariance`; each
    layer is then fitted by the activation-aware SVD (see :func:`low_rank_decomposition`), layers sharing one
    ``C`` tensor share its eigendecomposition. Every replaced layer must have an entry (checked before any SVD).
    Or an :class:`InputCovariances` (streaming): one group of blocks measured and replaced at a time.

    :return: list of ``{"name", "in_features", "out_features", "rank"}``, one per replaced layer.
    """
    allow_name = DEFAULT_ALLOW_NAME if allow_name is None else list(allow_name)
    block_name = DEFAULT_BLOCK_NAME if block_name is None else list(block_name)
    input_cov = kwargs.pop("input_cov", None)
    replaced, memo = [], {}
    if input_cov is not None and do_svd:
        targets = _linear_targets(module, allow_name, block_name)
        groups = _input_groups(input_cov, [n for n, _ in targets], "substitute_layer_weights")
        if len(groups) > 1:  # streaming: each group measured, then replaced, last group first
            linears = dict(targets)
            for names, source in reversed(groups):
                kw = dict(kwargs, _input_cov=source(names), _whitened={})
                for n in names:
                    memo[id(linears[n])] = _losparse_from_linear(linears[n], parameter_ratio, has_sparse, True, kw, n)
                    _set_submodule(module, n, memo[id(linears[n])])
                del kw
            replaced = [{"name": n, "in_features": lin.in_features, "out_features": lin.out_features,
                         "rank": memo[id(lin)].reduced_rank} for n, lin in targets]
        else:
            names, source = groups[0]
            kwargs["_input_cov"], kwargs["_whitened"] = source(names) if callable(source) else source, {}
    # the walk builds every Linear not built yet (none when streaming) and puts it under all its names
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
                memo[id(child)] = _losparse_from_linear(child, ratio, has_sparse, do_svd, kwargs, qual)
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
def _losparse_from_linear(linear, parameter_ratio, has_sparse, do_svd, kwargs, name=None):
    W = linear.weight
    H, Win = W.shape
    kw = {"device": W.device, "dtype": W.dtype}
    if do_svd:
        kwargs = dict(kwargs)
        covs, whitened = kwargs.pop("_input_cov", None), kwargs.pop("_whitened", None)
        if covs is not None:
            C = covs[name]
            if id(C) not in whitened:  # q/k/v (gate/up) share one C: one eigendecomposition
                whitened[id(C)] = (C, _whitening(C.to(W.device)))
            kwargs["input_cov"], kwargs["_whitened"] = C, whitened[id(C)][1]
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


def _linear_targets(module, allow_name=None, block_name=None, prefix=""):
    """``[(qualified name, nn.Linear)]`` that :func:`substitute_layer_weights` would replace (same rules)."""
    allow_name = DEFAULT_ALLOW_NAME if allow_name is None else list(allow_name)
    block_name = DEFAULT_BLOCK_NAME if block_name is None else list(block_name)
    out, seen = [], set()
    for name, child in module._modules.items():
        if child is None:
            continue
        if type(child) is nn.Linear and any(name in a for a in allow_name):
            if id(child) not in seen:
                seen.add(id(child))
                out.append((prefix + name, child))
        elif not any(name in b for b in block_name):
            out += _linear_targets(child, allow_name, block_name, prefix + name + ".")
    return out


@torch.no_grad()
def collect_input_covariance(model, batches, allow_name=None, block_name=None, names=None, chunk=4096,
                             stop_early=False):
    """Calibration: ``C = E[x x^T]`` of the inputs of the layers STEP 1 would replace, over ``batches``.

    ``batches``: an iterable of dicts (``model(**batch)``) or tensors (``model(batch)``), e.g. a few blocks
    of text; labels are dropped. Every token row counts once (pass unpadded blocks). The per-chunk products
    ``x^T x`` (at most ``chunk`` rows) are taken in float32 and summed in float64. Layers called in a row
    on the same input tensor (q/k/v, gate/up) share one accumulation and get the same ``C`` object.
    ``names`` restricts the statistics to those layers (to bound memory on large models: one pass per group
    of decoder blocks, each ``C`` used by :func:`substitute_layer_weights` and dropped; :class:`InputCovariances`
    does that). ``stop_early``: end each forward pass once every layer in ``names`` has seen its input (the rest
    of the model is not run; for a group of early blocks that saves most of the pass).

    :return: ``{qualified layer name: C}`` (float64, on the layers' device); logs tokens, memory and time.
    """

    targets = _calibration_targets(model, allow_name, block_name, names, "collect_input_covariance")
    sums, counts, owner, last, seen = {}, {}, {}, {"x": None, "name": None}, set()

    def hook(name):
        def pre(mod, args):
            accumulate(name, args[0])
            seen.add(name)
            if stop_early and len(seen) == len(targets):
                raise _CalibrationDone
        return pre

    def accumulate(name, x):
        if x is last["x"]:  # the same tensor as the previous layer: share its accumulation
            if owner.setdefault(name, owner[last["name"]]) != owner[last["name"]]:
                raise RuntimeError(f"collect_input_covariance: {name} changed its input sharing between batches")
            return
        if owner.setdefault(name, name) != name:
            raise RuntimeError(f"collect_input_covariance: {name} changed its input sharing between batches")
        last["x"], last["name"] = x, name
        x2 = x.detach().reshape(-1, x.shape[-1])
        acc = sums.get(name)
        if acc is None:
            acc = sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64, device=x2.device)
            counts[name] = 0
        for i in range(0, x2.shape[0], chunk):
            c = x2[i:i + chunk].float()
            acc += (c.mT @ c).double()
        counts[name] += x2.shape[0]

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets]
    was_training = model.training
    model.eval()
    start, batches_seen = time.perf_counter(), 0
    try:
        for batch in batches:
            last["x"] = last["name"] = None
            seen.clear()
            try:
                _run_batch(model, batch)
            except _CalibrationDone:
                pass
            batches_seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        last["x"] = None
    missing = [n for n, _ in targets if n not in owner]
    if missing:
        raise RuntimeError(f"collect_input_covariance: {len(missing)} layers were never called, e.g. {missing[:3]}")
    for n in sums:
        sums[n] /= max(counts[n], 1)
    covs = {n: sums[owner[n]] for n, _ in targets}
    nbytes = sum(c.numel() * c.element_size() for c in sums.values())
    logger.info("LoSparse calibration: %d batches, %d tokens, %d layers (%d distinct inputs), statistics %.1f MiB, "
                "%.1f s", batches_seen, max(counts.values()), len(covs), len(sums), nbytes / 2 ** 20,
                time.perf_counter() - start)
    return covs


class _CalibrationDone(Exception):
    """Raised by :func:`collect_input_covariance` (``stop_early``) to end a forward pass."""


def _block_key(name):
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3``: the name up to its first numeric part (the block)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return name


class InputCovariances:
    """Streaming calibration: the statistics of :func:`collect_input_covariance` a group of blocks at a time.

    Holding ``C`` for every layer at once takes ``sum in^2`` float64 entries per distinct input: about 1.4 GB
    per LLaMA-7B decoder block, 44 GB for the model. ``InputCovariances(model, batches, allow_name, block_name,
    blocks_per_pass=1)`` holds none: ``stats.groups`` lists the layer names of each pass (``blocks_per_pass``
    consecutive blocks, a block being the name up to its first numeric part, ``model.layers.3``), and
    ``stats(names)`` runs the batches through the model once (stopped after the last of those layers) and returns
    ``{name: C}`` for them. :func:`substitute_layer_weights` (``input_cov=stats``) and :func:`one_shot_allocate`
    take it in place of the dict: they ask for one group at a time, the last group first, so that the layers they
    have replaced are downstream of the ones being measured and every ``C`` is that of the original model (the
    result equals the one of the dict). Peak memory: one group's statistics and SVDs. ``batches`` must be a
    re-iterable sequence (a list), run once per group and twice per group by :func:`one_shot_allocate`.
    """

    def __init__(self, model, batches, allow_name=None, block_name=None, blocks_per_pass=1):
        if not isinstance(blocks_per_pass, int) or blocks_per_pass < 1:
            raise ValueError(f"blocks_per_pass must be an integer >= 1, got {blocks_per_pass!r}")
        if iter(batches) is batches:
            raise TypeError("InputCovariances: batches must be a re-iterable sequence (e.g. a list), not an iterator: "
                            "it is run once per group of layers")
        targets = _calibration_targets(model, allow_name, block_name, None, "InputCovariances")
        self.model, self.batches, self.allow_name, self.block_name = model, batches, allow_name, block_name
        blocks = []
        for n, _ in targets:
            if not blocks or _block_key(n) != blocks[-1][0]:
                blocks.append((_block_key(n), []))
            blocks[-1][1].append(n)
        self.groups = [sum((names for _, names in blocks[i:i + blocks_per_pass]), [])
                       for i in range(0, len(blocks), blocks_per_pass)]
        self.names = [n for n, _ in targets]

    def __call__(self, names):
        logger.info("LoSparse streaming calibration: %d layers, from %s", len(names), names[0])
        return collect_input_covariance(self.model, self.batches, self.allow_name, self.block_name, names=names,
                                        stop_early=True)


def _input_groups(input_cov, names, what):
    """``[(names of a group, {name: C} or a callable giving it)]`` for a dict or an :class:`InputCovariances`."""
    if isinstance(input_cov, InputCovariances):
        if set(input_cov.names) != set(names):
            raise ValueError(f"{what}: the InputCovariances were set up for other layers ({len(input_cov.names)} "
                             f"layers, e.g. {input_cov.names[:2]}) than the {len(names)} to replace (e.g. "
                             f"{names[:2]}): build them with the same model, allow_name and block_name")
        return [(g, input_cov) for g in input_cov.groups]
    missing = [n for n in names if n not in input_cov]
    if missing:
        raise ValueError(f"{what}: input_cov has no statistics for {len(missing)} of the {len(names)} layers to "
                         f"replace, e.g. {missing[:3]}; collect them with collect_input_covariance on the same "
                         "allow_name/block_name")
    return [(list(names), input_cov)]


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


def _calibration_targets(model, allow_name, block_name, names, what):
    targets = _linear_targets(model, allow_name, block_name)
    if names is not None:
        unknown = sorted(set(names) - {n for n, _ in targets})
        if unknown:
            raise ValueError(f"names: {unknown[:3]} are not layers to replace (allow_name={allow_name})")
        targets = [(n, m) for n, m in targets if n in set(names)]
    if not targets:
        raise ValueError(f"{what}: no nn.Linear matches allow_name={allow_name}")
    return targets


def collect_output_fisher(model, batches, allow_name=None, block_name=None, names=None):
    """Calibration: ``F = E[(dLoss/dy)^2]`` per output feature of the layers STEP 1 would replace (diagonal Fisher).

    ``Loss`` is the next-token cross-entropy of a causal LM, summed over the tokens of a batch (labels: the
    batch's ``labels`` if it is a dict holding them, else its ``input_ids``; ``-100`` ignored), so ``dLoss/dy``
    is each token's own gradient; ``F`` is the mean of its square over every token row of ``y``. One backward
    pass per batch (``torch.autograd.grad`` on the layers' outputs; no parameter ``.grad`` is touched). With
    ``C`` from :func:`collect_input_covariance`, ``1/2 sum_i F_i E[((W - W')_i x)^2]`` is the second-order
    loss increase of replacing ``W`` by ``W'``, comparable across layers (:func:`one_shot_allocate`).

    :return: ``{qualified layer name: F}`` (float64 vectors of ``out_features``); logs tokens and time.
    """
    targets = _calibration_targets(model, allow_name, block_name, names, "collect_output_fisher")
    sums, counts, outs = {}, {}, []

    def hook(name):
        def fwd(mod, args, out):
            if out.requires_grad:
                outs.append((name, out))
        return fwd

    flags = [(m.weight, m.weight.requires_grad) for _, m in targets]
    handles = [m.register_forward_hook(hook(n)) for n, m in targets]
    was_training = model.training
    model.eval()
    start, tokens = time.perf_counter(), 0
    try:
        for w, _ in flags:
            w.requires_grad_(True)  # so that every output is in the graph (no .grad is accumulated)
        with torch.enable_grad():
            for batch in batches:
                outs.clear()
                if isinstance(batch, dict):
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    labels = batch.get("labels", batch.get("input_ids"))
                else:
                    inputs, labels = {"input_ids": batch}, batch
                logits = model(**inputs).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum")
                grads = torch.autograd.grad(loss, [o for _, o in outs], allow_unused=True)
                for (n, o), g in zip(outs, grads):
                    g2 = torch.zeros_like(o) if g is None else g.detach()
                    g2 = g2.reshape(-1, g2.shape[-1]).double()
                    if n not in sums:
                        sums[n], counts[n] = torch.zeros(g2.shape[1], dtype=torch.float64, device=g2.device), 0
                    sums[n] += (g2 * g2).sum(0)
                    counts[n] += g2.shape[0]
                tokens += int((labels[:, 1:] != -100).sum())
                del logits, loss, grads
    finally:
        outs.clear()
        for h in handles:
            h.remove()
        for w, flag in flags:
            w.requires_grad_(flag)
        model.train(was_training)
    missing = [n for n, _ in targets if n not in sums]
    if missing:
        raise RuntimeError(f"collect_output_fisher: {len(missing)} layers were never called, e.g. {missing[:3]}")
    fisher = {n: sums[n] / max(counts[n], 1) for n, _ in targets}
    logger.info("LoSparse calibration (output Fisher): %d predicted tokens, %d layers, %.1f s", tokens, len(fisher),
                time.perf_counter() - start)
    return fisher


def _fisher_svds(targets, input_cov, output_fisher):
    """``{name: {"U", "S", "Vh", "K_inv", "d"}}``: full SVD of ``D^1/2 W K`` of every target (shared K computed once)."""
    whitened, out = {}, {}
    for name, lin in targets:
        W = lin.weight.detach()
        kw = {}
        if input_cov is not None:
            C = input_cov[name]
            if id(C) not in whitened:
                whitened[id(C)] = (C, _whitening(C.to(W.device)))
            kw = {"input_cov": C, "_whitened": whitened[id(C)][1]}
        dec = low_rank_decomposition(W, parameter_ratio=1.0, return_dict=True, log_level="IGNORE", svd="full",
                                     output_fisher=None if output_fisher is None else output_fisher[name], **kw)
        out[name] = {"U": dec["U"], "S": dec["S"], "Vh": dec["Vh"], "K_inv": dec.get("K_inv"), "d": dec.get("d")}
    return out


def _allocation_table(U, S, ranks, rows=True):
    """``(E, res)``: ``res[j, i]`` the weighted energy of row i of ``A - A_r`` (``A = U diag(S) Vh``, r = ranks[j]);
    ``E[j, k]`` the weighted error with rank ``ranks[j]`` and the ``k`` rows of largest ``res[j]`` kept exactly."""
    P = U.double() ** 2 * S.double() ** 2  # energy of component k in row i
    tail = torch.cat([P.flip(1).cumsum(1).flip(1), torch.zeros_like(P[:, :1])], dim=1).clamp_min(0)
    res = tail[:, ranks].mT.contiguous()  # G x H
    total = res.sum(1, keepdim=True)
    if not rows:
        return total, res
    kept = torch.cat([torch.zeros_like(total), res.sort(dim=1, descending=True).values.cumsum(1)], dim=1)
    return (total - kept).clamp_min(0), res


def _allocate(tables, budget, fill=True, iters=80):
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
                            ratio = float(E[j, k] - E[jj, kk]) / dc
                            if best is None or ratio > best[0]:  # gains are >= 0 (up to rounding)
                                best = (ratio, i, jj, kk, dc)
            if best is None:
                break
            _, i, jj, kk, dc = best
            choice[i], total = (jj, kk), total + dc
    return choice, total, lam


def _allocated_layer(lin, d, r, k, refit, rows):
    """The :class:`LinearLoSparse` of :func:`one_shot_allocate` for one layer: rank ``r`` and ``k`` kept rows of S,
    from ``d`` (the SVD of its whitened weight, :func:`_fisher_svds`). Returns ``(layer, weighted error)``."""
    W = lin.weight.detach()
    H, Win = W.shape
    U, S, Vh = d["U"], d["S"], d["Vh"]
    E, res = _allocation_table(U.cpu(), S.cpu(), torch.tensor([r]), rows)
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


def _run_batch(model, batch):
    """``model(**batch)`` without its labels, or ``model(batch)`` for a tensor (the calibration passes)."""
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(batch)


def _blocks_of(module, names, what):
    """``(prefix, blocks, {index: [names]})``: the ``nn.ModuleList`` (at ``prefix``) whose blocks hold ``names``."""
    found = {}
    for n in names:
        key = _block_key(n)
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
        raise _CalibrationDone
    handle = layer.register_forward_pre_hook(pre)
    try:
        _block_call(block, h, call)
    except _CalibrationDone:
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
    ``M = (1 - damp) E[x~ x~^T] + damp E[x x^T]`` and ``N = (1 - damp) E[x x~^T] + damp E[x x^T]``.
    Returns the summed weighted error."""
    prefix, blocks, holding = _blocks_of(module, list(built), "one_shot_allocate(sequential=...)")
    first, last = min(holding), max(holding)
    calls, hidden = {i: [] for i in range(first, last + 1)}, []  # each block's own arguments (models with sliding-
    # window and full-attention layers give each block its own mask), one forward pass per batch

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
                raise _CalibrationDone
        return pre
    handles = [blocks[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in calls]
    try:
        for batch in batches:
            try:
                _run_batch(module, batch)
            except _CalibrationDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if not hidden or any(len(c) != len(hidden) for c in calls.values()):
        raise ValueError("one_shot_allocate(sequential=...): the calibration batches did not run every block once")
    dense_h, comp_h = hidden, list(hidden)
    total = 0.0
    for i in range(first, last + 1):
        block, names = blocks[i], holding.get(i, [])
        rel = {n: n[len(f"{prefix}.{i}."):] for n in names}

        def use(which):
            for n in names:
                _set_submodule(module, n, linears[n] if which == "dense" else built[n])
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
                x, xt = x.reshape(-1, x.shape[-1]), xt.reshape(-1, xt.shape[-1])
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
            chol = _whitening(reg)[0]  # damped as the whitened SVD is (more if a singular M needs it)
            if chol is None:
                continue  # the inputs are zero: keep the fit to the original statistics
            reg = chol @ chol.mT
            for n in group:
                lin = linears[n]
                W = lin.weight.detach().double()
                W_eff = torch.cholesky_solve((W @ cross).mT, chol).mT
                target = types.SimpleNamespace(weight=W_eff.float(), bias=lin.bias)
                d = _fisher_svds([(n, target)], {n: reg}, output_fisher)[n]
                new, err = _allocated_layer(target, d, *plan[n], refit, rows)
                built[n] = new.to(lin.weight.dtype)
                _set_submodule(module, n, built[n])
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

    ``sequential``: calibration batches (as for :func:`collect_input_covariance`; may be the same ones). Then, with
    the ranks and numbers of kept rows chosen as above, the layers are refitted block by block (a block: an entry
    of the ``nn.ModuleList`` holding them, e.g. ``model.layers.3``), each group of layers sharing an input in call
    order, to the original layers' outputs given the inputs the already compressed blocks produce (SVD-LLM's
    sequential update, extended to the rows of S): ``min (1 - a) E||W x - W' x~||^2 + a E||(W - W') x||^2``
    (``a = sequential_damp`` in (0, 1]: 1 gives back the fit to the original inputs; the second term keeps the
    refit from overfitting the calibration tokens), solved exactly over the layer's form as the fit of
    ``W_eff = W N M^-1`` whitened by ``M = (1 - a) E[x~ x~^T] + a E[x x^T]`` (``N = (1 - a) E[x x~^T] + a E[x
    x^T]``; kept rows of S then hold rows of ``W_eff``). Costs about ten forward passes over the batches plus a
    second SVD per layer; memory: the hidden states entering the blocks, twice (original and compressed).

    Memory: with a dict ``input_cov`` the full SVDs of all layers are held at once (3x
    the weights); with an :class:`InputCovariances` (streaming) one group's statistics and SVDs at a time, and
    the error tables of all layers (``(min(in, out)/rank_multiple + 1) * (out + 1)`` float64 per layer: 17-45 MB
    per LLaMA-7B matrix, 5.6 GB of CPU memory for the model): each group is measured and decomposed twice, once
    for the tables and once (last group first) to build its layers; the result equals the one of the dict.

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
    targets = _linear_targets(module, allow_name, block_name)
    if not targets:
        raise ValueError(f"one_shot_allocate: no nn.Linear matches allow_name={allow_name}")
    names = [n for n, _ in targets]
    if sequential is not None:
        _blocks_of(module, names, "one_shot_allocate(sequential=...)")  # before the long work
    groups = [(names, None)] if input_cov is None else _input_groups(input_cov, names, "one_shot_allocate")
    missing = [] if output_fisher is None else [n for n in names if n not in output_fisher]
    if missing:
        raise ValueError(f"one_shot_allocate: output_fisher has no statistics for {len(missing)} of the "
                         f"{len(targets)} layers to replace, e.g. {missing[:3]}")
    start = time.perf_counter()
    linears, rows = dict(targets), "rows" in parts
    stream = len(groups) > 1

    def decompose(group, source):
        if _svds is not None:
            return _svds
        covs = source(group) if callable(source) else source
        return _fisher_svds([(n, linears[n]) for n in group], covs, output_fisher)

    tables, svds = {}, {}
    for group, source in groups:  # pass 1: the error table of every layer
        dec = decompose(group, source)
        for n in group:
            H, Win = linears[n].weight.shape
            q = dec[n]["S"].numel()
            ranks = (torch.unique(torch.cat([torch.arange(0, q, rank_multiple), torch.tensor([q])]))
                     if "lowrank" in parts else torch.zeros(1, dtype=torch.long))
            E, _ = _allocation_table(dec[n]["U"].cpu(), dec[n]["S"].cpu(), ranks, rows)
            tables[n] = (E, ranks, H + Win, Win + 1)
        if not stream:
            svds = dec
        del dec
    total_entries = sum(m.weight.numel() for _, m in targets)
    budget = math.floor(kept_fraction * total_entries)
    choice, stored, lam = _allocate([tables[n] for n in names], budget)
    choice = dict(zip(names, choice))
    before = sum(float(tables[n][0][j, k]) for n, (j, k) in choice.items())
    after, layers, built = 0.0, {}, {}
    for group, source in reversed(groups):  # pass 2: build, last group first (the earlier inputs stay as measured)
        dec = decompose(group, source) if stream else svds
        for n in group:
            j, k = choice[n]
            r = int(tables[n][1][j])
            layer, err = _allocated_layer(linears[n], dec[n], r, k, refit, rows)
            after += err
            _set_submodule(module, n, layer)
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


def _share_timed_choices(module):
    """Give every :class:`LinearLoSparse` of ``module`` one :class:`_TimedChoices` (one timing per shape class
    and model)."""
    shared = _TimedChoices()
    for m in module.modules():
        if isinstance(m, LinearLoSparse):
            m._fast.timings = shared


def prune(module, prefer="speed"):
    """Compact every :class:`LinearLoSparse` in ``module`` (see :meth:`LinearLoSparse.prune_sparse`).

    ``prefer`` sets how the compacted layers run inference: ``"speed"`` (default) may multiply by the merged
    dense ``L R + S`` where that is faster (it then holds that matrix in memory too); ``"memory"`` never
    builds it. Each S keeps its nonzero rows, or its nonzero columns when those store less (column-structured
    pruning). A layer whose S has neither a zero row nor a zero column (not pruned, or pruned unstructured)
    gains nothing: it is named in a warning, and :func:`export_compact` stores it as one dense matrix when
    that is smaller. The layers of ``module`` share one memo of timed form choices (``path_choice = "timed"``).
    Returns the number of layers compacted. Re-create the optimizer afterwards: the parameters changed.
    """
    _refuse_sharded(module, "prune")
    _check_prefer(prefer)
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LinearLoSparse)]
    no_gain = []
    for name, m in layers:
        if m.has_sparse and not m.is_compacted:
            m.prune_sparse()
            form, kept, _ = m._sparse_form()
            if kept == (m.out_feature if form == "rows" else m.in_feature):
                no_gain.append(name)
        m.prefer = prefer
    _share_timed_choices(module)
    if no_gain:
        logger.warning("LoSparse: %d layer(s) kept every row and every column of S (not pruned, or pruned "
                       "unstructured: --structured_method none): compaction saves nothing there, and export_compact "
                       "stores those whose L, R and S outsize the dense matrix as dense: %s", len(no_gain),
                       ", ".join(no_gain[:10]) + (" ..." if len(no_gain) > 10 else ""))
    logger.info("LoSparse: compacted %d layers", len(layers))
    return len(layers)


def refresh(module):
    """Call :meth:`LinearLoSparse.refresh` on every LoSparse layer of ``module`` ("the weights changed in a way
    PyTorch does not version", e.g. through ``.data``); returns the number of layers."""
    layers = [m for m in module.modules() if isinstance(m, LinearLoSparse)]
    for m in layers:
        m.refresh()
    return len(layers)


PREPARE_TOKENS = 4096  # rows per call a path is chosen for by default (BERT b32 x 128)


def prepare_for_inference(module, tokens=None, path=None):
    """Derive each compacted layer's inference tensors once and hold them as non-persistent buffers.

    For ``torch.compile`` (``fullgraph=True``, ``mode="reduce-overhead"``) and CUDA graphs: the graph reads the
    buffers as inputs instead of building ``[R; S_kept]``, the padded ``L`` (or the merged weight) on every
    call. Each layer runs one form of :data:`COMPACT_PATHS` for all calls: ``path`` if given, else the one the
    layer picks (``compact_path``, ``prefer``; the cost model, or a timing with ``path_choice = "timed"``) for
    ``tokens`` rows per call (batch x sequence length; default :data:`PREPARE_TOKENS`). The buffers
    (``_prepared_<name>``) are not in the state dict (keys and checkpoints unchanged), follow ``.to()``, and take
    about as much memory as the compacted weights (the dense matrix for ``merged``).

    Weights changed afterwards (in place, ``load_state_dict``, an optimizer step): an eager call notices it
    (version counters) and re-derives the buffers. A compiled model or a captured CUDA graph does not look:
    call ``prepare_for_inference(module)`` again. It re-derives the buffers in place (same storage, so no
    recompilation, and CUDA graphs replay with the new values) and keeps each layer's form unless ``tokens`` or
    ``path`` is given. Returns the number of layers prepared.
    """
    if path is not None and path not in COMPACT_PATHS:
        raise ValueError(f"prepare_for_inference(path={path!r}): allowed values are None, "
                         + ", ".join(map(repr, COMPACT_PATHS)))
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"prepare_for_inference(tokens={tokens!r}): a positive int (rows per call) or None")
    _refuse_sharded(module, "prepare_for_inference")
    layers = [m for m in module.modules() if isinstance(m, LinearLoSparse) and m.has_sparse and m.is_compacted]
    if not layers:
        raise ValueError("prepare_for_inference: the model has no compacted LinearLoSparse layer; call "
                         "utils.prune(model) (or load it with utils.load_compact) first")
    for m in layers:
        fast = m._fast
        chosen = path
        if chosen is None and (tokens is not None or fast.prepared is None):
            chosen = fast.path_for_tokens(m, tokens or PREPARE_TOKENS)
        fast.prepare(m, chosen or fast.prepared)
    logger.info("LoSparse: prepared %d compacted layers for inference (%s)", len(layers),
                ", ".join(sorted({m._fast.prepared for m in layers})))
    return len(layers)


# ----------------------------------------------------------------------------------------------------
# 4. The pruner
# ----------------------------------------------------------------------------------------------------
# Three parts composed by ``Pruner``: the cubic schedule (``cubic_schedule``), the importance statistics
# (``_Importance``) and one weighted k-th-score function (``_weighted_kth``). Where the processes differ (one process,
# DDP, FSDP2 row shards) is behind one small interface (``_Local``, ``_Replicated``, ``_RowShards``), picked from the
# parameters: the pruning maths reads the same in every mode.
PRUNER_NAMES = ("PLATON", "Magnitude")
STRUCTURED_METHODS = ("mean", "sum", "max", "min")
STRUCTURED_DIRECTIONS = ("row", "col", "row_col")
# ``row_col`` prunes rows of these projections and columns of the others.
ROW_COL_ROW_NAMES = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "query_proj", "key_proj", "value_proj")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
_SCHEDULE_KEYS = ("beta1", "beta2", "deltaT", "initial_threshold", "final_threshold", "initial_warmup", "final_warmup",
                  "warmup_steps")
_STAT_KINDS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


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


def _weighted_kth(scores, k, weights=None):
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


def _reduce(score, method, dim):
    """Aggregate element scores along ``dim`` (``mean|sum|max|min``)."""
    if method == "mean":
        return score.mean(dim=dim)
    if method == "sum":
        return score.sum(dim=dim)
    return score.amax(dim=dim) if method == "max" else score.amin(dim=dim)


class _Segment(collections.namedtuple("_Segment", "name axis shape offset size mult split")):
    """One masked matrix's place in a flat score tensor: ``name``; ``axis`` (1: a score per row, 0: per column,
    None: per entry); ``shape`` of its scores on this rank; ``offset``/``size`` in the flat tensor; ``mult``, the
    entries each score stands for; ``split``, whether the matrix's rows are spread over the ranks (FSDP2)."""
    __slots__ = ()

    def view(self, flat):
        """This matrix's part of ``flat`` shaped like its scores, the reduced axis kept (size 1) to broadcast."""
        v = flat[self.offset:self.offset + self.size].view(self.shape)
        return v if self.axis is None else v.unsqueeze(self.axis)


def _expand(segments, counts, device):
    """One float64 weight per score: ``counts[i]`` for each score of ``segments[i]``."""
    return torch.cat([torch.full((s.size,), float(c), dtype=torch.float64, device=device)
                      for s, c in zip(segments, counts)] or [torch.zeros(0, dtype=torch.float64, device=device)])


# Distribution: the few reductions in which one process, DDP and FSDP2 row shards differ --------------------------
class _Local:
    """One process: every matrix is whole here, every reduction is the identity."""

    def splits(self, p):
        """Whether the rows of parameter ``p`` are spread over the ranks."""
        return False

    def local(self, t):
        """The part of ``t`` this rank holds."""
        return t

    def sum_columns(self, cur, segments):
        """Complete, in place, the column sums of ``cur`` (this rank's rows' |S * G| summed per column)."""

    def columns(self, score, method, p):
        """One score per column of ``p`` from its element scores on this rank."""
        return _reduce(score, method, 0)

    def all_finite(self, finite):
        """Whether every rank's update is finite (a 0-dim bool tensor)."""
        return finite

    def agree(self, scores):
        """The scores every rank masks with."""
        return scores

    def multiplicities(self, segments, device):
        """``(weights, total)`` for the global k-th score: the multiplicity of every score :meth:`gather` returns
        (None when all are 1) and their sum, the number of entries of every masked matrix."""
        counts = [s.mult for s in segments]
        total = sum(s.size * c for s, c in zip(segments, counts))
        return (None if all(c == 1 for c in counts) else _expand(segments, counts, device)), total

    def gather(self, scores):
        """Every rank's ``scores``, concatenated in rank order."""
        return scores

    def full(self, t, segment):
        """The statistics of ``segment`` in the single-process layout (``state_dict``)."""
        return t

    def own(self, t, p, axis):
        """This rank's part of a single-process statistic ``t`` of ``p`` (``load_state_dict``)."""
        return t


class _Replicated(_Local):
    """DDP: every rank holds every matrix and the all-reduced gradients, so the statistics agree; at a mask step
    rank 0's scores are broadcast, so the masks can never drift apart (float noise, a non-deterministic kernel)."""

    def agree(self, scores):
        return _broadcast_from_rank0(scores)


class _RowShards(_Local):
    """FSDP2 (``fully_shard``): masked matrices are ``DTensor`` row shards (``Shard(0)`` on a 1-D mesh). Statistics
    of rows stay where the rows are; column sums and aggregates are all-reduced; the global k-th score comes from
    every rank's aggregated scores with their multiplicities (scores every rank holds, of columns, count on rank 0
    only); ``state_dict`` gathers the rows into the single-process layout."""

    def __init__(self, group):
        self.group = group
        self.first = torch.distributed.get_rank(group) == 0

    def splits(self, p):
        return _is_sharded(p)

    def local(self, t):
        return _local(t)

    @staticmethod
    def _own_rows(segment):
        return segment.split and segment.axis != 0

    def sum_columns(self, cur, segments):
        parts = [(s.offset, s.size) for s in segments if s.split and s.axis == 0]
        if not parts:
            return
        sums = torch.cat([cur[off:off + size] for off, size in parts])
        torch.distributed.all_reduce(sums, group=self.group)
        for (off, size), part in zip(parts, sums.split([size for _, size in parts])):
            cur[off:off + size].copy_(part)

    def columns(self, score, method, p):
        if not _is_sharded(p):
            return _reduce(score, method, 0)
        dist = torch.distributed
        if method in ("mean", "sum"):
            out, op = score.sum(dim=0), dist.ReduceOp.SUM
        else:
            op = dist.ReduceOp.MAX if method == "max" else dist.ReduceOp.MIN
            if score.shape[0] == 0:  # this rank holds no row
                out = score.new_full(score.shape[1:], float("-inf") if method == "max" else float("inf"))
            else:
                out = score.amax(dim=0) if method == "max" else score.amin(dim=0)
        out = out.contiguous()
        dist.all_reduce(out, op=op, group=self.group)
        return out / p.shape[0] if method == "mean" else out

    def all_finite(self, finite):
        flag = finite.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return flag.bool()

    def multiplicities(self, segments, device):
        counts = [s.mult if self.first or self._own_rows(s) else 0 for s in segments]
        weights = self.gather(_expand(segments, counts, device))
        return weights, int(weights.sum().item())

    def gather(self, scores):
        return _all_gather_rows(scores, self.group)

    def full(self, t, segment):
        return _all_gather_rows(t.contiguous(), self.group) if segment is not None and self._own_rows(segment) else t

    def own(self, t, p, axis):
        if _is_sharded(p) and axis != 0 and t.dim() and t.shape[0] == p.shape[0]:
            start, end = _row_range(p)
            return t[start:end]
        return t


def _distribution(named_params, masked=lambda name: True):
    """The distribution for parameters ``(name, parameter)`` whose ``masked(name)`` ones are pruned: FSDP2 row
    shards, DDP or one process. Other kinds of sharding are refused."""
    group = None
    for n, p in named_params:
        if _is_sharded(p) and p.device_mesh.ndim == 1 and p.placements[0].is_shard(0):
            if group is None and masked(_clean_name(n)):
                group = p.device_mesh.get_group()
            continue
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel") or type(p).__name__ in ("FlatParameter", "DTensor") or \
                getattr(p, "_is_sharded", False):
            raise RuntimeError(
                f"Pruner: parameter {n!r} is sharded in a way LoSparse cannot prune (DeepSpeed ZeRO-3, FSDP1 flat "
                "parameters, tensor parallel or a 2-D mesh): use a single process or DDP (accelerate launch "
                "--multi_gpu), or FSDP2 (--fsdp2, or accelerate launch --use_fsdp --fsdp_version 2), whose "
                "row shards the Pruner handles; see utils.check_distributed_support.")
    if group is not None:
        return _RowShards(group)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _Replicated()
    return _Local()


def _distribution_kind(params):
    """What :func:`_distribution` would pick for ``params``, cheaply (to notice a model sharded after the Pruner
    was built)."""
    if any(_is_sharded(p) for _, p in params):
        return _RowShards
    dist = torch.distributed
    return _Replicated if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else _Local


# Importance statistics ---------------------------------------------------------------------------------------------
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


class _Importance:
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
        self.views = {kind: {} for kind in _STAT_KINDS}
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
        self.views = {kind: {} for kind in _STAT_KINDS}
        for device, items in by_device.items():
            segments, total = [], 0
            for n, axis, shape, mult, split, _ in items:
                segments.append(_Segment(n, axis, shape, total, math.prod(shape), mult, split))
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
                for kind in _STAT_KINDS}

    def load(self, values):
        """Take ``{kind: {name: tensor}}`` as they are; the next :meth:`ensure` lays them out."""
        self.views = {kind: dict(values[kind]) for kind in _STAT_KINDS}
        self.groups, self.segments, self._key = [], {}, None


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
        self.config = {k: _config_get(args, k) for k in _SCHEDULE_KEYS}
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
        self._stats = _Importance(self.beta1, self.beta2)
        self._weights = None  # (layout, the multiplicities of every rank's scores or None, their sum)
        self._nonfinite = None  # device counter of skipped updates (read only at mask steps: no sync)
        self._nonfinite_reported = 0
        self._frozen_reported = set()
        self._dist = _distribution(model.named_parameters(), self.whether_mask_para)

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
            n = _clean_name(n)
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
        if _distribution_kind(params) is not type(self._dist):
            self._dist = _distribution(params)

    # -- schedule -------------------------------------------------------------------------------------
    def schedule_threshold_comb(self, step: int):
        """Cubic schedule of the kept fraction of S; returns ``(threshold, mask_now)`` (see :func:`cubic_schedule`)."""
        c = self.config
        return cubic_schedule(step, self.total_step, c["initial_threshold"], c["final_threshold"],
                              c["initial_warmup"], c["final_warmup"], c["warmup_steps"], self.deltaT)

    cubic_remaining_ratio = schedule_threshold_comb

    # -- importance -----------------------------------------------------------------------------------
    def _ensure_stats(self, params):
        """Lay out the statistics for ``params`` (name, parameter) (see :class:`_Importance`)."""
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
                score = _reduce(score, self.structured_method, 1) if axis == 1 else \
                    self._dist.columns(score, self.structured_method, p)
            shape = tuple(score.shape) if axis is None else (score.numel(),)
            segments.append(_Segment(n, axis, shape, offset, score.numel(), 1 if axis is None else p.shape[axis],
                                     self._dist.splits(p)))
            offset += score.numel()
            per.append(score.reshape(-1).float().to(device))
        return torch.cat(per), segments

    def _weights_for(self, segments, device):
        """``(weights, total)`` of :meth:`_Local.multiplicities`; the same at every mask step: built (and gathered)
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
        mask_threshold = _weighted_kth(self._dist.gather(scores.float()), int(total * (1 - threshold)), weights)
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
        """Every statistic and counter, so that a resumed run is bit-exact.

        FSDP2: the rows of every rank are gathered, so the layout is that of one process (call it on every rank).
        """
        return {"layout": self._layout(), **self._stats.state_dict(self._dist.full),
                "nonfinite_steps": 0 if self._nonfinite is None else int(self._nonfinite),
                "nonfinite_reported": self._nonfinite_reported}

    def load_state_dict(self, state_dict):
        layout = state_dict.get("layout", {})
        if layout != self._layout():
            raise ValueError(f"Pruner.load_state_dict: saved with {layout}, this pruner is {self._layout()}; "
                             "use the same --pruner_name/--beta2/--structured_method/--structured_direction")
        masked = self._masked_params(self.model) if self.model is not None else []
        values = {kind: dict(state_dict[kind]) for kind in _STAT_KINDS}
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


def _all_gather_rows(t, group):
    """Concatenate, in rank order, every rank's ``t`` along dim 0 (the sizes may differ: padded for the gather)."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(x) for x in sizes]
    padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    padded[:t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:k] for o, k in zip(out, sizes)])


def _row_range(p):
    """``(start, end)``: the rows of an FSDP2 parameter (``Shard(0)``, ``torch.chunk`` sizes) this rank holds."""
    mesh = p.device_mesh
    world, rank, rows = mesh.size(), mesh.get_local_rank(), p.shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    end = min(start + chunk, rows)
    if end - start != p.to_local().shape[0]:
        raise RuntimeError(f"unexpected FSDP2 shard: rank {rank} of {world} holds {p.to_local().shape[0]} of {rows} "
                           f"rows, expected {end - start}")
    return start, end


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


class CheckpointFileError(ValueError):
    """A checkpoint file cannot be read (truncated, or not a checkpoint); the message names the file and its size."""


def _unwrap(model):
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _refuse_sharded(model, what):
    if any(_is_sharded(p) for p in model.parameters()):
        raise ValueError(f"{what}: the model is sharded (FSDP2 DTensors hold only this rank's rows); gather it first "
                         "with utils.fsdp2_full_model(model), called on every rank")


def _set_submodule(root, name, new):
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _mismatch_message(missing, unexpected, mismatched, limit=20):
    parts = ["checkpoint does not fit the model (wrong base model or task head?)"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{title} ({len(keys)}): " + ", ".join(keys[:limit]) + more)
    return "\n".join(parts)


def _unmatched_keys(own, sd):
    """``(missing, unexpected, mismatched)``: keys of the model's state dict ``own`` that ``sd`` lacks, keys of
    ``sd`` the model lacks, and ``"key: file (shape) vs model (shape)"`` for the rest that differ in shape."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mismatched


# -- reading a checkpoint file ------------------------------------------------------------------------------
def _checkpoint_file_problem(path):
    """Why ``path`` is not a complete torch / safetensors checkpoint file, or None; reads only its header and
    table of contents (torch's zip central directory, safetensors' JSON header), not the tensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "empty" if size == 0 else "shorter than any checkpoint"
        if path.suffix == ".safetensors":
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return f"the safetensors header claims {n} bytes"
            try:
                header = json.loads(f.read(n))
                end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                return "no valid safetensors header"
            return None if 8 + n + end <= size else f"the tensors need {8 + n + end} bytes"
    if head[:2] == b"PK":  # torch.save's zip format: a truncated file has no central directory
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return str(e)
        return None
    if head[:1] == b"\x80":  # torch's legacy pickle format: only torch.load can tell
        return None
    return "neither a torch.save zip nor a pickle"


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
    problem = _checkpoint_file_problem(path)  # a cheap look at the header and the end of the file first
    if problem is not None:
        raise CheckpointFileError(f"{path}: truncated or not a checkpoint ({path.stat().st_size} bytes; {problem})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # e.g. a damaged member of the zip
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFileError(f"{path}: cannot be read as a checkpoint ({path.stat().st_size} bytes; "
                                  f"{reason})") from None


# -- the original checkpoint layout: load_checkpoint / save_checkpoint ----------------------------------------
def _nonzero_rows_from_dense(dense, k, prefix):
    idx = torch.nonzero((dense != 0).any(dim=1)).flatten()
    if idx.numel() != k:  # the original kept rows whose signed sum was nonzero
        idx = torch.nonzero(dense.sum(dim=1)).flatten()
    if idx.numel() != k:
        raise CheckpointMismatchError(f"{prefix}sparse_weight_pruned has {k} rows but {prefix}sparse.weight has "
                                      f"{idx.numel()} nonzero rows; cannot place the kept rows")
    return idx


def _place_kept_rows(sd, prefix):
    """Original distilled checkpoints hold ``sparse_weight_pruned`` beside the dense ``sparse.weight`` and no
    ``nonzero_idx``: replace the dense S by the indices of its nonzero rows (in ``sd``)."""
    if prefix + "sparse_weight_pruned" not in sd or prefix + "nonzero_idx" in sd:
        return
    if prefix + "sparse.weight" not in sd:
        raise CheckpointMismatchError(f"{prefix}sparse_weight_pruned without {prefix}nonzero_idx or "
                                      f"{prefix}sparse.weight: cannot place the kept rows")
    dense = sd.pop(prefix + "sparse.weight")
    sd[prefix + "nonzero_idx"] = _nonzero_rows_from_dense(dense, sd[prefix + "sparse_weight_pruned"].shape[0], prefix)


def _layer_for(sd, prefix, in_f, out_f, has_bias, like):
    """Build a LinearLoSparse shaped like the checkpoint entries under ``prefix``."""
    rank = sd[prefix + "left.weight"].shape[1]
    compact = prefix + "sparse_weight_pruned" in sd
    cols = prefix + "sparse_weight_pruned_cols" in sd
    has_sparse = compact or cols or prefix + "sparse.weight" in sd
    kw = {"device": like.device, "dtype": like.dtype}
    layer = LinearLoSparse(in_f, out_f, rank, has_bias=has_bias, has_sparse=has_sparse, **kw)
    if compact:
        k = sd[prefix + "sparse_weight_pruned"].shape[0]
        layer._set_compact(torch.zeros(k, in_f, **kw), torch.zeros(k, dtype=torch.long, device=like.device))
    elif cols:
        k = sd[prefix + "sparse_weight_pruned_cols"].shape[1]
        layer._set_compact_cols(torch.zeros(out_f, k, **kw), torch.zeros(k, dtype=torch.long, device=like.device))
    return layer


def _reshape_layers_like(target, sd):
    """Give each layer of ``target`` that ``sd`` holds as LoSparse (a ``left.weight`` key) the file's rank and
    compaction: a :class:`LinearLoSparse` or ``nn.Linear`` is replaced where its shapes differ from the file's."""
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
        _place_kept_rows(sd, prefix)
        new = _layer_for(sd, prefix, in_f, out_f, has_bias, like)
        old_shapes = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
        new_shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
        if not isinstance(mod, LinearLoSparse) or old_shapes != new_shapes:
            _set_submodule(target, name, new)


def _checkpoint_mismatch(target, own, sd):
    """:func:`_unmatched_keys`, forgiving tied parameters (e.g. lm_head <-> embeddings) saved once and buffers that
    this transformers version no longer persists (e.g. position_ids) present in older files."""
    missing, unexpected, mismatched = _unmatched_keys(own, sd)
    ptr_keys = {}
    for k, v in own.items():
        ptr_keys.setdefault(v.data_ptr(), []).append(k)
    missing = [k for k in missing if not any(o in sd for o in ptr_keys[own[k].data_ptr()] if o != k)]
    nonpersistent = {n for n, _ in target.named_buffers()} - set(own)
    unexpected = [k for k in unexpected if k not in nonpersistent]
    return missing, unexpected, mismatched


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
    sd = {_clean_name(k): v for k, v in _read_state_dict(path_or_state_dict).items()}
    _reshape_layers_like(target, sd)
    own = target.state_dict()
    missing, unexpected, mismatched = _checkpoint_mismatch(target, own, sd)
    if missing or unexpected or mismatched:
        msg = _mismatch_message(missing, unexpected, mismatched)
        if strict:
            raise CheckpointMismatchError(msg)
        logger.warning(msg)
    load = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    target.load_state_dict(load, strict=False)
    _share_timed_choices(target)
    logger.info("LoSparse: loaded %d tensors from checkpoint", len(load))
    return model


def save_checkpoint(model, path):
    """``torch.save(model.state_dict())`` in the original key layout (what ``--eval_checkpoint`` loads).

    Written to a temporary file first and renamed, so an existing file is never left half-written.
    """
    _refuse_sharded(model, "save_checkpoint")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, str(tmp))
    os.replace(tmp, path)
    return path


# -- reporting ------------------------------------------------------------------------------------------------
def _sparse_stored(layer_entry):
    """Stored parameters of a report entry's S: its kept rows, or kept columns for the column form."""
    return layer_entry.get("sparse_params", layer_entry["kept_rows"] * layer_entry["in_features"])


class CompressionReport:
    """What STEP 1 replaced and what is left of it. ``str(report)`` is a printable table."""

    def __init__(self, layers, model_params, model_params_dense_equivalent, model_params_in_memory, files=None):
        self.layers = layers
        self.dense_params = sum(l["out_features"] * l["in_features"] for l in layers)
        self.low_rank_params = sum(l["rank"] * (l["out_features"] + l["in_features"]) for l in layers)
        self.sparse_params = sum(_sparse_stored(l) for l in layers)  # kept rows, or columns where fewer
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
        lines = [f"{'layer':<60} {'out':>6} {'in':>6} {'rank':>5} {'rows':>6} {'ratio':>7}  path"]
        for l in self.layers:
            ratio = (l["rank"] * (l["out_features"] + l["in_features"]) + _sparse_stored(l)) / \
                    (l["out_features"] * l["in_features"])
            lines.append(f"{l['name'][-60:]:<60} {l['out_features']:>6} {l['in_features']:>6} {l['rank']:>5} "
                         f"{l['kept_rows']:>6} {ratio:>7.2%}  {l.get('path', '')}")
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


def _layer_path(m):
    """How the layer runs inference: ``"uncompacted"``, ``"low_rank"`` (no S), or the compacted form(s) it took
    so far (:meth:`_FastPath.describe`: ``"fused"``, ``"fused<=127,merged"``, ``"pending"``, ...)."""
    if not m.has_sparse:
        return "low_rank"
    if not m.is_compacted:
        return "uncompacted"
    return m._fast.describe()


def _report_entry(name, m):
    """One layer's line of :func:`compression_report`."""
    form, kept, stored = m._sparse_form()
    return {"name": name, "out_features": m.out_feature, "in_features": m.in_feature, "rank": m.reduced_rank,
            "kept_rows": m.kept_rows, "path": _layer_path(m), "sparse_form": form, "kept": kept,
            "sparse_params": stored}


def _parameter_counts(target):
    """``(compact, dense, in_memory)``: the parameters an export stores (each LoSparse layer in its compact form,
    or dense where that is smaller), the same model with dense matrices, and the parameters held now."""
    losparse = [m for m in target.modules() if isinstance(m, LinearLoSparse)]
    in_losparse = {id(p) for m in losparse for p in m.parameters()}
    unique = {id(p): p for p in target.parameters()}.values()
    in_memory = sum(p.numel() for p in unique)
    other = sum(p.numel() for p in unique if id(p) not in in_losparse)
    compact, dense = other, other
    for m in losparse:
        dense_layer = m.out_feature * m.in_feature + (m.out_feature if m.has_bias else 0)
        compact += min(m.num_parameters(compact=True), dense_layer)
        dense += dense_layer
    return compact, dense, in_memory


def compression_report(model, export_dir=None):
    """Per-layer shapes, ranks, kept rows and inference path, totals, and whole-model parameter counts.

    ``model_params`` counts what a compact export stores (L, R, kept rows of S, biases and every other
    parameter once); ``model_params_dense_equivalent`` the same model with dense matrices. With
    ``export_dir`` (an :func:`export_compact` directory) the sizes of its files are reported too.
    """
    target = _unwrap(model)
    layers = [_report_entry(name, m) for name, m in target.named_modules() if isinstance(m, LinearLoSparse)]
    files = None
    if export_dir is not None:
        files = {f.name: f.stat().st_size for f in sorted(Path(export_dir).iterdir()) if f.is_file()}
    return CompressionReport(layers, *_parameter_counts(target), files)


# -- the compact folder: export_compact / load_compact ------------------------------------------------------------
# Not "model.safetensors": a transformers class loading the folder without its remote code
# (LlamaForCausalLM.from_pretrained) finds no weights file and stops, instead of initialising the compressed
# projections at random.
COMPACT_WEIGHTS = "losparse_model.safetensors"
_LEGACY_COMPACT_WEIGHTS = "model.safetensors"  # folders written before the remote-code export
COMPACT_CONFIG = "losparse_config.json"
COMPACT_FORMS = ("dense", "losparse", "losparse_cols", "low_rank")  # per-layer "form" in losparse_config.json
# The transformers remote code an export ships (``trust_remote_code=True``); it lives next to this module.
REMOTE_CODE_FILE = Path(__file__).resolve().parent / "remote_code" / "modeling_losparse.py"
# auto_map entries: (transformers mapping of class names, Auto class, entry class of modeling_losparse.py)
_AUTO_ENTRIES = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM", "LoSparseForCausalLM"),
                 ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification",
                  "LoSparseForSequenceClassification"),
                 ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering",
                  "LoSparseForQuestionAnswering"),
                 ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM", "LoSparseForSeq2SeqLM"),
                 ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification",
                  "LoSparseForTokenClassification"),
                 ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM", "LoSparseForMaskedLM"),
                 ("MODEL_MAPPING_NAMES", "AutoModel", "LoSparseModel"))


def _kept_part(m, form):
    """``(kept rows or columns of S, their indices, their two keys)`` of layer ``m`` for ``form`` (``"rows"``,
    ``"cols"``), read from the dense S of an uncompacted layer; ``(None, None, None)`` without S."""
    if form == "cols":  # column form: new keys, the row keys stay those of the original
        keys = ("sparse_weight_pruned_cols", "nonzero_col_idx")
        if m.is_compacted:
            return m.sparse_weight_pruned_cols, m.nonzero_col_idx, keys
        idx = torch.nonzero((m.sparse.weight != 0).any(dim=0)).flatten()
        return m.sparse.weight[:, idx], idx, keys
    if form == "rows":
        keys = ("sparse_weight_pruned", "nonzero_idx")
        if m.is_compacted:
            return m.sparse_weight_pruned, m.nonzero_idx, keys
        idx = torch.nonzero((m.sparse.weight != 0).any(dim=1)).flatten()
        return m.sparse.weight[idx], idx, keys
    return None, None, None


def _export_layer(m, p, tensors):
    """Put layer ``m``'s tensors into ``tensors`` under prefix ``p`` and return its ``losparse_config.json`` entry:
    merged as a plain ``weight`` when its compact form has at least as many parameters as the dense matrix,
    only L and R when S lost every row, else L, R and the kept rows (or columns) of S."""
    entry = {"in_features": m.in_feature, "out_features": m.out_feature, "rank": m.reduced_rank,
             "has_bias": m.has_bias}
    form = m._sparse_form()[0] if m.has_sparse else None
    kept, idx, keys = _kept_part(m, form)
    k = 0 if idx is None else idx.numel()
    if m.num_parameters(compact=True) - (m.out_feature if m.has_bias else 0) >= m.out_feature * m.in_feature:
        entry.update(form="dense", kept_rows=m.out_feature)
        tensors[p + "weight"] = m.merged_weight()
    else:
        tensors[p + "left.weight"] = m.left.weight
        tensors[p + "right.weight"] = m.right.weight
        if k:
            tensors[p + keys[0]] = kept
            tensors[p + keys[1]] = idx
        if k and form == "cols":
            entry.update(form="losparse_cols", kept_cols=k, kept_rows=m.out_feature)
        else:
            entry.update(form="losparse" if k else "low_rank", kept_rows=k)
    if m.has_bias:
        tensors[p + "bias"] = m.bias
    return entry


def _untie(tensors):
    """``(flat, tied)``: one contiguous CPU copy per distinct tensor, and ``{key: key it shares storage with}``
    for the others (safetensors stores no shared storage)."""
    tied, by_ptr, flat = {}, {}, {}
    for k, v in tensors.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in by_ptr:
            tied[k] = by_ptr[key]
            continue
        if key is not None:
            by_ptr[key] = k
        flat[k] = v.detach().contiguous().cpu().clone()
    return flat, tied


def _jsonable(args):
    if args is None:
        return None
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list))}


def _auto_entries(architecture):
    """``{Auto class: entry class}`` for the transformers Auto classes that load ``architecture``."""
    from transformers.models.auto import modeling_auto

    found = {}
    for mapping, auto, entry in _AUTO_ENTRIES:
        names = getattr(modeling_auto, mapping, {}).values()
        if any(architecture == n or (isinstance(n, (tuple, list)) and architecture in n) for n in names):
            found[auto] = f"modeling_losparse.{entry}"
    return found


def _source_name(target):
    """The name or path the model was loaded from, as its config records it."""
    return str(getattr(target.config, "name_or_path", None) or target.config.to_dict().get("_name_or_path")
               or "(not recorded)")


def _export_ratios(rep):
    """The compression figures a remote-code ``config.json`` and the model card give, from a report."""
    dense = max(1, rep.dense_params)
    return {"low_rank_ratio": rep.low_rank_params / dense, "kept_sparse_ratio": rep.sparse_params / dense,
            "effective_ratio": rep.effective_ratio, "parameters": rep.model_params,
            "parameters_dense": rep.model_params_dense_equivalent}


def _remote_config(target, autos, layers, tied, ratios, losparse_args):
    """``config.json`` of model_type ``losparse``: the model's own config under ``base_config``, an ``auto_map`` to
    ``modeling_losparse.py``, the compressed layers and the tied keys."""
    return {"model_type": "losparse", "architectures": [autos[a].split(".")[1] for a in autos][:1],
            "auto_map": {"AutoConfig": "modeling_losparse.LoSparseConfig", **autos},
            "base_architecture": type(target).__name__, "base_config": target.config.to_dict(),
            "losparse_layers": layers, "losparse_tied": tied,
            "losparse": {"source_model": _source_name(target), **ratios, "args": losparse_args}}


def _model_card(out, arch, source, auto, n_layers, ratios, losparse_args):
    """The lines of the export's ``README.md``: how to load it, what it holds, the command that made it."""
    import shlex

    size = (out / COMPACT_WEIGHTS).stat().st_size
    card = [
        "---", "library_name: transformers", "tags:", "- losparse", "- compression", "- low-rank",
        "- structured-pruning", *([f"base_model: {source}"] if source != "(not recorded)" and not Path(source).exists()
                                  else []), "---", "",
        f"# LoSparse compact model of {source}", "",
        "Each compressed linear layer `W` of the source model is stored as a low-rank product `L @ R` plus the rows "
        "of a sparse matrix `S` that survived structured pruning (LoSparse, ICML 2023). Load it with torch and "
        "transformers only:", "",
        "```python", f"from transformers import {auto}, AutoTokenizer",
        f'model = {auto}.from_pretrained("{out.name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{out.name}", trust_remote_code=True)  # reads config.json too',
        "```", "",
        "Without `trust_remote_code=True` transformers refuses the folder (its `config.json` has `model_type` "
        "`losparse`): the compressed layers need `modeling_losparse.py`.", "",
        "| | |", "|---|---|",
        f"| source model | `{source}` ({arch}) |",
        f"| compressed matrices | {n_layers} |",
        f"| low-rank parameters (L, R) | {ratios['low_rank_ratio']:.2%} of the compressed matrices |",
        f"| kept rows of S | {ratios['kept_sparse_ratio']:.2%} of the compressed matrices |",
        f"| effective ratio (L, R and kept rows) | {ratios['effective_ratio']:.2%} |",
        f"| parameters | {ratios['parameters']:,} (dense source: {ratios['parameters_dense']:,}) |",
        f"| `{COMPACT_WEIGHTS}` | {size:,} bytes ({size / 2**20:.2f} MiB) |", "",
        "Made with:", "", "```", "python " + shlex.join(sys.argv), "```", "",
    ]
    if losparse_args:
        card += ["LoSparse flags:", "", "```json", json.dumps(losparse_args, indent=1, sort_keys=True), "```", ""]
    return card


def _write_remote_code_files(target, out, layers, tied, losparse_args):
    """``config.json`` (model_type ``losparse``), ``modeling_losparse.py``, ``generation_config.json``, README.md."""
    arch = type(target).__name__
    autos = _auto_entries(arch)
    if not autos:
        logger.warning("LoSparse: %s is not in a transformers Auto mapping; %s loads only with utils.load_compact",
                       arch, out)
    ratios = _export_ratios(compression_report(target))
    config = _remote_config(target, autos, layers, tied, ratios, losparse_args)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if REMOTE_CODE_FILE.is_file():
        (out / REMOTE_CODE_FILE.name).write_bytes(REMOTE_CODE_FILE.read_bytes())
    else:
        logger.warning("LoSparse: %s not found (utils.py copied alone?); %s loads only with utils.load_compact",
                       REMOTE_CODE_FILE, out)
    gen = getattr(target, "generation_config", None)
    if gen is not None and getattr(target, "can_generate", lambda: False)():
        gen.save_pretrained(str(out))
    card = _model_card(out, arch, _source_name(target), next(iter(autos), "AutoModel"), len(layers), ratios,
                       losparse_args)
    (out / "README.md").write_text("\n".join(card))


@torch.no_grad()
def export_compact(model, output_dir, tokenizer=None, losparse_args=None):
    """Write a directory that :func:`load_compact` rebuilds without the dense model, SVD or network, and that
    plain transformers loads with ``AutoModelFor...from_pretrained(output_dir, trust_remote_code=True)``.

    Holds ``losparse_model.safetensors`` with only L, R, the kept rows of S (``sparse_weight_pruned`` +
    ``nonzero_idx``; form ``losparse``) or, for a column-pruned S, its kept columns (``sparse_weight_pruned_cols``,
    out x k, + ``nonzero_col_idx``; form ``losparse_cols``), biases and the untouched weights;
    ``losparse_config.json`` (per-layer form, rank, kept rows or columns; the LoSparse flags); the tokenizer if
    given. For a transformers model also: ``config.json`` of
    ``model_type`` ``"losparse"`` (the model's own config under ``base_config``, an ``auto_map`` to
    ``modeling_losparse.py``, copied from ``remote_code/``), so transformers refuses the folder without
    ``trust_remote_code`` instead of returning a randomly initialised model; ``generation_config.json`` for
    models that generate; and a model card ``README.md``. A layer whose compact form has at least as many
    parameters as the dense matrix is stored merged as a plain ``weight``; a layer whose S lost every row keeps
    only L and R. The model itself is not modified.
    """
    from safetensors.torch import save_file

    _refuse_sharded(model, "export_compact")
    target = _unwrap(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    losparse = {name: m for name, m in target.named_modules() if isinstance(m, LinearLoSparse)}
    skip = tuple(name + "." for name in losparse)
    tensors = {k: v for k, v in target.state_dict().items() if not k.startswith(skip)}
    layers = {name: _export_layer(m, name + ".", tensors) for name, m in losparse.items()}
    flat, tied = _untie(tensors)
    save_file(flat, str(out / COMPACT_WEIGHTS), metadata={"format": "pt", "losparse": "1"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    meta = {"format_version": 1, "model_class": type(target).__name__, "layers": layers, "tied": tied,
            "losparse_args": _jsonable(losparse_args)}
    (out / COMPACT_CONFIG).write_text(json.dumps(meta, indent=1))
    if hasattr(target, "config") and hasattr(target.config, "to_dict"):
        _write_remote_code_files(target, out, layers, tied, meta["losparse_args"])
    logger.info("LoSparse: exported compact model to %s", out)
    return out


def _read_compact_meta(out):
    """``losparse_config.json`` of an export folder, with every layer's form checked."""
    meta_path = out / COMPACT_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; {out} is not an export_compact folder")
    meta = json.loads(meta_path.read_text())
    for name, entry in meta["layers"].items():
        if entry["form"] not in COMPACT_FORMS:
            raise CheckpointMismatchError(f"{meta_path}: layer {name} has form {entry['form']!r}; allowed values "
                                          "are " + ", ".join(map(repr, COMPACT_FORMS)))
    return meta


def _compact_base_config(out):
    """The model config of an export: ``config.json`` itself, or its ``base_config`` when it is a LoSparse one."""
    import transformers

    path = out / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the model config of the export)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointMismatchError(f"{path}: not valid JSON ({e})") from e
    if raw.get("model_type") != "losparse":
        return transformers.AutoConfig.from_pretrained(str(out))  # written before the remote-code export
    base = dict(raw.get("base_config") or {})
    model_type = base.pop("model_type", None)
    if not model_type:
        raise CheckpointMismatchError(f"{path}: base_config has no model_type (edited file?)")
    return type(transformers.AutoConfig.for_model(model_type)).from_dict(base)


def _compact_weights_file(out):
    weights = out / COMPACT_WEIGHTS
    if not weights.is_file() and (out / _LEGACY_COMPACT_WEIGHTS).is_file():
        weights = out / _LEGACY_COMPACT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing")
    return weights


def _compact_layer(entry, like, prefer):
    """A :class:`LinearLoSparse` at the shapes of a ``losparse_config.json`` entry (zeros; loaded next)."""
    layer = LinearLoSparse(entry["in_features"], entry["out_features"], entry["rank"], has_bias=entry["has_bias"],
                           has_sparse=entry["form"] != "low_rank", device=like.device, dtype=like.dtype)
    if entry["form"] == "losparse":
        k = entry["kept_rows"]
        layer._set_compact(torch.zeros(k, entry["in_features"], dtype=like.dtype), torch.zeros(k, dtype=torch.long))
    elif entry["form"] == "losparse_cols":
        k = entry["kept_cols"]
        layer._set_compact_cols(torch.zeros(entry["out_features"], k, dtype=like.dtype),
                                torch.zeros(k, dtype=torch.long))
    layer.prefer = prefer
    return layer


def _build_compact_model(meta, config, model_class, prefer):
    """The model class built from ``config``, with a :class:`LinearLoSparse` at each compressed layer."""
    import transformers

    if model_class is None:
        model_class = getattr(transformers, meta.get("model_class", ""), None) or transformers.AutoModel
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else \
        model_class._from_config(config)
    for name, entry in meta["layers"].items():
        if entry["form"] != "dense":  # a dense layer keeps the model's own nn.Linear
            _set_submodule(model, name, _compact_layer(entry, model.get_submodule(name).weight, prefer))
    _share_timed_choices(model)
    return model


def _check_kept_rows(sd, layers, where):
    """Refuse kept-row (or kept-column) indices that are not distinct integers within the layer's size."""
    for name, entry in layers.items():
        if entry["form"] not in ("losparse", "losparse_cols"):
            continue
        key, n, what = ((".nonzero_idx", entry["out_features"], "row") if entry["form"] == "losparse" else
                        (".nonzero_col_idx", entry["in_features"], "column"))
        idx = sd.get(name + key)
        if idx is None:
            continue  # reported as a missing key
        if (idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dim() != 1
                or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n))
                or idx.unique().numel() != idx.numel()):
            raise CheckpointMismatchError(f"{where}: {name}{key} must hold distinct {what} indices in "
                                          f"[0, {n}); found {idx.tolist()[:10]}")


def load_compact(output_dir, model_class=None, device=None, dtype=None, prefer="speed"):
    """Rebuild a model written by :func:`export_compact`, from that directory alone (eval mode).

    ``prefer``: how the compacted layers run inference, as in :func:`prune`. Reads folders of every
    :func:`export_compact` version (``config.json`` plain or of ``model_type`` ``"losparse"``).
    """
    from safetensors.torch import load_file

    _check_prefer(prefer)
    out = Path(output_dir)
    meta = _read_compact_meta(out)
    model = _build_compact_model(meta, _compact_base_config(out), model_class, prefer)
    weights = _compact_weights_file(out)
    sd = load_file(str(weights))
    for k, src in meta.get("tied", {}).items():
        sd[k] = sd[src]
    missing, unexpected, mismatched = _unmatched_keys(model.state_dict(), sd)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(f"{weights} does not match {COMPACT_CONFIG} / config.json: "
                                      + _mismatch_message(missing, unexpected, mismatched))
    _check_kept_rows(sd, meta["layers"], str(weights))
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
    g.add_argument("--fsdp2", action="store_true",
                   help="Shard the model with PyTorch FSDP2 (fully_shard per transformer block, then the root) across "
                        "the processes torchrun/accelerate started, on GPUs or CPU (gloo): for models bigger than "
                        "one GPU. Accelerate's own FSDP2 config (--use_fsdp --fsdp_version 2) works too.")
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
    """Stop at start-up, with a message, under DeepSpeed, FSDP1 or Megatron-LM.

    Their shards hold parts of rows (flattened parameters, ZeRO partitions, tensor-parallel slices), so
    importance scores and row masks computed on a rank would be wrong. Supported: one process, data parallel
    (DDP) on one or several machines, and FSDP2 (Accelerate's FSDP plugin with ``fsdp_version: 2``, or the
    scripts' ``--fsdp2``), whose shards are whole rows.
    """
    dt = getattr(getattr(accelerator, "distributed_type", None), "value", str(accelerator.distributed_type))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world} but accelerate runs this process alone (distributed_type={dt}): the {world} "
            "processes would train independently and overwrite each other's output. On CPU launch with "
            "ACCELERATE_USE_CPU=1 (or `accelerate launch --cpu` with a multi-CPU config); on GPUs check that "
            "CUDA is visible to every process.")
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if dt == "FSDP" and getattr(plugin, "fsdp_version", 1) == 2:
        return
    if dt not in SUPPORTED_DISTRIBUTED:
        raise RuntimeError(
            f"LoSparse does not support accelerate distributed_type={dt}"
            f"{' with fsdp_version 1' if dt == 'FSDP' else ''}: DeepSpeed ZeRO, FSDP1 (flat parameters) and "
            "Megatron-LM split rows of the matrices across ranks, and pruning needs whole rows. Supported: a single "
            "process, data parallel with `accelerate launch --multi_gpu --num_processes N` (one or several "
            "machines; `--cpu` for CPU processes), or FSDP2 for models bigger than one GPU: `accelerate launch "
            "--use_fsdp --fsdp_version 2 ...` or the flag --fsdp2. For the full fine-tuning baseline use "
            "--no_losparse.")


# ----------------------------------------------------------------------------------------------------
# 7. FSDP2: models bigger than one GPU (utils_fsdp.py)
# ----------------------------------------------------------------------------------------------------
# The FSDP2 wiring lives in utils_fsdp.py next to this file; these forwarders keep ``utils.apply_fsdp2`` etc.
# working. An unsharded model needs no FSDP2 code: fsdp2_checkpointing and fsdp2_full_model return at once.
def _fsdp_module():
    try:
        if __package__:
            import importlib

            return importlib.import_module(".utils_fsdp", __package__)
        import utils_fsdp
    except ImportError as e:
        raise ImportError(f"LoSparse: FSDP2 needs utils_fsdp.py next to utils.py ({Path(__file__).resolve().parent}); "
                          "copy it from the LoSparse repository (a single-GPU or DDP run needs utils.py only)") from e
    return utils_fsdp


def apply_fsdp2(model, accelerator=None, **fully_shard_kwargs):
    """Shard ``model`` with FSDP2 over all ranks; see :func:`utils_fsdp.apply_fsdp2`."""
    return _fsdp_module().apply_fsdp2(model, accelerator, **fully_shard_kwargs)


def fsdp2_checkpointing(accelerator, model, optimizer=None):
    """Make ``accelerator.save_state`` / ``load_state`` store an FSDP2 model in full; see
    :func:`utils_fsdp.fsdp2_checkpointing` (no-op for an unsharded model)."""
    if any(_is_sharded(p) for p in _unwrap(model).parameters()):
        _fsdp_module().fsdp2_checkpointing(accelerator, model, optimizer)


def fsdp2_full_model(model, device="cpu"):
    """A plain copy of an FSDP2 model with its full weights; see :func:`utils_fsdp.fsdp2_full_model` (an unsharded
    model is returned as it is)."""
    if not any(_is_sharded(p) for p in _unwrap(model).parameters()):
        return model
    return _fsdp_module().fsdp2_full_model(model, device)


# ----------------------------------------------------------------------------------------------------
# 8. Safe runs: start-up checks, atomic checkpoints, resuming from the last complete one
# ----------------------------------------------------------------------------------------------------
class RunInputError(ValueError):
    """A flag or an input file that a run cannot use, found before the long work starts. The message is one line
    that names the flag or the file; :func:`one_line_errors` turns it into ``prog: error: ...`` and exit 2."""


CHECKPOINT_MARKER = "losparse_checkpoint.json"  # written last into a checkpoint folder: the folder is complete
_INCOMPLETE_SUFFIX = ".incomplete"  # a checkpoint folder being written (renamed to its name when complete)
_LAST_CHECKPOINT = {}  # the last folder save_state_atomic completed in this process (for the Ctrl-C message)


def check_output_dir(path, flag="--output_dir"):
    """Create ``path`` (with its parents) and write and remove a file in it, so that a run that cannot save stops
    at start-up rather than after training. Raises :class:`RunInputError` naming ``flag``."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".losparse-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise RunInputError(f"{flag} {path}: cannot be created or written ({e.strerror or e})") from None


def check_checkpoint_file(path, flag):
    """Stop with one line if ``path`` (a checkpoint file, or a folder holding ``pytorch_model.bin`` /
    ``model.safetensors``) is missing, truncated or not a checkpoint. Reads only headers: call it at start-up."""
    p = Path(path)
    if p.is_dir():
        found = [p / c for c in ("pytorch_model.bin", "model.safetensors", "losparse_model.safetensors")
                 if (p / c).is_file()]
        if not found:
            raise RunInputError(f"{flag} {path}: no pytorch_model.bin or model.safetensors in this folder")
        p = found[0]
    if not p.is_file():
        raise RunInputError(f"{flag} {path}: no such file")
    problem = _checkpoint_file_problem(p)
    if problem is not None:
        raise RunInputError(f"{flag} {p}: truncated or not a checkpoint ({p.stat().st_size} bytes; {problem})")


def check_data_file(path, flag):
    """Stop with one line if the local data file ``path`` has no examples: empty, only a csv/tsv header, an empty
    json list, or (``.txt``) only whitespace. Reads up to the first example."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if ext in ("csv", "tsv"):
                header = f.readline()
                empty = not header.strip() or not any(line.strip() for line in f)
                what = "no rows after the header" if header.strip() else "an empty file"
            else:
                text = ""
                while not text.strip():
                    chunk = f.read(1 << 16)
                    if not chunk:
                        break
                    text += chunk
                text = text.lstrip()
                empty = not text or (ext in ("json", "jsonl") and text[:1] == "[" and text[1:].lstrip()[:1] == "]")
                what = "an empty file" if not text else "an empty list"
    except OSError as e:
        raise RunInputError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None
    if empty:
        raise RunInputError(f"{flag} {path}: no examples ({what})")


def checkpoint_problem(folder):
    """Why ``folder`` is not a complete checkpoint written by :func:`save_state_atomic`, or None."""
    marker = os.path.join(folder, CHECKPOINT_MARKER)
    if not os.path.isfile(marker):
        missing = _legacy_checkpoint_missing(folder)
        if not missing:  # written by a plain save_state (earlier versions): taken, with a warning
            logger.warning(f"checkpoint {folder}: no {CHECKPOINT_MARKER} (written before checkpoints were atomic); "
                           "its files look complete, so it is used")
            return None
        return (f"no {CHECKPOINT_MARKER} (interrupted while it was written, or not written by save_state_atomic) "
                f"and not a complete checkpoint of an earlier version (no {' / '.join(missing)})")
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {CHECKPOINT_MARKER} ({e})"
    for name, size in files.items():
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != size:
            return f"{name} has {os.path.getsize(p)} bytes, {size} were written"
    return None


def _legacy_checkpoint_missing(folder):
    """What a checkpoint folder written by a plain ``accelerator.save_state`` (before :func:`save_state_atomic`)
    lacks of a finished write: the model, the optimizer, the random states and the first registered object
    (written in that order; the scripts register at least one)."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    wanted = [("model.safetensors", "pytorch_model.bin"), ("optimizer.bin",), ("random_states_0.pkl",),
              ("custom_checkpoint_0.pkl",)]
    return [w[0] for w in wanted if not names.intersection(w)]


def _completed_at(folder):
    marker = os.path.join(folder, CHECKPOINT_MARKER)
    return os.path.getmtime(marker if os.path.isfile(marker) else folder)


def latest_checkpoint(output_dir, name_pattern=r"^(step|epoch)_(\d+)$"):
    """The most recently completed checkpoint folder of ``output_dir`` whose name matches ``name_pattern``, or
    None. Incomplete folders (a run stopped while writing them) are skipped, each with a warning."""
    if not os.path.isdir(output_dir):
        return None
    pattern, found = re.compile(name_pattern), []
    for entry in sorted(os.scandir(output_dir), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        if entry.name.endswith(_INCOMPLETE_SUFFIX) and pattern.match(entry.name[: -len(_INCOMPLETE_SUFFIX)]):
            logger.warning(f"latest checkpoint: skipping {entry.path}: its write did not finish")
        elif pattern.match(entry.name):
            problem = checkpoint_problem(entry.path)
            if problem is None:
                found.append(entry.path)
            else:
                logger.warning(f"latest checkpoint: skipping {entry.path}: {problem}")
    return max(found, key=_completed_at) if found else None


def check_resume_folder(folder, flag="--resume_from_checkpoint"):
    """Stop with one line if ``folder`` is not a complete checkpoint (see :func:`checkpoint_problem`)."""
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise RunInputError(f"{flag} {folder}: not a complete checkpoint: {problem}")


def check_run_paths(args):
    """The start-up checks of the example scripts, in seconds, before any model is loaded: every local data file
    (``--train_file``, ``--validation_file``, ``--test_file``) has examples; ``--eval_checkpoint`` and
    ``--stored_model_path`` are whole checkpoint files; a ``--resume_from_checkpoint`` folder is complete; and
    ``--output_dir`` (or, without it, the current directory that ``--checkpointing_steps`` writes to) can be
    created and written. Raises :class:`RunInputError` naming the flag."""
    for name in ("train_file", "validation_file", "test_file"):
        if getattr(args, name, None) is not None:
            check_data_file(getattr(args, name), f"--{name}")
    for name in ("eval_checkpoint", "stored_model_path"):
        if getattr(args, name, None) is not None:
            check_checkpoint_file(getattr(args, name), f"--{name}")
    resume = getattr(args, "resume_from_checkpoint", None)
    if resume is not None and resume != "latest":
        check_resume_folder(resume)
    if getattr(args, "output_dir", None) is not None:
        check_output_dir(args.output_dir)
    elif getattr(args, "checkpointing_steps", None) is not None:  # step_N / epoch_N folders in the current directory
        check_output_dir(os.getcwd(), "--checkpointing_steps (without --output_dir, the current directory)")


def save_state_atomic(accelerator, output_dir):
    """``accelerator.save_state(output_dir)`` such that a folder named ``output_dir`` is always complete.

    Everything (the model, optimizer, scheduler, sampler and random states, and every object registered with
    ``accelerator.register_for_checkpointing``, e.g. the :class:`Pruner`) is written to
    ``output_dir + ".incomplete"``; then a :data:`CHECKPOINT_MARKER` listing the files and their sizes; then the
    folder is renamed. A run stopped (Ctrl-C, a kill, a full disk) before the rename leaves the previous
    checkpoints usable, and :func:`latest_checkpoint` skips the unfinished folder. Call it on every process.
    """
    output_dir = os.path.normpath(output_dir)
    tmp = output_dir + _INCOMPLETE_SUFFIX
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)  # left by a run that was stopped while writing it
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish_checkpoint(tmp, output_dir)
    accelerator.wait_for_everyone()
    _LAST_CHECKPOINT["path"] = output_dir
    return output_dir


def _finish_checkpoint(tmp, output_dir):
    files = {}
    for root, _, names in os.walk(tmp):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, tmp)] = os.path.getsize(p)
    for p in [os.path.join(tmp, f) for f in files] + [tmp]:  # on disk before the marker says so
        _fsync(p)
    with open(os.path.join(tmp, CHECKPOINT_MARKER), "w") as f:
        json.dump({"files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    old = None
    if os.path.exists(output_dir):  # the same name written again (e.g. epoch_N after a resume): replace it
        old = output_dir + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(output_dir, old)
    os.rename(tmp, output_dir)
    _fsync(os.path.dirname(os.path.abspath(output_dir)))
    if old is not None:
        shutil.rmtree(old)


def _fsync(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. directories on some file systems
    finally:
        os.close(fd)


@contextlib.contextmanager
def one_line_errors(prog):
    """Around a script's ``main()``: a :class:`RunInputError` or :class:`CheckpointFileError` ends the process
    with ``prog: error: <message>`` (exit 2, no traceback); Ctrl-C with one line saying which checkpoint is the
    last complete one (exit 130)."""
    try:
        yield
    except (RunInputError, CheckpointFileError) as e:
        _close_progress_bars()
        sys.stderr.write(f"{prog}: error: {e}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        _close_progress_bars()
        last = _LAST_CHECKPOINT.get("path")
        where = f"the last complete checkpoint is {last} (--resume_from_checkpoint latest continues from it)" \
            if last else "no checkpoint was completed in this run"
        sys.stderr.write(f"\n{prog}: interrupted; {where}\n")
        raise SystemExit(130) from None


def _close_progress_bars():
    """Close the open tqdm bars now, so that they do not print after the last line (when they are collected)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()
    sys.stderr.flush()
