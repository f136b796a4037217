"""Checkpoints in the original key layout: ``load_checkpoint`` / ``save_checkpoint``.

``read_state_dict`` reads ``.bin`` / ``.safetensors`` files (checked first by ``checkpoint_file_problem``, which
reads only headers); each ``LinearLoSparse`` is rebuilt at the rank and compaction the file holds.
"""
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .common import clean_name, logger, refuse_sharded, set_submodule, unwrap
from .compact import share_timed_choices
from .layer import LinearLoSparse


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists the keys."""


class CheckpointFileError(ValueError):
    """A checkpoint file cannot be read (truncated, or not a checkpoint); the message names the file and its size."""


def mismatch_message(missing, unexpected, mismatched, limit=20):
    parts = ["checkpoint does not fit the model (wrong base model or task head?)"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{title} ({len(keys)}): " + ", ".join(keys[:limit]) + more)
    return "\n".join(parts)


def unmatched_keys(own, sd):
    """``(missing, unexpected, mismatched)``: keys of the model's state dict ``own`` that ``sd`` lacks, keys of
    ``sd`` the model lacks, and ``"key: file (shape) vs model (shape)"`` for the rest that differ in shape."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mismatched


# -- reading a checkpoint file ------------------------------------------------------------------------------
def checkpoint_file_problem(path):
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


def read_state_dict(path_or_state_dict):
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
    problem = checkpoint_file_problem(path)  # a cheap look at the header and the end of the file first
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
    """Build a LinearLoSparse shaped like the checkpoint entries under ``prefix``. A rank-0 layer's empty L and R
    may be absent (safetensors writers keep zero-element tensors once, as shared storage): rank 0."""
    if prefix + "left.weight" in sd:
        rank = sd[prefix + "left.weight"].shape[1]
    else:
        rank = sd[prefix + "right.weight"].shape[0] if prefix + "right.weight" in sd else 0
    compact = prefix + "sparse_weight_pruned" in sd
    cols = prefix + "sparse_weight_pruned_cols" in sd
    has_sparse = compact or cols or prefix + "sparse.weight" in sd
    kw = {"device": like.device, "dtype": like.dtype}
    layer = LinearLoSparse(in_f, out_f, rank, has_bias=has_bias, has_sparse=has_sparse, **kw)
    if compact:
        k = sd[prefix + "sparse_weight_pruned"].shape[0]
        layer.set_compact_rows(torch.zeros(k, in_f, **kw), torch.zeros(k, dtype=torch.long, device=like.device))
    elif cols:
        k = sd[prefix + "sparse_weight_pruned_cols"].shape[1]
        layer.set_compact_cols(torch.zeros(out_f, k, **kw), torch.zeros(k, dtype=torch.long, device=like.device))
    return layer


def _reshape_layers_like(target, sd):
    """Give each layer of ``target`` that ``sd`` holds as LoSparse (a ``left.weight``, ``right.weight`` or ``sparse``
    key) the file's rank and compaction: a :class:`LinearLoSparse` or ``nn.Linear`` is replaced where its shapes
    differ from the file's."""
    modules = dict(target.named_modules())
    suffixes = ("left.weight", "right.weight", "sparse.weight", "sparse_weight_pruned", "sparse_weight_pruned_cols")
    prefixes = {k[: -len(s)] for k in sd for s in suffixes if k.endswith("." + s)}
    for prefix in sorted(prefixes):
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
            set_submodule(target, name, new)


def _checkpoint_mismatch(target, own, sd):
    """:func:`unmatched_keys`, forgiving tied parameters (e.g. lm_head <-> embeddings) saved once, zero-element
    tensors (L and R of a rank-0 layer) that safetensors writers keep once as shared storage, and buffers that this
    transformers version no longer persists (e.g. position_ids) present in older files."""
    missing, unexpected, mismatched = unmatched_keys(own, sd)
    missing = [k for k in missing if own[k].numel()]
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
    target = unwrap(model)
    sd = {clean_name(k): v for k, v in read_state_dict(path_or_state_dict).items()}
    _reshape_layers_like(target, sd)
    own = target.state_dict()
    missing, unexpected, mismatched = _checkpoint_mismatch(target, own, sd)
    if missing or unexpected or mismatched:
        msg = mismatch_message(missing, unexpected, mismatched)
        if strict:
            raise CheckpointMismatchError(msg)
        logger.warning(msg)
    load = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    target.load_state_dict(load, strict=False)
    share_timed_choices(target)
    logger.info("LoSparse: loaded %d tensors from checkpoint", len(load))
    return model


def save_checkpoint(model, path):
    """``torch.save(model.state_dict())`` in the original key layout (what ``--eval_checkpoint`` loads).

    Written to a temporary file first and renamed, so an existing file is never left half-written.
    """
    refuse_sharded(model, "save_checkpoint")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, str(tmp))
    os.replace(tmp, path)
    return path
