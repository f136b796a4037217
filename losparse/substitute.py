"""STEP 1, the walker: ``substitute_layer_weights`` replaces ``nn.Linear`` children by ``LinearLoSparse``.

``linear_targets`` lists what it would replace (same name rules), ``input_groups`` reads the calibration statistics
it may be given (a dict, or a streaming source such as ``losparse.calibration.InputCovariances``).
"""
import torch
from torch import nn

from .common import logger, set_submodule
from .decomposition import low_rank_decomposition, rank_for_ratio, whitening
from .layer import LinearLoSparse

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
        targets = linear_targets(module, allow_name, block_name)
        groups = input_groups(input_cov, [n for n, _ in targets], "substitute_layer_weights")
        if len(groups) > 1:  # streaming: each group measured, then replaced, last group first
            linears = dict(targets)
            for names, source in reversed(groups):
                kw = dict(kwargs, _input_cov=source(names), _whitened={})
                for n in names:
                    memo[id(linears[n])] = _losparse_from_linear(linears[n], parameter_ratio, has_sparse, True, kw, n)
                    set_submodule(module, n, memo[id(linears[n])])
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
                whitened[id(C)] = (C, whitening(C.to(W.device)))
            kwargs["input_cov"], kwargs["_whitened"] = C, whitened[id(C)][1]
        out = low_rank_decomposition(W, parameter_ratio=parameter_ratio, return_dict=True, **kwargs)
        L, R, r = out["L"], out["R"], out["reduced_rank"]
        S = W.float() - L @ R if has_sparse else None
    else:
        r = rank_for_ratio(H, Win, parameter_ratio, kwargs.get("rank_ratio", 0.1))
        L, R = torch.zeros(H, r), torch.zeros(r, Win)
        S = torch.zeros(H, Win) if has_sparse else None
    layer = LinearLoSparse(Win, H, r, has_bias=linear.bias is not None, has_sparse=has_sparse, device="meta")
    layer.initialize_weight(L.to(**kw), R.to(**kw), None if S is None else S.to(**kw),
                            None if linear.bias is None else linear.bias.detach().clone())
    return layer


def linear_targets(module, allow_name=None, block_name=None, prefix=""):
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
            out += linear_targets(child, allow_name, block_name, prefix + name + ".")
    return out


def input_groups(input_cov, names, what):
    """``[(names of a group, {name: C} or a callable giving it)]`` for a dict or a streaming source: an object with
    ``names`` (every layer it measures), ``groups`` (the names of each pass) and ``source(names) -> {name: C}``, as
    :class:`losparse.calibration.InputCovariances` is."""
    if callable(input_cov) and hasattr(input_cov, "groups"):
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
