"""LoSparse: low-rank + structured-sparse compression of ``nn.Linear`` layers (ICML 2023).

One drop-in module, in reading order:

1. decomposition      ``low_rank_decomposition``
2. the layer          ``LinearLoSparse`` (forward, compaction, parameter count)
3. the walker         ``substitute_layer_weights``, ``prune``, ``refresh``, ``prepare_for_inference``;
   calibration         ``collect_input_covariance``, one-shot rows ``one_shot_rows``
4. the pruner         ``Pruner`` (cubic schedule, PLATON importance, masking, ``state_dict``)
5. checkpoint I/O     ``load_checkpoint``, ``save_checkpoint``, ``export_compact``, ``load_compact``,
   and reporting      ``compression_report``
6. argparse helper    ``add_losparse_args``, ``validate_losparse_args``, ``check_distributed_support``
7. FSDP2              ``apply_fsdp2``, ``fsdp2_checkpointing``, ``fsdp2_full_model`` (models bigger than one GPU)
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


# Forms of a compacted layer's inference forward (x2: tokens x in; y: tokens x out), see LinearLoSparse._derive.
# Row form (S keeps k rows at output positions idx):
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


def _ceil8(n):
    return -(-n // 8) * 8


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


# Opt-in timed choice (``layer.path_choice = "timed"``): shape class -> chosen form, shared by every layer of
# the class in this process (and, under torch.distributed, decided on rank 0).
_CUDA_CHOICES = {}


def _time_forms(layer, x2, candidates, reps=3):
    """Milliseconds of ``reps`` calls of each candidate form on ``x2`` (CUDA events on CUDA, a clock elsewhere)."""
    import time

    times = {}
    for path in candidates:
        d = layer._derived_for(path)
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


def _timed_choice(layer, x2, candidates, reps=3):
    """The form of ``layer`` for this many tokens, timed once per shape class and process.

    Shape class: device, dtype, in/out features, r and k rounded up to multiples of 8 (k: to a power of two),
    row or column form, bias, token bucket and candidates; the layers of a class share one timing. Rank 0 times,
    every rank takes its choice (so all ranks run the same forms), and only the chosen form's tensors stay.
    """
    cols, k = layer.sparse_weight_pruned_cols is not None, layer._kept_index().numel()
    key = (x2.device.type, x2.dtype, layer.in_feature, layer.out_feature, _ceil8(layer.reduced_rank),
           _ceil8(k).bit_length(), cols, layer.bias is not None, max(1, x2.shape[0]).bit_length(), candidates)
    if key not in _CUDA_CHOICES:
        dist = torch.distributed
        first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        index = 0
        if first:
            times = _time_forms(layer, x2, candidates, reps)
            index = candidates.index(min(candidates, key=times.__getitem__))
        device = x2.device if x2.is_cuda else torch.device("cpu")
        _CUDA_CHOICES[key] = candidates[_rank0_choice(index, device)]
    return _CUDA_CHOICES[key]


class _Derived:
    """What a compacted layer derives for inference, in one place: the tensors of each form it uses, the form
    chosen per token bucket, and the key (the source tensors and their versions) the tensors were built from."""

    __slots__ = ("key", "tensors", "paths")

    def __init__(self):
        self.key, self.tensors, self.paths = None, {}, {}


def _tensor_stamp(t):
    """What changes when a tensor is re-pointed (``.data =``, ``.to()``), reshaped, or modified in place through
    itself or a view (its version).

    An in-place edit through ``.data`` bumps no version counter (PyTorch gives ``.data`` its own), and neither
    do FSDP2's re-gathers or ``torch.autograd._unsafe_preserve_version_counter``: see
    :meth:`LinearLoSparse.refresh`. Inference tensors have no version counter.
    """
    return None if t.is_inference() else t._version, t.data_ptr(), t.shape


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
    (call it after editing weights in a way PyTorch does not version, e.g. through ``.data``).
    """

    last_path = None
    _prepared_path = None  # set by prepare_for_inference

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
        self.register_load_state_dict_post_hook(LinearLoSparse._invalidate_derived)

    # -- inference settings: each takes effect on the next call ---------------------------------------
    @property
    def prefer(self):
        return self.__dict__.get("_prefer", "speed")

    @prefer.setter
    def prefer(self, value):
        _check_prefer(value)
        self.__dict__["_prefer"] = value
        self.refresh()

    @property
    def compact_path(self):
        return self.__dict__.get("_compact_path")

    @compact_path.setter
    def compact_path(self, value):
        if value is not None and value not in _COMPACT_FORWARDS:
            raise ValueError(f"compact_path={value!r}: allowed values are None, " + ", ".join(map(repr, COMPACT_PATHS)))
        self.__dict__["_compact_path"] = value
        self.refresh()

    @property
    def path_choice(self):
        return self.__dict__.get("_path_choice", "cost")

    @path_choice.setter
    def path_choice(self, value):
        if value not in PATH_CHOICES:
            raise ValueError(f"path_choice={value!r}: allowed values are " + ", ".join(map(repr, PATH_CHOICES)))
        self.__dict__["_path_choice"] = value
        self.refresh()

    @property
    def cache_derived(self):
        return self.__dict__.get("_cache_derived", True)

    @cache_derived.setter
    def cache_derived(self, value):
        self.__dict__["_cache_derived"] = bool(value)
        self.refresh()

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
        """Y = X (LR)^T + X S^T + B. The bias rides in the GEMM epilogue, so autocast keeps one dtype.

        Uncompacted (dense S, training), a call with many rows multiplies by the merged ``L R + S``
        (:class:`_MergedLinear`), one with few rows runs the factored formula (:func:`_merge_pays`).
        Compacted and without a gradient to compute for the layer's weights (inference), it runs one of the
        forms of :data:`COMPACT_PATHS` on tensors derived once from L, R and the kept rows of S (see
        :meth:`_compact_forward`). Otherwise (training) it computes ``X [R; S_kept]^T`` as one GEMM when x
        has at least ``r + k`` rows, then ``H L^T + B`` and an in-place ``index_add_`` of the k sparse columns,
        all through autograd (column form: ``H L^T + B + X[..., idx] S_cols^T``).
        """
        if not self.has_sparse:
            return F.linear(self.right(x), self.left.weight, self.bias)
        if not self.is_compacted:
            if _merge_pays(x.numel() // x.shape[-1], self.in_feature, self.out_feature):
                dev = x.device.type
                dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
                return _MergedLinear.apply(x, self.left.weight, self.right.weight, self.sparse.weight, self.bias,
                                           dtype)
            return F.linear(self.right(x), self.left.weight, self.bias) + self.sparse(x)
        if not (torch.is_grad_enabled() and self._weights_need_grad()):
            return self._compact_forward(x)
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

    # -- compacted inference ----------------------------------------------------------------------------
    def _weights_need_grad(self):
        return any(p.requires_grad for p in (self.left.weight, self.right.weight, self.sparse_weight_pruned,
                                             self.sparse_weight_pruned_cols, self.bias) if p is not None)

    def _kept_index(self):
        return self.nonzero_idx if self.sparse_weight_pruned is not None else self.nonzero_col_idx

    def _compact_forward(self, x):
        """Inference of a compacted layer: x is flattened to 2-D (the bias stays in the GEMM), the path is
        chosen per token-count bucket (:meth:`_path_for`), and the path's derived tensors are reused while L,
        R, S, the bias and the kept indices are the same tensors, unmodified (:meth:`_derived_for`). Under
        ``torch.compile`` (and with ``cache_derived = False``) they are derived on every call, inside the graph. A layer prepared by
        :func:`prepare_for_inference` runs on its buffers instead (:func:`_prepared_forward`).
        """
        if self._prepared_path is not None:  # prepare_for_inference: derived once, held as buffers
            return _prepared_forward(self, x)
        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
        path = self._path_for(x2)
        if torch.compiler.is_compiling() or not self.cache_derived:
            d = self._derive(path)
        else:
            d = self._derived_for(path)
        self.last_path = path
        y = _COMPACT_FORWARDS[path](x2, d, self._kept_index(), self.bias)
        return y if x.dim() == 2 else y.view(*shape[:-1], self.out_feature)

    def _sources(self):
        """L, R, the kept part of S, its indices and the bias (read from the module dicts: called every call)."""
        p, b = self._parameters, self._buffers
        return [t for t in (self._modules["left"]._parameters["weight"], self._modules["right"]._parameters["weight"],
                            p["sparse_weight_pruned"], b["nonzero_idx"], p["sparse_weight_pruned_cols"],
                            b["nonzero_col_idx"], p["bias"]) if t is not None]

    def _derived_key(self):
        """The source tensors (by weak reference: a new tensor at a freed address is not taken for the old one)
        with their stamps (:func:`_tensor_stamp`)."""
        return tuple((weakref.ref(t), _tensor_stamp(t)) for t in self._sources())

    def _derived_state(self):
        state = self.__dict__.get("_derived")
        if state is None:
            state = self.__dict__["_derived"] = _Derived()
        return state

    def _key_holds(self, key):
        """Whether ``key`` (from :meth:`_derived_key`) still describes the source tensors."""
        sources = self._sources()
        return key is not None and len(key) == len(sources) and all(
            ref() is t and stamp == _tensor_stamp(t) for (ref, stamp), t in zip(key, sources))

    def _derived_for(self, path):
        """The cached tensors of ``path``; all rebuilt when a source tensor was replaced or modified in place."""
        state = self._derived_state()
        if not self._key_holds(state.key):
            state.tensors, state.key = {}, self._derived_key()
        if path not in state.tensors:
            with torch.inference_mode(False), torch.no_grad():
                state.tensors[path] = self._derive(path)
        return state.tensors[path]

    def refresh(self):
        """Forget the derived inference tensors and the forms chosen so far; the next call rebuilds them.

        Needed only after an edit PyTorch does not version: in place through ``.data``, in place on inference
        tensors inside ``torch.inference_mode``, or under ``torch.autograd._unsafe_preserve_version_counter``.
        Replaced tensors, in-place edits (optimizer steps, ``copy_``), ``.to()``, ``load_state_dict``,
        ``prune`` and setting ``prefer`` / ``compact_path`` / ``path_choice`` are noticed without it.
        A layer prepared by :func:`prepare_for_inference` re-derives its buffers in place (a compiled model or a
        captured CUDA graph then reads the new values).
        """
        self.__dict__["_derived"] = None
        if self._prepared_path is not None:
            _refresh_prepared(self)

    def _invalidate_derived(self, *args, **kwargs):  # load_state_dict post-hook
        self.refresh()

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda(): derived tensors follow on next use
        self.__dict__["_derived"] = None
        self.__dict__["_prepared_key"] = None  # prepared buffers move with the module; re-derived on next call
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # pickle / deepcopy: the derived tensors are rebuilt, not copied
        state = self.__dict__.copy()
        state["_derived"] = None
        return state

    def _derive(self, path):
        """Tensors that ``path`` multiplies by, from the current weights (no gradient).

        Row form: ``rs`` = ``[R; 0; S_kept; 0]`` with r and k rounded up to multiples of 8 (zero rows), so the
        GEMMs' inner and output sizes stay multiples of 8; ``L`` gets matching zero columns. Column form:
        ``R`` and ``L`` padded the same way, ``S_cols`` as it is (``onehot``: ``[R; 0; E; 0]`` and
        ``[L | 0 | S_cols | 0]``). ``merged`` is the dense ``L R + S``.
        """
        L, R = self.left.weight.detach(), self.right.weight.detach()
        cols = self.sparse_weight_pruned_cols is not None
        S = (self.sparse_weight_pruned_cols if cols else self.sparse_weight_pruned).detach()
        idx = self._kept_index()
        r, k = self.reduced_rank, idx.numel()
        if path == "merged":
            acc = torch.promote_types(L.dtype, torch.float32)  # bf16/fp16 weights: summed in fp32
            return {"w": torch.mm(L.to(acc), R.to(acc)).index_add_(1 if cols else 0, idx, S.to(acc)).to(L.dtype)}
        r8, k8 = _ceil8(r), _ceil8(k)
        lpad = torch.cat([L, L.new_zeros(L.shape[0], r8 - r)], dim=1)
        b_col = None if self.bias is None else self.bias.detach()[:, None]
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

    def _path_for(self, x2):
        """The path for this many tokens: ``compact_path`` if set, else the cheapest by :func:`_path_costs`
        (deterministic, the same on every rank), or with ``path_choice = "timed"`` the fastest by one timing per
        shape class (:func:`_timed_choice`); the choice is kept per token bucket (powers of two)."""
        if self.compact_path is not None:
            return self.compact_path
        n = x2.shape[0]
        bucket = max(1, n).bit_length()
        state = self._derived_state()
        if bucket in state.paths:
            return state.paths[bucket]
        candidates = COMPACT_PATHS if self.prefer == "speed" else COMPACT_PATHS[:-1]
        compiling = torch.compiler.is_compiling()
        capturing = x2.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.path_choice == "timed" and not compiling and not capturing:
            path = _timed_choice(self, x2, candidates)
            keep = set(state.paths.values()) | {path}
            state.tensors = {p: d for p, d in state.tensors.items() if p in keep}  # only the chosen forms stay
        else:
            costs = _path_costs(self.in_feature, self.out_feature, self.reduced_rank, self._kept_index().numel(),
                                1 << (bucket - 1), x2.element_size(), x2.device.type,
                                cols=self.sparse_weight_pruned_cols is not None)
            path = min(candidates, key=costs.__getitem__)
        if not compiling:
            state.paths[bucket] = path
        return path

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

    :return: list of ``{"name", "in_features", "out_features", "rank"}``, one per replaced layer.
    """
    allow_name = DEFAULT_ALLOW_NAME if allow_name is None else list(allow_name)
    block_name = DEFAULT_BLOCK_NAME if block_name is None else list(block_name)
    input_cov = kwargs.pop("input_cov", None)
    if input_cov is not None and do_svd:
        targets = [n for n, _ in _linear_targets(module, allow_name, block_name)]
        missing = [n for n in targets if n not in input_cov]
        if missing:
            raise ValueError(f"input_cov has no statistics for {len(missing)} of the {len(targets)} layers to "
                             f"replace, e.g. {missing[:3]}; collect them with collect_input_covariance on the same "
                             "allow_name/block_name")
        kwargs["_input_cov"], kwargs["_whitened"] = input_cov, {}
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
def collect_input_covariance(model, batches, allow_name=None, block_name=None, names=None, chunk=4096):
    """Calibration: ``C = E[x x^T]`` of the inputs of the layers STEP 1 would replace, over ``batches``.

    ``batches``: an iterable of dicts (``model(**batch)``) or tensors (``model(batch)``), e.g. a few blocks
    of text; labels are dropped. Every token row counts once (pass unpadded blocks). The per-chunk products
    ``x^T x`` (at most ``chunk`` rows) are taken in float32 and summed in float64. Layers called in a row
    on the same input tensor (q/k/v, gate/up) share one accumulation and get the same ``C`` object.
    ``names`` restricts the statistics to those layers (to bound memory on large models: one pass per group
    of decoder blocks, each ``C`` used by :func:`substitute_layer_weights` and dropped).

    :return: ``{qualified layer name: C}`` (float64, on the layers' device); logs tokens, memory and time.
    """

    targets = _linear_targets(model, allow_name, block_name)
    if names is not None:
        unknown = sorted(set(names) - {n for n, _ in targets})
        if unknown:
            raise ValueError(f"names: {unknown[:3]} are not layers to replace (allow_name={allow_name})")
        targets = [(n, m) for n, m in targets if n in set(names)]
    if not targets:
        raise ValueError(f"collect_input_covariance: no nn.Linear matches allow_name={allow_name}")
    sums, counts, owner, last = {}, {}, {}, {"x": None, "name": None}

    def hook(name):
        def pre(mod, args):
            x = args[0]
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
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets]
    was_training = model.training
    model.eval()
    start, batches_seen = time.perf_counter(), 0
    try:
        for batch in batches:
            last["x"] = last["name"] = None
            if isinstance(batch, dict):
                model(**{k: v for k, v in batch.items() if k != "labels"})
            else:
                model(batch)
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
    grids = []
    for E, ranks, rank_cost, row_cost in tables:
        cost = ranks.to(torch.float64)[:, None] * rank_cost + torch.arange(E.shape[1], dtype=torch.float64) * row_cost
        grids.append((E, cost))

    def choose(lam):
        out, total = [], 0
        for E, cost in grids:
            f = int(torch.argmin((E + lam * cost).flatten()))
            j, k = divmod(f, E.shape[1])
            out.append((j, k))
            total += int(cost[j, k])
        return out, total

    choice, total = choose(0.0)
    lam = 0.0
    if total > budget:
        lo = 0.0
        hi = max(float(E.max()) for E, _ in grids) / max(1.0, min(float(c[c > 0].min()) for _, c in grids
                                                                  if (c > 0).any())) * 2 + 1e-300
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
                        dc = int(cost[jj, kk]) - int(cost[j, k])
                        if 0 < dc <= budget - total:
                            ratio = float(E[j, k] - E[jj, kk]) / dc
                            if best is None or ratio > best[0]:  # gains are >= 0 (up to rounding)
                                best = (ratio, i, jj, kk, dc)
            if best is None:
                break
            _, i, jj, kk, dc = best
            choice[i], total = (jj, kk), total + dc
    return choice, total, lam


@torch.no_grad()
def one_shot_allocate(module, input_cov, output_fisher, kept_fraction, allow_name=None, block_name=None,
                      rank_multiple=8, refit=1, parts=("lowrank", "rows"), _svds=None):
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
    (rows of W only, rank 0). Memory: the full SVDs of all layers are held at once (3x the weights).

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
    targets = _linear_targets(module, allow_name, block_name)
    if not targets:
        raise ValueError(f"one_shot_allocate: no nn.Linear matches allow_name={allow_name}")
    for stats, what in ((input_cov, "input_cov"), (output_fisher, "output_fisher")):
        missing = [] if stats is None else [n for n, _ in targets if n not in stats]
        if missing:
            raise ValueError(f"one_shot_allocate: {what} has no statistics for {len(missing)} of the {len(targets)} "
                             f"layers to replace, e.g. {missing[:3]}")
    start = time.perf_counter()
    svds = _svds if _svds is not None else _fisher_svds(targets, input_cov, output_fisher)
    rows = "rows" in parts
    tables, info_tables = [], []
    for name, lin in targets:
        H, Win = lin.weight.shape
        q = svds[name]["S"].numel()
        ranks = (torch.unique(torch.cat([torch.arange(0, q, rank_multiple), torch.tensor([q])]))
                 if "lowrank" in parts else torch.zeros(1, dtype=torch.long))
        E, res = _allocation_table(svds[name]["U"].cpu(), svds[name]["S"].cpu(), ranks, rows)
        tables.append((E, ranks, H + Win, Win + 1))
        info_tables.append(res)
    total_entries = sum(m.weight.numel() for _, m in targets)
    budget = math.floor(kept_fraction * total_entries)
    choice, stored, lam = _allocate(tables, budget)
    before = sum(float(t[0][j, k]) for t, (j, k) in zip(tables, choice))
    after, layers = 0.0, []
    for (name, lin), (E, ranks, _, _), res, (j, k) in zip(targets, tables, info_tables, choice):
        d = svds[name]
        W = lin.weight.detach()
        H, Win = W.shape
        r = int(ranks[j])
        U, S, Vh = d["U"], d["S"], d["Vh"]
        kept = torch.topk(res[j], k).indices.to(U.device) if k else torch.zeros(0, dtype=torch.long, device=U.device)
        s = S[:r].sqrt()
        Lw, Rw = U[:, :r] * s, s[:, None] * Vh[:r]
        err = float(E[j, k])
        if r and 0 < k < H:
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
        after += err
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
        _set_submodule(module, name, layer)
        layers.append({"name": name, "rank": r, "kept_rows": int(k), "in_features": Win, "out_features": H})
    info = {"budget": budget, "stored": stored, "total_entries": total_entries, "weighted_error": after,
            "weighted_error_before_refit": before, "layers": layers}
    ranks = [x["rank"] for x in layers]
    logger.info("LoSparse one-shot allocation: %d layers, rank %d-%d, %d rows of S kept; %d stored parameters of "
                "a budget of %d (%.2f%% of %d); weighted error %.4g (%.4g before refit); %.1f s", len(layers),
                min(ranks), max(ranks), sum(x["kept_rows"] for x in layers), stored, budget,
                100 * stored / total_entries, total_entries, after, before, time.perf_counter() - start)
    return info


def _check_prefer(prefer):
    if prefer not in PREFER_CHOICES:
        raise ValueError(f"prefer={prefer!r}: allowed values are {', '.join(map(repr, PREFER_CHOICES))}")


def prune(module, prefer="speed"):
    """Compact every :class:`LinearLoSparse` in ``module`` (see :meth:`LinearLoSparse.prune_sparse`).

    ``prefer`` sets how the compacted layers run inference: ``"speed"`` (default) may multiply by the merged
    dense ``L R + S`` where that is faster (it then holds that matrix in memory too); ``"memory"`` never
    builds it. Each S keeps its nonzero rows, or its nonzero columns when those store less (column-structured
    pruning). A layer whose S has neither a zero row nor a zero column (not pruned, or pruned unstructured)
    gains nothing: it is named in a warning, and :func:`export_compact` stores it as one dense matrix when
    that is smaller. Returns the number of
    layers compacted. Re-create the optimizer afterwards: the parameters changed.
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


# Inference preparation: derived tensors held as buffers, for torch.compile and CUDA graphs --------------------
# The tensors of the prepared form (LinearLoSparse._derive) are non-persistent buffers named _prepared_<key>; the
# non-tensor entries (padded sizes, row or column form) are kept in the layer's __dict__.
_PREPARED_PREFIX = "_prepared_"
PREPARE_TOKENS = 4096  # rows per call a path is chosen for by default (BERT b32 x 128)


def prepare_for_inference(module, tokens=None, path=None):
    """Derive each compacted layer's inference tensors once and hold them as non-persistent buffers.

    For ``torch.compile`` (``fullgraph=True``, ``mode="reduce-overhead"``) and CUDA graphs: the graph reads the
    buffers as inputs instead of building ``[R; S_kept]``, the padded ``L`` (or the merged weight) on every
    call. Each layer runs one form of :data:`COMPACT_PATHS` for all calls: ``path`` if given, else the one the
    layer picks (``compact_path``, ``prefer``; cost model on CPU, one timing on CUDA) for ``tokens`` rows per
    call (batch x sequence length; default :data:`PREPARE_TOKENS`). The buffers are not in the state dict
    (keys and checkpoints unchanged), follow ``.to()``, and take about as much memory as the compacted weights
    (the dense matrix for ``merged``).

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
        chosen = path
        if chosen is None and (tokens is not None or m._prepared_path is None):
            chosen = _choose_path(m, tokens or PREPARE_TOKENS)
        if chosen is not None:
            m._prepared_path = chosen
        _refresh_prepared(m)
    logger.info("LoSparse: prepared %d compacted layers for inference (%s)", len(layers),
                ", ".join(sorted({m._prepared_path for m in layers})))
    return len(layers)


def _choose_path(layer, tokens):
    """The path ``layer`` takes for ``tokens`` rows (its own rule); drops what the choice cached."""
    w = layer.left.weight
    if w.is_cuda:  # timed on real memory
        x2 = torch.zeros(tokens, layer.in_feature, device=w.device, dtype=w.dtype)
    else:  # the cost model reads only the shape, the element size and the device type
        x2 = torch.zeros((), device=w.device, dtype=w.dtype).expand(tokens, layer.in_feature)
    layer._prepared_path = None
    with torch.no_grad():
        path = layer._path_for(x2)
    layer._invalidate_derived()
    return path


def _refresh_prepared(layer):
    """Re-derive the prepared path's tensors into the layer's buffers: in place when shape, dtype and device
    hold (a compiled graph or a CUDA graph keeps reading the same storage), else as new buffers."""
    with torch.inference_mode(False), torch.no_grad():
        d = layer._derive(layer._prepared_path)
        tensors = {key: t for key, t in d.items() if torch.is_tensor(t)}
        for name in [b for b in layer._buffers if b.startswith(_PREPARED_PREFIX)]:
            if name[len(_PREPARED_PREFIX):] not in tensors:  # another path's, from an earlier preparation
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
    layer.__dict__["_prepared_meta"] = {key: v for key, v in d.items() if key not in tensors}
    layer.__dict__["_prepared_key"] = layer._derived_key()


def _prepared_forward(layer, x):
    """Compacted inference on the buffers of :func:`prepare_for_inference`; eager calls refresh stale ones."""
    if not torch.compiler.is_compiling() and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        if not layer._key_holds(layer.__dict__.get("_prepared_key")):
            _refresh_prepared(layer)
    path = layer._prepared_path
    d = dict(layer.__dict__["_prepared_meta"])
    d.update({name[len(_PREPARED_PREFIX):]: t for name, t in layer._buffers.items() if name.startswith(_PREPARED_PREFIX)})
    layer.last_path = path
    shape = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    y = _COMPACT_FORWARDS[path](x2, d, layer._kept_index(), layer.bias)
    return y if x.dim() == 2 else y.view(*shape[:-1], layer.out_feature)


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
        self._groups, self._stats_key = [], None  # flat statistics per device (see _ensure_stats)
        self._weights = None  # (layout, multiplicity of every score) for the threshold
        self._nonfinite = None  # device counter of skipped updates (read only at mask steps: no sync)
        self._nonfinite_reported = 0
        self._row_sharded, self._sharded_weights = {}, None  # FSDP2 (see _ensure_stats, _sharded_threshold)
        self._frozen_reported = set()
        self._check_sharding(model)

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

    def _check_sharding(self, model):
        """Accept full parameters and FSDP2 row shards (``DTensor``, ``Shard(0)`` on a 1-D mesh); refuse the rest."""
        self._shard_group = None
        for n, p in model.named_parameters():
            fsdp2_rows = _is_sharded(p) and p.device_mesh.ndim == 1 and p.placements[0].is_shard(0)
            if fsdp2_rows:
                if self.whether_mask_para(_clean_name(n)) and self._shard_group is None:
                    self._shard_group = p.device_mesh.get_group()
                continue
            if hasattr(p, "ds_id") or hasattr(p, "ds_numel") or type(p).__name__ in ("FlatParameter", "DTensor") or \
                    getattr(p, "_is_sharded", False):
                raise RuntimeError(
                    f"Pruner: parameter {n!r} is sharded in a way LoSparse cannot prune (DeepSpeed ZeRO-3, FSDP1 flat "
                    "parameters, tensor parallel or a 2-D mesh): use a single process or DDP (accelerate launch "
                    "--multi_gpu), or FSDP2 (--fsdp2, or accelerate launch --use_fsdp --fsdp_version 2), whose "
                    "row shards the Pruner handles; see utils.check_distributed_support.")

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
    # The statistics of all masked matrices live in one flat float32 tensor per device and kind (``ipt``,
    # ``exp_avg_ipt``, ``exp_avg_unc``), one segment per matrix: its rows/columns on the reduced path, every
    # entry otherwise. A window step is then two kernels per matrix (``S * G`` and its L1 norm written
    # straight into the segment) plus a handful for all matrices together (EMA, window average, the
    # non-finite guard): on a GPU each op is a launch. ``self.ipt[name]`` etc. are views of the segments.
    def _stat_kinds(self):
        return ("ipt", "exp_avg_ipt") + (("exp_avg_unc",) if self.beta2 > 0 and self.beta2 != 1 else ())

    def _ensure_stats(self, params):
        """(Re)build the flat statistics for ``params`` (name, parameter), keeping the values of known names."""
        local = [(n, p, _local(p)) for n, p in params]  # FSDP2: the local rows; p.shape stays the global one
        key = tuple((n, tuple(t.shape), t.device) for n, _, t in local)
        if key == self._stats_key:
            return
        old = {kind: {n: t.detach() for n, t in getattr(self, kind).items()} for kind in self._stat_kinds()}
        by_device = {}
        self._row_sharded = {}  # FSDP2: names whose statistics hold this rank's rows (the others are replicated)
        for n, p, t in local:
            axis = self._axis(n, p) if self.reduced else None
            shape = (t.shape[1 - axis],) if axis is not None else tuple(t.shape)
            self._row_sharded[n] = _is_sharded(p) and axis != 0
            if _is_sharded(p) and self._shard_group is None:
                self._shard_group = p.device_mesh.get_group()
            by_device.setdefault(t.device, []).append((n, axis, shape, 1 if axis is None else p.shape[axis]))
        self._groups = []
        for kind in self._stat_kinds():
            setattr(self, kind, {})
        for dev, segs in by_device.items():
            segments, total = [], 0
            for n, axis, shape, _ in segs:
                segments.append((n, axis, shape, total, math.prod(shape)))
                total += math.prod(shape)
            flat = {kind: torch.zeros(total, dtype=torch.float32, device=dev) for kind in self._stat_kinds()}
            for kind in self._stat_kinds():
                for n, _, shape, off, size in segments:
                    view = flat[kind][off:off + size].view(shape)
                    if n in old[kind] and old[kind][n].numel() == size:
                        view.copy_(old[kind][n].reshape(shape))
                    getattr(self, kind)[n] = view
            scale = None
            if self.reduced and self.structured_method == "mean":  # the L1 norm is a sum: divide by the length
                scale = torch.cat([torch.full((size,), 1.0 / length, device=dev)
                                   for (_, _, _, length), (_, _, _, _, size) in zip(segs, segments)])
            cur = torch.empty(total, dtype=torch.float32, device=dev)  # this step's |S * G|, reused every step
            drop = torch.empty(total, dtype=torch.bool, device=dev)  # the mask step's rows (entries) to zero
            self._groups.append({
                "device": dev, "segments": segments, "flat": flat, "scale": scale, "cur": cur, "drop": drop,
                "cur_views": [cur[off:off + size].view(shape) for _, _, shape, off, size in segments],
                "drop_views": [drop[off:off + size].view(shape) if axis is None else
                               drop[off:off + size].unsqueeze(axis) for _, axis, shape, off, size in segments],
                "mult": [length for _, _, _, length in segs],
                # FSDP2: segments whose values every rank holds in full (column scores after their all-reduce)
                "replicated": [self._shard_group is not None and not self._row_sharded[n] for n, _, _, _ in segs],
                "colsum": [(off, size) for n, axis, _, off, size in segments if axis == 0 and self._row_sharded.get(
                    n) is False and self._shard_group is not None]})
        self._stats_key = key

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
        params = {n: _local(p) for n, p in masked}
        grads = {n: _local(g) for n, g in grads.items()}
        local_step = global_step % self.deltaT
        update_step = global_step // self.deltaT
        b1, b2 = self.beta1, self.beta2
        curs, presents = [], []
        for g in self._groups:
            cur, present = g["cur"], None
            for (n, axis, shape, off, size), out in zip(g["segments"], g["cur_views"]):
                if n not in grads:  # no gradient this step (unused branch): leave this matrix's statistics alone
                    present = torch.ones_like(cur, dtype=torch.bool) if present is None else present
                    present[off:off + size] = False
                    out.zero_()
                    continue
                s = torch.mul(params[n], grads[n])
                if axis is None:
                    torch.abs(s, out=out)
                else:  # sum_j |s_ij| (or over i), accumulated in float32
                    torch.linalg.vector_norm(s, 1, dim=axis, dtype=torch.float32, out=out)
            if g["colsum"]:  # FSDP2: a column's sum over the rows of every rank
                sums = torch.cat([cur[off:off + size] for off, size in g["colsum"]])
                torch.distributed.all_reduce(sums, group=self._shard_group)
                for (off, size), part in zip(g["colsum"], sums.split([size for _, size in g["colsum"]])):
                    cur[off:off + size].copy_(part)
            if g["scale"] is not None:
                cur.mul_(g["scale"])
            curs.append(cur)
            presents.append(present)
        finite = torch.isfinite(curs[0]).all()
        for cur in curs[1:]:
            finite = finite & torch.isfinite(cur).all().to(finite.device)
        if self._shard_group is not None:  # FSDP2: skip the update on every rank if any rank saw inf/nan
            flag = finite.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self._shard_group)
            finite = flag.bool()
        if self._nonfinite is None:
            self._nonfinite = torch.zeros((), dtype=torch.long, device=finite.device)
        self._nonfinite += (~finite).long()

        for g, cur, present in zip(self._groups, curs, presents):
            ok = finite.to(cur.device) if present is None else present & finite.to(cur.device)
            ipt, avg = g["flat"]["ipt"], g["flat"]["exp_avg_ipt"]
            if local_step == 0:
                new_avg = b1 * avg + (1 - b1) * ipt
                if "exp_avg_unc" in g["flat"]:
                    unc = g["flat"]["exp_avg_unc"]
                    if 0 < b2 < 1:
                        unc.copy_(torch.where(ok, b2 * unc + (1 - b2) * (ipt - new_avg).abs(), unc))
                    elif b2 == 2:
                        unc.copy_(torch.where(ok, (update_step * unc + (ipt - new_avg) ** 2) / (update_step + 1), unc))
                avg.copy_(torch.where(ok, new_avg, avg))
                ipt.copy_(torch.where(ok, cur, ipt))
            else:
                ipt.copy_(torch.where(ok, (ipt * local_step + cur) / (local_step + 1), ipt))

    def _flat_scores(self, g):
        """Scores of one device group's flat statistics (element-wise, or per row/column when reduced)."""
        avg, b2 = g["flat"]["exp_avg_ipt"], self.beta2
        if 0 < b2 < 1:
            return avg * g["flat"]["exp_avg_unc"]
        if b2 == 1:
            return avg
        if b2 == 2:
            return avg * g["flat"]["exp_avg_unc"].sqrt()
        return avg * (g["flat"]["ipt"] - avg).abs()

    def _aggregate(self, score, n, p):
        """Return ``(scores, multiplicity, axis)``: one score per row/column (or per entry)."""
        axis = self._axis(n, p)
        if axis is None:
            return score.reshape(-1), 1, None
        if not (self.reduced and score.dim() == 1):
            m = self.structured_method
            if axis == 0 and _is_sharded(p):  # FSDP2: a column spans the rows of every rank
                return self._sharded_column_scores(score, m, p.shape[0]), p.shape[axis], axis
            if m == "mean":
                score = score.mean(dim=axis)
            elif m == "sum":
                score = score.sum(dim=axis)
            elif m == "max":
                score = score.amax(dim=axis)
            else:
                score = score.amin(dim=axis)
        return score, p.shape[axis], axis

    def _sharded_column_scores(self, score, method, rows):
        """Column aggregates of row-sharded element scores: local partial results, all-reduced over the ranks."""
        dist = torch.distributed
        if method in ("mean", "sum"):
            out, op = score.sum(dim=0), dist.ReduceOp.SUM
        elif score.shape[0] == 0:  # this rank holds no row
            out = score.new_full(score.shape[1:], float("-inf") if method == "max" else float("inf"))
            op = dist.ReduceOp.MAX if method == "max" else dist.ReduceOp.MIN
        else:
            out = score.amax(dim=0) if method == "max" else score.amin(dim=0)
            op = dist.ReduceOp.MAX if method == "max" else dist.ReduceOp.MIN
        out = out.contiguous()
        dist.all_reduce(out, op=op, group=self._shard_group)
        return out / rows if method == "mean" else out

    def _in_layout(self, params):
        """The statistics' only group when its segments are ``params`` in order and need no aggregation."""
        if self.pruner_name == "Magnitude" or not (self.reduced or self.structured_method is None):
            return None
        self._ensure_stats([(n, p) for n, p in params if p.requires_grad])
        if len(self._groups) == 1 and [s[0] for s in self._groups[0]["segments"]] == [n for n, _ in params]:
            return self._groups[0]
        return None

    def _all_scores(self, params):
        """``(scores, multiplicities, lengths, axes)`` of every masked matrix, scores concatenated in order."""
        device = _local(params[0][1]).device
        if self.pruner_name == "Magnitude":
            per = [self._aggregate(_local(p).detach().abs().float(), n, p) for n, p in params]
        else:
            self._ensure_stats([(n, p) for n, p in params if p.requires_grad])
            flats = {s[0]: (g, s) for g in self._groups for s in g["segments"]}
            scored = {id(g): self._flat_scores(g) for g in self._groups}
            per = []
            for n, p in params:
                if n in flats:
                    g, (_, _, shape, off, size) = flats[n]
                    score = scored[id(g)][off:off + size].view(shape)
                else:  # frozen: never scored
                    t = _local(p)
                    score = torch.zeros(t.shape[1 - self._axis(n, p)] if self.reduced and self._axis(n, p)
                                        is not None else t.shape, device=t.device)
                per.append(self._aggregate(score, n, p))
        scores = torch.cat([s.reshape(-1).float().to(device) for s, _, _ in per])
        return scores, [m for _, m, _ in per], [s.numel() for s, _, _ in per], [a for _, _, a in per]

    @torch.no_grad()
    def mask_with_threshold(self, model, threshold):
        """Zero the lowest-scoring rows (entries) so that a fraction ``threshold`` of S is kept."""
        params = self._masked_params(model)
        if not params:
            return None
        device = _local(params[0][1]).device
        if self._shard_group is None and any(_is_sharded(p) for _, p in params):
            self._check_sharding(model)
        group = self._in_layout(params)
        if group is not None:  # scores, multiplicities and drop masks straight from the flat statistics
            scores = self._flat_scores(group)
            scores = scores.clone() if scores is group["flat"]["exp_avg_ipt"] else scores
            mult, lengths = group["mult"], [s[4] for s in group["segments"]]
            replicated = group["replicated"]
        else:
            scores, mult, lengths, axes = self._all_scores(params)
            replicated = [not _is_sharded(p) or a == 0 for (_, p), a in zip(params, axes)]
        if self._shard_group is None:
            scores = _broadcast_from_rank0(scores)
        if self._nonfinite is not None:
            skipped = int(self._nonfinite)
            if skipped > self._nonfinite_reported:
                logger.warning("Pruner: %d update(s) with non-finite gradients were skipped so far",
                               skipped)
                self._nonfinite_reported = skipped
        total = sum(m * l for m, l in zip(mult, lengths))
        k = int(total * (1 - threshold))
        if self._shard_group is not None:  # FSDP2: the threshold of all ranks' scores
            mask_threshold = self._sharded_threshold(scores, mult, lengths, replicated, threshold, device)
        elif k <= 0:
            mask_threshold = float("-inf")
        elif all(m == 1 for m in mult):
            mask_threshold = torch.kthvalue(scores, k)[0].item()
        else:
            key = (tuple(mult), tuple(lengths), device)
            if self._weights is None or self._weights[0] != key:  # the same every mask step: build it once
                self._weights = (key, torch.cat([torch.full((l,), m, dtype=torch.float64, device=device)
                                                 for m, l in zip(mult, lengths)]))
            weights = self._weights[1]
            sorted_scores, order = scores.sort()
            cum = weights[order].cumsum(0)
            pos = torch.searchsorted(cum, torch.tensor([float(k)], dtype=torch.float64, device=device))
            mask_threshold = sorted_scores[pos.clamp(max=sorted_scores.numel() - 1)].item()
        if group is not None:
            torch.lt(scores, mask_threshold, out=group["drop"])
            for (_, p), drop in zip(params, group["drop_views"]):
                _local(p).masked_fill_(drop, 0.0)
            return mask_threshold
        drop_all = scores < mask_threshold
        offset = 0
        for (n, p), axis, l in zip(params, axes, lengths):
            p = _local(p)
            drop = drop_all[offset:offset + l].to(p.device)
            offset += l
            if axis is None:
                p.masked_fill_(drop.view(p.shape), 0.0)
            else:
                p.masked_fill_(drop.unsqueeze(axis), 0.0)
        return mask_threshold

    def _sharded_threshold(self, scores, mult, lengths, replicated, threshold, device):
        """FSDP2: the k-th smallest element score over all ranks, from their gathered aggregated scores.

        Each rank contributes its rows' scores with their multiplicities; scores every rank holds in full
        (columns) count on rank 0 only. The gathered multiset is that of one process, so is the threshold.
        """
        group = self._shard_group
        first = torch.distributed.get_rank(group) == 0
        key = (tuple(mult), tuple(lengths), tuple(replicated), device)
        if self._sharded_weights is None or self._sharded_weights[0] != key:
            local = torch.cat([torch.full((l,), float(m) if first or not rep else 0.0, dtype=torch.float64,
                                          device=device) for m, l, rep in zip(mult, lengths, replicated)] or
                              [torch.zeros(0, dtype=torch.float64, device=device)])
            self._sharded_weights = (key, _all_gather_rows(local, group))
        weights = self._sharded_weights[1]
        scores = _all_gather_rows(scores.float(), group)
        k = int(int(weights.sum().item()) * (1 - threshold))
        if k <= 0:
            return float("-inf")
        sorted_scores, order = scores.sort()
        cum = weights[order].cumsum(0)
        pos = torch.searchsorted(cum, torch.tensor([float(k)], dtype=torch.float64, device=device))
        return sorted_scores[pos.clamp(max=sorted_scores.numel() - 1)].item()

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
        row_sharded = self._row_sharded if self._shard_group is not None else {}

        def full(n, t):
            t = t.detach()
            if row_sharded.get(n):
                t = _all_gather_rows(t.contiguous(), self._shard_group)
            return t.cpu().clone()

        return {"layout": self._layout(),
                "ipt": {n: full(n, t) for n, t in self.ipt.items()},
                "exp_avg_ipt": {n: full(n, t) for n, t in self.exp_avg_ipt.items()},
                "exp_avg_unc": {n: full(n, t) for n, t in self.exp_avg_unc.items()},
                "nonfinite_steps": 0 if self._nonfinite is None else int(self._nonfinite),
                "nonfinite_reported": self._nonfinite_reported}

    def load_state_dict(self, state_dict):
        layout = state_dict.get("layout", {})
        if layout != self._layout():
            raise ValueError(f"Pruner.load_state_dict: saved with {layout}, this pruner is {self._layout()}; "
                             "use the same --pruner_name/--beta2/--structured_method/--structured_direction")
        # Kept as plain tensors until the next step lays them out next to the parameters (_ensure_stats).
        self.ipt = dict(state_dict["ipt"])
        self.exp_avg_ipt = dict(state_dict["exp_avg_ipt"])
        self.exp_avg_unc = dict(state_dict["exp_avg_unc"])
        self._groups, self._stats_key = [], None
        self._nonfinite = torch.tensor(int(state_dict.get("nonfinite_steps", 0)))
        self._nonfinite_reported = int(state_dict.get("nonfinite_reported", 0))
        masked = [(n, p) for n, p in self._masked_params(self.model) if p.requires_grad] if self.model is not None \
            else []
        for n, p in masked:  # FSDP2: keep this rank's rows of the (single-process layout) statistics
            if _is_sharded(p) and (self._axis(n, p) if self.reduced else None) != 0:
                start, end = _row_range(p)
                for kind in self._stat_kinds():
                    t = getattr(self, kind).get(n)
                    if t is not None and t.dim() and t.shape[0] == p.shape[0]:
                        getattr(self, kind)[n] = t[start:end]
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


def _set_submodule(root, name, new):
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


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
    _refuse_sharded(model, "save_checkpoint")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, str(tmp))
    os.replace(tmp, path)
    return path


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
    so far, by token count (``"fused"``, ``"merged"``, ... ; ``"fused<=127,merged"``: up to 127 tokens
    ``fused``, above ``merged``), ``"pending"`` before its first inference call."""
    if not m.has_sparse:
        return "low_rank"
    if not m.is_compacted:
        return "uncompacted"
    if m._prepared_path is not None:  # prepare_for_inference: one form for every call
        return m._prepared_path
    if m.compact_path is not None:
        return m.compact_path
    state = m.__dict__.get("_derived")
    paths = sorted(state.paths.items()) if state is not None else []
    if not paths:  # under torch.compile the choice is not stored; the latest call's is known
        return m.last_path or "pending"
    parts = [p if b == paths[-1][0] else f"{p}<={(1 << b) - 1}" for b, p in paths]
    runs = [parts[0]]
    for (b, p), part in zip(paths[1:], parts[1:]):  # one entry per run of the same path
        if p == runs[-1].split("<=")[0]:
            runs[-1] = part
        else:
            runs.append(part)
    return ",".join(runs)


def compression_report(model, export_dir=None):
    """Per-layer shapes, ranks, kept rows and inference path, totals, and whole-model parameter counts.

    ``model_params`` counts what a compact export stores (L, R, kept rows of S, biases and every other
    parameter once); ``model_params_dense_equivalent`` the same model with dense matrices. With
    ``export_dir`` (an :func:`export_compact` directory) the sizes of its files are reported too.
    """
    target = _unwrap(model)
    layers, seen = [], set()
    in_losparse = set()
    for name, m in target.named_modules():
        if isinstance(m, LinearLoSparse):
            form, kept, stored = m._sparse_form()
            layers.append({"name": name, "out_features": m.out_feature, "in_features": m.in_feature,
                           "rank": m.reduced_rank, "kept_rows": m.kept_rows, "path": _layer_path(m),
                           "sparse_form": form, "kept": kept, "sparse_params": stored})
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


# Not "model.safetensors": a transformers class loading the folder without its remote code
# (LlamaForCausalLM.from_pretrained) finds no weights file and stops, instead of initialising the compressed
# projections at random.
COMPACT_WEIGHTS = "losparse_model.safetensors"
_LEGACY_COMPACT_WEIGHTS = "model.safetensors"  # folders written before the remote-code export
COMPACT_CONFIG = "losparse_config.json"
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
        form = m._sparse_form()[0] if m.has_sparse else None
        if form == "cols":  # column form: new keys, the row keys stay those of the original
            rows, idx = (m.sparse_weight_pruned_cols, m.nonzero_col_idx) if m.is_compacted else (None, None)
            if idx is None:
                idx = torch.nonzero((m.sparse.weight != 0).any(dim=0)).flatten()
                rows = m.sparse.weight[:, idx]
            keys = ("sparse_weight_pruned_cols", "nonzero_col_idx")
        elif form == "rows":
            rows, idx = (m.sparse_weight_pruned, m.nonzero_idx) if m.is_compacted else (None, None)
            if idx is None:
                idx = torch.nonzero((m.sparse.weight != 0).any(dim=1)).flatten()
                rows = m.sparse.weight[idx]
            keys = ("sparse_weight_pruned", "nonzero_idx")
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
                tensors[p + keys[0]] = rows
                tensors[p + keys[1]] = idx
            if k and form == "cols":
                entry.update(form="losparse_cols", kept_cols=k, kept_rows=m.out_feature)
            else:
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
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    meta = {"format_version": 1, "model_class": type(target).__name__, "layers": layers, "tied": tied,
            "losparse_args": _jsonable(losparse_args)}
    (out / COMPACT_CONFIG).write_text(json.dumps(meta, indent=1))
    if hasattr(target, "config") and hasattr(target.config, "to_dict"):
        _write_remote_code_files(target, out, layers, tied, meta["losparse_args"])
    logger.info("LoSparse: exported compact model to %s", out)
    return out


def _auto_entries(architecture):
    """``{Auto class: entry class}`` for the transformers Auto classes that load ``architecture``."""
    from transformers.models.auto import modeling_auto

    found = {}
    for mapping, auto, entry in _AUTO_ENTRIES:
        names = getattr(modeling_auto, mapping, {}).values()
        if any(architecture == n or (isinstance(n, (tuple, list)) and architecture in n) for n in names):
            found[auto] = f"modeling_losparse.{entry}"
    return found


def _write_remote_code_files(target, out, layers, tied, losparse_args):
    """``config.json`` (model_type ``losparse``), ``modeling_losparse.py``, ``generation_config.json``, README.md."""
    import shlex
    import sys

    arch = type(target).__name__
    autos = _auto_entries(arch)
    if not autos:
        logger.warning("LoSparse: %s is not in a transformers Auto mapping; %s loads only with utils.load_compact",
                       arch, out)
    rep = compression_report(target)
    dense = max(1, rep.dense_params)
    ratios = {"low_rank_ratio": rep.low_rank_params / dense, "kept_sparse_ratio": rep.sparse_params / dense,
              "effective_ratio": rep.effective_ratio, "parameters": rep.model_params,
              "parameters_dense": rep.model_params_dense_equivalent}
    base = target.config.to_dict()
    source = getattr(target.config, "name_or_path", None) or base.get("_name_or_path") or "(not recorded)"
    config = {"model_type": "losparse", "architectures": [autos[a].split(".")[1] for a in autos][:1],
              "auto_map": {"AutoConfig": "modeling_losparse.LoSparseConfig", **autos}, "base_architecture": arch,
              "base_config": base, "losparse_layers": layers, "losparse_tied": tied,
              "losparse": {"source_model": str(source), **ratios, "args": losparse_args}}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if REMOTE_CODE_FILE.is_file():
        (out / REMOTE_CODE_FILE.name).write_bytes(REMOTE_CODE_FILE.read_bytes())
    else:
        logger.warning("LoSparse: %s not found (utils.py copied alone?); %s loads only with utils.load_compact",
                       REMOTE_CODE_FILE, out)
    gen = getattr(target, "generation_config", None)
    if gen is not None and getattr(target, "can_generate", lambda: False)():
        gen.save_pretrained(str(out))
    auto = next(iter(autos), "AutoModel")
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
        f"| compressed matrices | {len(layers)} |",
        f"| low-rank parameters (L, R) | {ratios['low_rank_ratio']:.2%} of the compressed matrices |",
        f"| kept rows of S | {ratios['kept_sparse_ratio']:.2%} of the compressed matrices |",
        f"| effective ratio (L, R and kept rows) | {ratios['effective_ratio']:.2%} |",
        f"| parameters | {rep.model_params:,} (dense source: {rep.model_params_dense_equivalent:,}) |",
        f"| `{COMPACT_WEIGHTS}` | {size:,} bytes ({size / 2**20:.2f} MiB) |", "",
        "Made with:", "", "```", "python " + shlex.join(sys.argv), "```", "",
    ]
    if losparse_args:
        card += ["LoSparse flags:", "", "```json", json.dumps(losparse_args, indent=1, sort_keys=True), "```", ""]
    (out / "README.md").write_text("\n".join(card))


def _jsonable(args):
    if args is None:
        return None
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list))}


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
    import transformers

    _check_prefer(prefer)

    out = Path(output_dir)
    meta_path = out / COMPACT_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; {out} is not an export_compact folder")
    meta = json.loads(meta_path.read_text())
    config = _compact_base_config(out)
    if model_class is None:
        model_class = getattr(transformers, meta.get("model_class", ""), None) or transformers.AutoModel
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else \
        model_class._from_config(config)
    weights = out / COMPACT_WEIGHTS
    if not weights.is_file() and (out / _LEGACY_COMPACT_WEIGHTS).is_file():
        weights = out / _LEGACY_COMPACT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing")
    sd = load_file(str(weights))
    for name, entry in meta["layers"].items():
        if entry["form"] == "dense":
            continue
        like = model.get_submodule(name).weight
        if entry["form"] not in ("losparse", "losparse_cols", "low_rank"):
            raise CheckpointMismatchError(f"{out / COMPACT_CONFIG}: layer {name} has form {entry['form']!r}; allowed "
                                          "values are 'dense', 'losparse', 'losparse_cols', 'low_rank'")
        layer = LinearLoSparse(entry["in_features"], entry["out_features"], entry["rank"],
                               has_bias=entry["has_bias"], has_sparse=entry["form"] != "low_rank",
                               device=like.device, dtype=like.dtype)
        if entry["form"] == "losparse":
            k = entry["kept_rows"]
            layer._set_compact(torch.zeros(k, entry["in_features"], dtype=like.dtype), torch.zeros(k, dtype=torch.long))
        elif entry["form"] == "losparse_cols":
            k = entry["kept_cols"]
            layer._set_compact_cols(torch.zeros(entry["out_features"], k, dtype=like.dtype),
                                    torch.zeros(k, dtype=torch.long))
        layer.prefer = prefer
        _set_submodule(model, name, layer)
    for k, src in meta.get("tied", {}).items():
        sd[k] = sd[src]
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(f"{weights} does not match {meta_path.name} / config.json: "
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
# 7. FSDP2: models bigger than one GPU
# ----------------------------------------------------------------------------------------------------
_UNSHARDED = weakref.WeakKeyDictionary()  # model sharded by apply_fsdp2 -> its structure on the meta device


def _fsdp2_blocks(model):
    """The transformer blocks: modules whose class is in ``model._no_split_modules``, else the children of every
    ``nn.ModuleList`` (``encoder.layer``, ``model.layers``, ...); outermost last, the root excluded."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not blocks:
        blocks = [c for m in model.modules() if isinstance(m, nn.ModuleList) for c in m if c is not model]
    seen, out = set(), []
    for m in reversed(blocks):  # children before their parents
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _meta_twin(model):
    """A copy of ``model`` whose parameters are on the meta device (ties kept; buffers and attributes copied)."""
    memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def apply_fsdp2(model, accelerator=None, **fully_shard_kwargs):
    """Shard ``model`` with PyTorch's FSDP2 across the processes torchrun / Accelerate started (CPU gloo or GPUs).

    ``torch.distributed.fsdp.fully_shard`` is applied to every transformer block (see :func:`_fsdp2_blocks`), then
    to the root, over a 1-D mesh of all ranks: each parameter becomes a ``DTensor`` holding whole rows on each
    rank, which the :class:`Pruner` scores and masks where they live. Call it after STEP 1 (and after loading
    any checkpoint) and before building the optimizer. With ``accelerator`` under Accelerate's FSDP2 plugin its
    ``reshard_after_forward``, mixed precision and CPU offload settings are used, and ``accelerator.prepare``
    then keeps the sharded model as it is; otherwise the model is registered with ``accelerator`` (autocast,
    ``save_state``) without a DDP wrapper. Extra ``fully_shard_kwargs`` go to every ``fully_shard`` call. One
    process: nothing to shard, the model is returned unchanged. See :func:`fsdp2_checkpointing` and
    :func:`fsdp2_full_model`.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        logger.warning("LoSparse: FSDP2 requested with a single process: nothing to shard, training unsharded")
        return model
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return model
    accelerate_fsdp2 = accelerator is not None and getattr(accelerator, "is_fsdp2", False)
    kwargs = {}
    if accelerate_fsdp2:
        plugin = accelerator.state.fsdp_plugin
        kwargs["reshard_after_forward"] = plugin.reshard_after_forward
        if plugin.mixed_precision_policy is not None:
            kwargs["mp_policy"] = plugin.mixed_precision_policy
        if plugin.cpu_offload is not None:
            kwargs["offload_policy"] = plugin.cpu_offload
    kwargs.update(fully_shard_kwargs)
    device = accelerator.device if accelerator is not None else \
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    skeleton = _meta_twin(model)
    blocks = _fsdp2_blocks(model)
    kinds = ", ".join(sorted({type(b).__name__ for b in blocks})) or "none"
    for block in blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    for m in model.modules():  # FSDP2 re-gathers parameters into the same storage without bumping their versions
        if isinstance(m, LinearLoSparse):
            m.cache_derived = False
    if callable(getattr(model, "generate", None)):  # generate() calls the encoder directly: gather the root first
        register_fsdp_forward_method(model, "generate")
    _UNSHARDED[model] = skeleton
    local = sum(_local(p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoSparse: model sharded with FSDP2 (fully_shard) over %d ranks: %d blocks (%s) + the root; this "
                "rank holds %d of %d parameters", world, len(blocks), kinds, local, total)
    if accelerator is not None and not accelerate_fsdp2:
        model = accelerator.prepare_model(model, evaluation_mode=True)  # autocast and save_state, no DDP wrapper
    return model


def _shard_like(value, p):
    """This rank's rows of ``value`` (a full tensor shaped like FSDP2 parameter ``p``) as a DTensor like ``p``."""
    if not (_is_sharded(p) and torch.is_tensor(value) and value.dim() and tuple(value.shape) == tuple(p.shape)):
        return value
    start, end = _row_range(p)
    local = value[start:end].to(_local(p).device).contiguous()
    return _DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _full_optimizer_state(optimizer):
    """``optimizer.state_dict()`` with every sharded state gathered (a collective; kept on rank 0 only)."""
    sd = optimizer.state_dict()
    keep = torch.distributed.get_rank() == 0
    state = {}
    for i in sorted(sd["state"]):
        entry = {}
        for k, v in sd["state"][i].items():
            v = v.full_tensor() if _is_sharded(v) else v
            entry[k] = v.detach().cpu().clone() if torch.is_tensor(v) else v
        if keep:
            state[i] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def _load_full_optimizer_state(optimizer, state_dict):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {i: {k: _shard_like(v, params[int(i)]) for k, v in entry.items()}
             for i, entry in state_dict["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


def fsdp2_checkpointing(accelerator, model, optimizer=None):
    """Make ``accelerator.save_state`` / ``load_state`` store a model sharded by :func:`apply_fsdp2` in full.

    The files are those of one process: ``model.safetensors`` with the full weights and ``optimizer.bin`` with
    the full optimizer state (gathered on the main process), so a run resumes bit-exactly, also on another number
    of ranks. The :class:`Pruner` gathers its statistics itself (``Pruner.state_dict``). Call it on every rank
    after ``accelerator.prepare``. No-op for an unsharded model and under Accelerate's own FSDP2 plugin (which
    writes sharded checkpoints with ``torch.distributed.checkpoint``).
    """
    target = _unwrap(model)
    if getattr(accelerator, "is_fsdp2", False) or not any(_is_sharded(p) for p in target.parameters()):
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    def save_hook(models, weights, output_dir):
        for i, m in enumerate(models):
            if _unwrap(m) is target:
                weights[i] = get_model_state_dict(
                    target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_hook(models, input_dir):
        for m in list(models):
            if _unwrap(m) is not target:
                continue
            sd = _read_state_dict(input_dir)
            ties = {}
            for n, p in target.named_parameters(remove_duplicate=False):
                ties.setdefault(id(p), []).append(n)
            for names in ties.values():  # safetensors keeps one key of tied weights
                src = next((n for n in names if n in sd), None)
                for n in names:
                    if src is not None and n not in sd:
                        sd[n] = sd[src]
            set_model_state_dict(target, sd, options=StateDictOptions(full_state_dict=True))
            models.remove(m)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    if optimizer is not None:  # Accelerate saves optimizer.state_dict() of the main process only: gather first
        inner = getattr(optimizer, "optimizer", optimizer)
        optimizer.state_dict = lambda: _full_optimizer_state(inner)
        optimizer.load_state_dict = lambda state_dict: _load_full_optimizer_state(inner, state_dict)


def fsdp2_full_model(model, device="cpu"):
    """A plain (unsharded) copy of a model sharded by :func:`apply_fsdp2`, with its full weights on ``device``.

    A collective: call it on every rank (each gets the copy). Use it after training for what needs whole
    matrices: ``save_pretrained``, :func:`save_checkpoint`, :func:`export_compact`, :func:`prune`,
    :func:`compression_report`. An unsharded model is returned as it is.
    """
    target = _unwrap(model)
    if not any(_is_sharded(p) for p in target.parameters()):
        return model
    skeleton = _UNSHARDED.get(target)
    if skeleton is None:
        raise RuntimeError("fsdp2_full_model: the model was not sharded by utils.apply_fsdp2, which records its "
                           "unsharded structure; shard it with utils.apply_fsdp2")
    twin = copy.deepcopy(skeleton)
    metas = dict(twin.named_parameters())
    names = [n for n, _ in target.named_parameters()]
    if names != list(metas):
        raise RuntimeError("fsdp2_full_model: the model's parameters changed since apply_fsdp2 "
                           f"({len(names)} now, {len(metas)} then)")
    new = {}
    for n, p in target.named_parameters():  # the same order on every rank: one all-gather per sharded parameter
        full = p.full_tensor() if _is_sharded(p) else p
        new[id(metas[n])] = nn.Parameter(full.detach().to(device).clone(), requires_grad=p.requires_grad)
    for m in twin.modules():
        for k, v in m._parameters.items():
            if v is not None:
                m._parameters[k] = new[id(v)]
    buffers = dict(twin.named_buffers())
    for n, b in target.named_buffers():
        if n in buffers:
            buffers[n].copy_((b.full_tensor() if _is_sharded(b) else b).detach())
    if hasattr(target, "config"):
        twin.config = target.config
    return twin.train(target.training)


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
