"""Decomposition: the truncated SVD ``W ~ L R`` (``low_rank_decomposition``) and the maths around it.

Plain functions on tensors: the rank of a parameter ratio (``rank_for_ratio``), the choice of a randomized SVD
(``use_randomized``), the Cholesky whitening of an input second moment (``whitening``, SVD-LLM) and the output weights
of a Fisher diagonal.
"""
import math
import random

import torch

from .common import logger
from .config import SVD_METHODS

REMOVE_CRITERIA = ("max_eigenvalue", "min_eigenvalue", "random")
LOG_LEVELS = ("IGNORE", "INFO", "DEBUG")


def rank_for_ratio(H, W, parameter_ratio=None, rank_ratio=0.1, rank=None):
    """``ceil(parameter_ratio * H * W / (H + W))`` (or ``ceil(rank * rank_ratio)``), clamped to ``[1, min(H, W)]``."""
    if parameter_ratio is not None:
        r = math.ceil(parameter_ratio * H * W / (H + W))
    else:
        r = math.ceil((min(H, W) if rank is None else rank) * rank_ratio)
    return max(1, min(int(r), min(H, W)))


def use_randomized(svd, H, W, r, oversample):
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    if svd == "auto":
        return 4 * (r + oversample) <= min(H, W)
    return svd == "randomized"


def whitening(input_cov, damp=1e-6):
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
    C = (C + C.mT).mul_(0.5)  # one in x in copy, damped in place below (no identity matrix: 1.6 GB at 14336 wide)
    scale = float(C.diagonal().mean()) if C.numel() else 0.0
    if not scale > 0:
        return None, None, {"fallback": "zero input_cov: plain SVD"}
    singular = int(torch.linalg.cholesky_ex(C)[1]) != 0
    diag = C.diagonal().clone()
    delta = damp * scale
    while True:
        C.diagonal().copy_(diag + delta)  # C + delta I, entry for entry
        K, err = torch.linalg.cholesky_ex(C)
        if int(err) == 0 or delta >= 0.1 * scale:
            break
        delta *= 10
    del C
    if int(err) != 0:
        raise ValueError("input_cov is not positive semi-definite, even damped by 0.1 * mean(diag)")
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    K_inv = torch.linalg.solve_triangular(K, eye, upper=False, out=eye)  # in place: the identity becomes K^-1
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
                           _whitened=None, output_fisher=None, _factors_only=False):
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
        K, K_inv, info = _whitened if _whitened is not None else whitening(input_cov.to(A.device))
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
    r = rank_for_ratio(H, W, parameter_ratio, rank_ratio) if parameter_ratio is not None else None
    oversample = max(10, (r or 0) // 2) if oversample is None else oversample

    if r is not None and remove_criteria == "max_eigenvalue" and use_randomized(svd, H, W, r, oversample):
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
            r = rank_for_ratio(H, W, None, rank_ratio, rank=int(torch.count_nonzero(S)))

    if remove_criteria == "max_eigenvalue":
        idx = torch.arange(r, device=A.device)
    elif remove_criteria == "min_eigenvalue":
        idx = torch.arange(S.numel() - r, S.numel(), device=A.device)
    else:
        idx = torch.tensor(sorted(random.sample(range(S.numel()), r)), device=A.device)
    if _factors_only:  # the caller builds its own factors from U, S, Vh (one_shot.fisher_svds)
        L = R = None
    else:
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
