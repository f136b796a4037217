"""Model-level compaction and inference set-up: ``prune``, ``refresh``, ``prepare_for_inference``.

Each walks the ``LinearLoSparse`` layers of a model and calls their own methods; ``share_timed_choices`` gives the
layers of one model one memo of timed form choices.
"""
from .common import logger, refuse_sharded
from .forms import COMPACT_PATHS, TimedChoices, check_prefer
from .layer import LinearLoSparse


def share_timed_choices(module):
    """Give every :class:`LinearLoSparse` of ``module`` one :class:`TimedChoices` (one timing per shape class
    and model)."""
    shared = TimedChoices()
    for m in module.modules():
        if isinstance(m, LinearLoSparse):
            m.fast_path.timings = shared


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
    refuse_sharded(module, "prune")
    check_prefer(prefer)
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LinearLoSparse)]
    no_gain = []
    for name, m in layers:
        if m.has_sparse and not m.is_compacted:
            m.prune_sparse()
            form, kept, _ = m.sparse_form()
            if kept == (m.out_feature if form == "rows" else m.in_feature):
                no_gain.append(name)
        m.prefer = prefer
    share_timed_choices(module)
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
    refuse_sharded(module, "prepare_for_inference")
    layers = [m for m in module.modules() if isinstance(m, LinearLoSparse) and m.has_sparse and m.is_compacted]
    if not layers:
        raise ValueError("prepare_for_inference: the model has no compacted LinearLoSparse layer; call "
                         "utils.prune(model) (or load it with utils.load_compact) first")
    for m in layers:
        fast = m.fast_path
        chosen = path
        if chosen is None and (tokens is not None or fast.prepared is None):
            chosen = fast.path_for_tokens(m, tokens or PREPARE_TOKENS)
        fast.prepare(m, chosen or fast.prepared)
    logger.info("LoSparse: prepared %d compacted layers for inference (%s)", len(layers),
                ", ".join(sorted({m.fast_path.prepared for m in layers})))
    return len(layers)
