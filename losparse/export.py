"""The compact folder: ``export_compact`` writes only L, R and the kept rows (or columns) of S, plus the remote code
that lets plain transformers load it (``trust_remote_code=True``); ``load_compact`` rebuilds the model from it."""
import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointMismatchError, mismatch_message, unmatched_keys
from .common import logger, refuse_sharded, set_submodule, unwrap
from .compact import share_timed_choices
from .forms import check_prefer
from .layer import LinearLoSparse
from .report import compression_report

# Not "model.safetensors": a transformers class loading the folder without its remote code
# (LlamaForCausalLM.from_pretrained) finds no weights file and stops, instead of initialising the compressed
# projections at random.
COMPACT_WEIGHTS = "losparse_model.safetensors"
_LEGACY_COMPACT_WEIGHTS = "model.safetensors"  # folders written before the remote-code export
COMPACT_CONFIG = "losparse_config.json"
COMPACT_FORMS = ("dense", "losparse", "losparse_cols", "low_rank")  # per-layer "form" in losparse_config.json
# The transformers remote code an export ships (``trust_remote_code=True``), package data of losparse.
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
    form = m.sparse_form()[0] if m.has_sparse else None
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
        logger.warning("LoSparse: %s not found (losparse installed without its remote_code folder?); %s loads "
                       "only with utils.load_compact", REMOTE_CODE_FILE, out)
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
    ``modeling_losparse.py``, copied from ``losparse/remote_code/``), so transformers refuses the folder without
    ``trust_remote_code`` instead of returning a randomly initialised model; ``generation_config.json`` for
    models that generate; and a model card ``README.md``. A layer whose compact form has at least as many
    parameters as the dense matrix is stored merged as a plain ``weight``; a layer whose S lost every row keeps
    only L and R. The model itself is not modified.
    """
    from safetensors.torch import save_file

    refuse_sharded(model, "export_compact")
    target = unwrap(model)
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
        layer.set_compact_rows(torch.zeros(k, entry["in_features"], dtype=like.dtype), torch.zeros(k, dtype=torch.long))
    elif entry["form"] == "losparse_cols":
        k = entry["kept_cols"]
        layer.set_compact_cols(torch.zeros(entry["out_features"], k, dtype=like.dtype),
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
            set_submodule(model, name, _compact_layer(entry, model.get_submodule(name).weight, prefer))
    share_timed_choices(model)
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

    check_prefer(prefer)
    out = Path(output_dir)
    meta = _read_compact_meta(out)
    model = _build_compact_model(meta, _compact_base_config(out), model_class, prefer)
    weights = _compact_weights_file(out)
    sd = load_file(str(weights))
    for k, src in meta.get("tied", {}).items():
        sd[k] = sd[src]
    missing, unexpected, mismatched = unmatched_keys(model.state_dict(), sd)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(f"{weights} does not match {COMPACT_CONFIG} / config.json: "
                                      + mismatch_message(missing, unexpected, mismatched))
    _check_kept_rows(sd, meta["layers"], str(weights))
    model.load_state_dict(sd, strict=True)
    if hasattr(model, "tie_weights") and meta.get("tied"):
        model.tie_weights()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()
